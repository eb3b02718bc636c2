"""The thread policy (deepalign.threads) and the busy-machine benchmark it rests on."""

import os
import subprocess
import sys

import psutil
import pytest
import torch

from deepalign.config import load_section
from deepalign.core.chain import mlp_arch
from deepalign.evaluation.bench import benchmark_busy, competing_process
from deepalign.evaluation.experiment import AlignCfg
from deepalign.methods import Problem
from deepalign.threads import (
    ALLOCATOR_ENV,
    available_cores,
    per_pair,
    set_pair_threads,
    threads,
    threads_for,
)
from deepalign.zoo.build import init_network
from flows.common import RunnerCfg, stage_runner, task_runner
from flows.stages import Stage
from tests.tiny import ROOT


def test_tasks_share_the_cores_and_per_pair_loops_get_the_pair_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert available_cores() == 8
    assert threads_for(workers=4) == 2  # 8 cores among 4 workers
    assert threads_for(workers=16) == 1  # never 0
    assert threads_for(workers=4, threads=3) == 3  # given explicitly

    fans, per_arch = Stage("z", {}, (), fan_out=True), Stage("e", {}, ())
    threads_2, dask_2 = RunnerCfg("threads", 2, "", 0, 1), RunnerCfg("dask", 2, "", 0, 1)
    processes_2 = RunnerCfg("processes", 2, "", 0, 1)
    one_task, n = stage_runner(fans, threads_2)  # one task on all 8 cores
    assert (one_task.kind, one_task.workers, n) == ("threads", 1, 8)
    assert stage_runner(fans, dask_2) == (dask_2, 4)  # 2 processes of 4 threads
    assert stage_runner(fans, processes_2) == (processes_2, 4)
    in_process, n = stage_runner(per_arch, processes_2)  # twin: a stage that does not fan out
    assert (in_process.kind, in_process.workers, n) == ("threads", 1, 8)

    with threads(4):
        set_pair_threads(2)
        with per_pair():
            assert torch.get_num_threads() == 2
        set_pair_threads(8)
        with per_pair():
            assert torch.get_num_threads() == 4  # lowered, never raised
        assert torch.get_num_threads() == 4
    set_pair_threads(1)


def test_without_omp_num_threads_the_cores_are_the_cpu_affinity(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert available_cores() == len(psutil.Process().cpu_affinity())


def test_threads_block_restores_the_process_setting():
    before = torch.get_num_threads()
    with threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), threads(1):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before  # restored on errors too


@pytest.mark.slow  # starts a process
def test_the_competing_process_runs_inside_the_block_only():
    me = psutil.Process()
    with competing_process():
        spinners = [c for c in me.children() if "while True" in " ".join(c.cmdline())]
        assert len(spinners) == 1 and spinners[0].status() != psutil.STATUS_ZOMBIE
    assert not [c for c in me.children() if c.is_running() and c.pid == spinners[0].pid]


@pytest.mark.slow  # starts a process
def test_busy_benchmark_reports_idle_busy_and_their_ratio():
    arch = mlp_arch(64, [16, 16], 10, "relu")
    a, b = init_network(arch, 0), init_network(arch, 1)
    cfg = load_section("align", AlignCfg, ROOT / "params.yaml")
    out = benchmark_busy(["weight_matching"], [Problem.of(a, b, arch)], cfg, {"one_thread": 1})
    row = out["weight_matching"]
    assert set(row) == {"one_thread_idle_s", "one_thread_busy_s", "one_thread_busy_over_idle"}
    assert row["one_thread_idle_s"] > 0 and row["one_thread_busy_s"] > 0
    assert row["one_thread_busy_over_idle"] == pytest.approx(
        row["one_thread_busy_s"] / row["one_thread_idle_s"]
    )


_ALLOCATIONS = """
import ctypes, mmap, resource, sys, torch
from deepalign.threads import keep_freed_memory

class MallInfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split())]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
if sys.argv[1] == "keep":
    assert keep_freed_memory()
for _ in range(10):  # 16 MiB allocated and freed: glibc settles on where to keep it
    torch.ones(4 << 20).sum()
before, mapped = faults(), 0
for _ in range(20):
    x = torch.ones(4 << 20)
    mapped += mallinfo2().hblkhd >= x.nbytes  # served by its own mmap, unmapped when freed
    del x
after = faults()
probe = mmap.mmap(-1, 64 << 20)  # does this kernel count minor faults? touch 16384 pages
for page in range(0, 64 << 20, 4096):
    probe[page] = 1
print(mapped, after - before, faults() - after, mallinfo2().fordblks)
"""


def _allocations(mode: str) -> tuple[int, int, int, int]:
    """(allocations of 16 MiB served by mmap, page faults of those 20, page faults counted
    for touching 16384 fresh pages, free bytes kept in the heap) in a fresh process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["MALLOC_TRIM_THRESHOLD_"] = "65536"  # as Dask starts its workers
    out = subprocess.run(
        [sys.executable, "-c", _ALLOCATIONS, mode],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    mapped, faults, probe, kept = map(int, out.stdout.split()[-4:])
    return mapped, faults, probe, kept


@pytest.mark.slow  # starts a process
def test_kept_freed_memory_is_reused_from_the_heap():
    mapped, _, _, kept = _allocations("keep")
    assert mapped == 0 and kept >= 16 << 20  # the freed 16 MiB stays in the heap for reuse
    mapped, _, _, kept = _allocations("default")
    assert mapped == 20 and kept < 16 << 20  # twin: each its own mmap, returned when freed


@pytest.mark.slow  # starts a process
def test_kept_freed_memory_is_reused_without_page_faults():
    _, kept, probe, _ = _allocations("keep")
    _, returned, _, _ = _allocations("default")
    if probe < 16384 // 2:
        pytest.skip(f"this kernel counts {probe} minor faults for 16384 fresh pages")
    # 20 more tensors of 16 MiB reuse freed blocks (a few heap moves at most; each 4096 pages)
    assert kept <= 5 * 4096
    assert returned > 20 * 1000  # twin: each returned to the kernel, 4096 pages faulted again


def test_local_dask_workers_start_with_the_thread_and_allocator_policy():
    import dask

    task_runner(RunnerCfg("dask", 2, "", 0, 1), threads=3)
    env = dask.config.get("distributed.nanny.pre-spawn-environ")
    assert env["OMP_NUM_THREADS"] == "3"
    assert all(env[k] == v for k, v in ALLOCATOR_ENV.items())
    assert dask.config.get("distributed.worker.profile.enabled") is False  # no stack sampling
