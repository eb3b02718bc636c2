"""What a refused command must look like: one `error:` line, no traceback, a non-zero exit.

"One clear line": a non-zero exit, no traceback, and a single line starting with `error:` that
names the culprit (a file, a key, a value or an option).
"""

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def error_line(result, exit_code: int | None = None) -> str:
    """The one `error:` line of a refused in-process CLI call."""
    out = result.output
    why = f"output={out!r} exception={result.exception!r}"
    if exit_code is None:
        assert result.exit_code != 0, why
    else:
        assert result.exit_code == exit_code, why
    assert "Traceback" not in out, why
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, why
    assert lines[0].startswith("error:"), why
    return lines[0]


def stderr_line(proc: subprocess.CompletedProcess) -> str:
    """The one `error:` line on stderr of a refused subprocess, with no traceback anywhere."""
    why = f"rc={proc.returncode} stdout={proc.stdout!r} stderr={proc.stderr!r}"
    assert proc.returncode != 0, why
    for marker in ("Traceback", "╭"):
        assert marker not in proc.stdout + proc.stderr, why
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, why
    assert lines[0].startswith("error:"), why
    return lines[0]


def run_main(
    *args: str, cwd: Path | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    """The `deepalign` console script's entry point, in a fresh interpreter."""
    code = "from deepalign.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def import_footprint() -> int:
    """Bytes of address space the CLI's process maps once torch is imported (VmPeak)."""
    code = (
        "import torch, deepalign.cli\n"
        "for line in open('/proc/self/status'):\n"
        "    if line.startswith('VmPeak:'): print(int(line.split()[1]) * 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout)


def run_limited(*args: str, cwd: Path, fsize: int | None = None, address_space: int | None = None):
    """`run_main` under resource limits: a file-size cap (a disk that fills up: writes fail
    with EFBIG) or an address-space cap (`ulimit -v`: allocations fail)."""
    import resource
    import signal

    def limit() -> None:
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write, do not kill
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        if address_space is not None:
            resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    code = "from deepalign.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
    )
