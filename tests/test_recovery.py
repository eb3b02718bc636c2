"""Clean recovery: compact zoo files, no stale temp files, no orphaned Prefect servers."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from deepalign.core.data import DataCfg, Split
from deepalign.io import compact_checkpoint, load_checkpoint
from deepalign.zoo.build import NetCfg, is_done, make_arch, network_fingerprint, plan, train_chunk
from tests.configs import net_cfg
from tests.tiny import tiny_params

ROOT = Path(__file__).resolve().parents[1]
DIGITS = DataCfg("digits", "data", False, 0, 0.1, 0.2)
ZOO_STAGE = [sys.executable, "-m", "flows.zoo", "--params", "params.yaml", "--out", "zoo"]
ZOO_STAGE += ["--metrics", "zoo.json"]


def wide_net() -> NetCfg:
    return net_cfg("mlp", hidden=[64, 64], n_train=4)


def test_zoo_checkpoints_hold_only_their_own_network(tmp_path, digits):
    net = wide_net()
    arch, jobs = make_arch(net, digits), plan(tmp_path, net, seed=0)
    data = type(digits)(
        digits.name,
        Split(digits.train.x[:128], digits.train.y[:128]),
        digits.val,
        digits.test,
        digits.n_classes,
    )
    fps = {j.index: network_fingerprint(arch, net, DIGITS, j.seed) for j in jobs}
    train_chunk(arch, jobs, data, net, fps, torch.device("cpu"), progress=False)
    param_bytes = load_checkpoint(jobs[0].path).ws.flatten().numel() * 4  # ~35 KB
    for job in jobs:  # a file saving the group's stacked storage would be ~4x param_bytes
        assert job.path.stat().st_size < 1.2 * param_bytes + 8_000


def test_bloated_zoo_file_is_rewritten_once_with_the_same_content(tmp_path, digits):
    net = wide_net()
    arch, jobs = make_arch(net, digits), plan(tmp_path, net, seed=0)
    fp = network_fingerprint(arch, net, DIGITS, jobs[0].seed)
    stacked = {k: torch.randn(4, *v.shape) for k, v in arch.build().state_dict().items()}
    state = {k: v[1] for k, v in stacked.items()}  # views of a group's tensors, as before
    blob = {
        "format": "deepalign/1",
        "arch": arch.to_dict(),
        "state_dict": state,
        "meta": {"fingerprint": fp, "test_acc": 0.5},
    }
    torch.save(blob, jobs[0].path)
    before = jobs[0].path.stat().st_size
    assert is_done(jobs[0], fp)
    after = jobs[0].path.stat().st_size
    assert after < before / 3
    again = load_checkpoint(jobs[0].path)
    assert again.meta == blob["meta"]
    assert all(
        torch.equal(again.ws.tensors()[i], t)
        for i, t in enumerate(
            [state[k] for k in ("0.weight", "2.weight", "4.weight", "0.bias", "2.bias", "4.bias")]
        )
    )
    stamp = jobs[0].path.stat().st_mtime_ns
    assert not compact_checkpoint(jobs[0].path)  # twin: a compact file is left alone
    assert jobs[0].path.stat().st_mtime_ns == stamp


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append((int(entry.name), cmdline))
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow  # starts a stage, its Prefect server and worker processes
def test_killed_stage_cleans_temps_on_rerun_and_takes_its_prefect_server(tmp_path):
    params = tiny_params()
    params["zoo"]["archs"]["mlp"].update(n_train=40, epochs=30)
    params["zoo"]["chunk_size"] = 2
    del params["zoo"]["archs"]["cnn"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    stale = [  # the names atomic_path gives its temps
        tmp_path / "zoo" / "mlp" / ".net-0003.pt.abc123de.deepalign.tmp",
        tmp_path / ".zoo.json.x1y2z3_4.deepalign.tmp",
    ]
    foreign = [  # other programs' temps, in the stage's output folder and beside its file
        tmp_path / "zoo" / "mlp" / ".notes.md.tmp",
        tmp_path / ".zoo.json.x.tmp",
        tmp_path / "zoo" / ".editor.deepalign.tmp",
    ]
    for path in stale + foreign:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half-written")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    proc = subprocess.Popen(
        ZOO_STAGE, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not list((tmp_path / "zoo" / "mlp").glob("net-*.pt")) and time.time() < deadline:
        time.sleep(0.2)
    servers = [pid for pid, cmd in _children(proc.pid) if "uvicorn" in cmd]
    assert len(servers) == 1, "the stage and its workers share one Prefect server of its own"
    assert not any(path.exists() for path in stale)  # cleaned when the stage started
    assert all(path.read_bytes() == b"half-written" for path in foreign)  # not the stage's
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20
    while any(_alive(pid) for pid in servers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in servers), "the killed stage's server is still running"


@pytest.mark.slow  # starts a stage's process
def test_stage_with_a_bad_param_says_one_line(tmp_path):
    params = tiny_params()
    params["zoo"]["chunk_size"] = 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        ZOO_STAGE, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error:") and "zoo.chunk_size" in lines[0] and ">= 1" in lines[0]
    assert not (tmp_path / "zoo").exists()
