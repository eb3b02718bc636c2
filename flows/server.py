"""A Prefect API for one stage process: the user's server, or a private one that dies with it.

Without `PREFECT_API_URL`, Prefect starts an ephemeral server in a child process and stops it
at exit; a `kill -9` of the stage skips that and leaves the server running. `prefect_api`
starts the same server itself, tied to this process by the kernel (Linux `PR_SET_PDEATHSIG`),
and exports its URL so that child processes (`dvc repro` under the pipeline flow) share it.

The server takes ~8 s to start on 2 cores, as long as a stage's own imports (torch, Prefect,
MLflow: ~7 s), so a stage command (`python -m flows.<stage>`) starts it before those imports,
from `flows/__init__.py` (`start_early`), and waits for it only when its flow begins. This
module imports nothing heavy at the top for that reason.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.util
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PR_SET_PDEATHSIG = 1
# `python -m flows.<module>` commands that never run a flow: no server for them
NO_FLOW = {"flows.dvcgen", "flows.imports", "flows.stages", "flows.server", "flows.schedule"}
_early: dict[str, tuple[subprocess.Popen, str]] = {}
_exit: dict[str, int] = {}  # a stage command's exit status, once its command line returned


def end_without_teardown() -> None:
    """Make a stage command end right after its exit handlers (Prefect's flush, the private
    server's stop, logging), skipping the interpreter's teardown of torch, Prefect and MLflow:
    ~2 s of freeing objects per stage on 2 cores. Registered first, so it runs last; only
    after `cli` recorded the status (an uncaught exception takes the usual way out)."""

    def end() -> None:
        import logging

        if "code" not in _exit:
            return
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit["code"])

    atexit.register(end)


def set_exit_code(code: object) -> None:
    """The status a stage command ends with (a `SystemExit` code: None, an int or a message)."""
    _exit["code"] = code if isinstance(code, int) else (0 if code is None else 1)


def _die_with_parent() -> None:
    """In the child before exec: receive SIGTERM when the parent process dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the atexit stop still applies
        pass


def exit_with_parent() -> None:
    """In a worker process: exit at once when the process that started it dies.

    A `kill -9` of a stage leaves its process-pool workers running their task to the end,
    writing outputs the killed stage no longer owns. `PR_SET_PDEATHSIG` fires when the parent
    *thread* exits (a pool starts its workers from a short-lived helper thread), so a daemon
    thread waits on the parent's pidfd instead (Linux >= 5.3), or polls `getppid` elsewhere.
    """
    parent = os.getppid()

    def watch() -> None:
        try:
            fd = os.pidfd_open(parent)
        except (AttributeError, OSError):  # not Linux, or the parent is already gone
            while os.getppid() == parent:
                time.sleep(0.1)
        else:
            select.select([fd], [], [])  # readable when the parent exits
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start() -> tuple[subprocess.Popen, str]:
    """Prefect's own ephemeral server command (UI off) on a free 127.0.0.1 port, stopped at
    exit; its process and API URL."""
    port = _free_port()
    package = Path(importlib.util.find_spec("prefect").origin).parent  # without importing it
    args = [sys.executable, "-m", "uvicorn", "--app-dir", str(package.parent)]
    args += ["--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1"]
    args += ["--port", str(port), "--log-level", "error", "--lifespan", "on"]
    env = os.environ | {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1"}
    proc = subprocess.Popen(args, env=env, preexec_fn=_die_with_parent)
    atexit.register(_stop, proc)  # before Prefect registers its event flush: runs after it
    return proc, f"http://127.0.0.1:{port}/api"


def stage_command() -> str | None:
    """The module of a `python -m flows.<stage>` command line, else None."""
    argv = getattr(sys, "orig_argv", [])
    if "-m" not in argv[:-1]:
        return None
    module = argv[argv.index("-m") + 1]
    return module if module.startswith("flows.") else None


def start_early() -> None:
    """In a stage command: end it without teardown, and start the private server now when
    it will need one (no `PREFECT_API_URL`, not `--help`)."""
    module = stage_command()
    if module is None or module in NO_FLOW:
        return
    end_without_teardown()
    if os.environ.get("PREFECT_API_URL") or {"--help", "-h"} & set(sys.orig_argv):
        return
    _early["server"] = _start()


def _wait_healthy(proc: subprocess.Popen, url: str, timeout: float) -> None:
    import httpx

    from deepalign.errors import DeepAlignError

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
    """Yield the Prefect API URL in use, starting a private server when none is configured
    (or taking the one `start_early` started).

    The private server stops when this process exits (at exit, after Prefect has flushed its
    events, or by the kernel's death signal on `kill -9`), not when the block ends.
    """
    from prefect.context import refresh_global_settings_context
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    proc, url = _early.pop("server", None) or _start()
    timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 90))
    _wait_healthy(proc, url, timeout)
    os.environ["PREFECT_API_URL"] = url  # child processes share this server
    # and so do this process's threads that start without the settings context of the flow
    # (a process pool's message forwarder, which otherwise starts an ephemeral server of
    # Prefect's own for the workers' events: one that a `kill -9` of the stage leaves running)
    refresh_global_settings_context()
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield url
