"""The README's `mlflow ui` command contacts nothing beyond 127.0.0.1 (checked with strace)."""

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts the MLflow server twice: about a minute

ROOT = Path(__file__).resolve().parents[1]


def _readme_command() -> tuple[dict[str, str], list[str]]:
    """The README's `mlflow ui` line: its environment settings and its command."""
    (line,) = [s for s in (ROOT / "README.md").read_text().splitlines() if " mlflow ui " in s]
    words = shlex.split(line)
    settings = dict(w.split("=", 1) for w in words if re.match(r"^[A-Z_]+=", w))
    return settings, [w for w in words if not re.match(r"^[A-Z_]+=", w)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _connects(settings: dict[str, str], command: list[str], workdir: Path) -> list[str]:
    """Every address the server connect()s to while it serves its page and an API call."""
    port = _free_port()
    command = [w.replace("mlflow.db", str(workdir / "m.db")) for w in command]
    command[command.index("--port") + 1] = str(port)
    command[0] = str(Path(sys.executable).parent / "mlflow")
    # a user's shell: none of the CI markers (PYTEST_CURRENT_TEST, CI, ...) that turn MLflow's
    # telemetry off on their own, so the README's settings are what keeps it local
    env = {"PATH": os.environ["PATH"], "HOME": str(workdir), "LANG": "C.UTF-8"}
    trace = workdir / f"trace.{port}"
    strace = ["strace", "-f", "-qq", "-e", "trace=connect", "-o", str(trace)]
    server = subprocess.Popen(
        strace + command,
        env=env | settings,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # strace, the server and its workers: one process group
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(url, timeout=5).read()
                break
            except OSError:
                time.sleep(0.5)
        api = "/ajax-api/2.0/mlflow/experiments/search?max_results=10"
        urllib.request.urlopen(url + api, timeout=10).read()
        time.sleep(15)  # telemetry is sent from a background thread
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(30)
    text = trace.read_text()
    return re.findall(r'inet_addr\("([0-9.]+)"\)|inet_pton\(AF_INET6, "([^"]+)"', text)


@pytest.mark.skipif(shutil.which("strace") is None, reason="no strace here (CI installs it)")
def test_mlflow_ui_as_the_readme_starts_it_stays_on_this_machine(tmp_path):
    settings, command = _readme_command()
    assert command[:2] == ["mlflow", "ui"] and "127.0.0.1" in command
    found = _connects(settings, command, tmp_path)
    assert all(a in ("127.0.0.1", "") and b in ("", "::1") for a, b in found), found
    resolv = Path("/etc/resolv.conf")
    if not resolv.is_file() or "nameserver" not in resolv.read_text():
        return  # no name server here: the twin below has nothing to show
    # twin: the same command without the README's settings looks up MLflow's telemetry host
    leaving = _connects({}, command, tmp_path)
    assert [a for a, _ in leaving if a and a != "127.0.0.1"], leaving
