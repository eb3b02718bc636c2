"""The thread policy (deepalign.threads) and the busy-machine benchmark it rests on."""

import psutil
import pytest
import torch

from deepalign.config import load_section
from deepalign.core.arch import mlp_arch
from deepalign.evaluation.bench import benchmark_busy, competing_process
from deepalign.evaluation.experiment import AlignCfg
from deepalign.methods import Problem
from deepalign.threads import available_cores, threads, threads_for
from deepalign.zoo.build import init_network
from flows.common import RunnerCfg, stage_runner
from flows.stages import Stage
from tests.tiny import ROOT


def test_per_pair_work_gets_the_pair_threads_and_batched_work_shares_the_cores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert available_cores() == 8
    assert threads_for("pairs", workers=4, pair_threads=1) == 1
    assert threads_for("batched", workers=4) == 2  # 8 cores among 4 workers
    assert threads_for("batched", workers=16) == 1  # never 0
    assert threads_for("batched", workers=4, threads=3) == 3  # given explicitly

    pairs, batched = Stage("a", {}, (), work="pairs"), Stage("z", {}, ())
    threads_2, dask_2 = RunnerCfg("threads", 2, "", 0, 1), RunnerCfg("dask", 2, "", 0, 1)
    assert stage_runner(pairs, threads_2) == (threads_2, 1)  # 2 tasks of 1 thread
    assert stage_runner(pairs, dask_2) == (dask_2, 1)
    one_task, n = stage_runner(batched, threads_2)  # one task on all 8 cores
    assert (one_task.workers, n) == (1, 8)
    assert stage_runner(batched, dask_2) == (dask_2, 4)  # 2 processes of 4 threads


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


def test_the_competing_process_runs_inside_the_block_only():
    me = psutil.Process()
    with competing_process():
        spinners = [c for c in me.children() if "while True" in " ".join(c.cmdline())]
        assert len(spinners) == 1 and spinners[0].status() != psutil.STATUS_ZOMBIE
    assert not [c for c in me.children() if c.is_running() and c.pid == spinners[0].pid]


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
