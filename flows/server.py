"""A Prefect API for one stage process: the user's server, or a private one that dies with it.

Without `PREFECT_API_URL`, Prefect starts an ephemeral server in a child process and stops it
at exit; a `kill -9` of the stage skips that and leaves the server running. `prefect_api`
starts the same server itself, tied to this process by the kernel (Linux `PR_SET_PDEATHSIG`),
and exports its URL so that child processes (`dvc repro` under the pipeline flow) share it.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import prefect
from prefect.settings import PREFECT_API_URL, temporary_settings

from deepalign.errors import DeepAlignError

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: receive SIGTERM when the parent process dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the atexit stop still applies
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(port: int) -> subprocess.Popen:
    """Prefect's own ephemeral server command (UI off), on 127.0.0.1:port."""
    args = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent)]
    args += ["--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1"]
    args += ["--port", str(port), "--log-level", "error", "--lifespan", "on"]
    env = os.environ | {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1"}
    return subprocess.Popen(args, env=env, preexec_fn=_die_with_parent)


def _wait_healthy(proc: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeepAlignError(f"the Prefect server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise DeepAlignError(f"the Prefect server at {url} did not start within {timeout:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def prefect_api() -> Iterator[str]:
    """Yield the Prefect API URL in use, starting a private server when none is configured.

    The private server stops when this process exits (at exit, after Prefect has flushed its
    events, or by the kernel's death signal on `kill -9`), not when the block ends.
    """
    configured = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    proc = _start(port)
    atexit.register(_stop, proc)  # before Prefect registers its event flush: runs after it
    timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 90))
    _wait_healthy(proc, url, timeout)
    os.environ["PREFECT_API_URL"] = url  # child processes share this server
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield url
