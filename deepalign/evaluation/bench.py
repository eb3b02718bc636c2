"""Benchmarks: zoo training throughput, weight matching's cost against width, and seconds
per pair of each method on a quiet machine and beside a CPU-bound process."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from deepalign.core.arch import Arch
from deepalign.core.chain import mlp_arch
from deepalign.core.data import Split
from deepalign.core.weightspace import stack
from deepalign.methods import MethodsCfg, Problem, align
from deepalign.methods.weight_matching import WeightMatchingCfg, weight_matching_trace
from deepalign.threads import threads
from deepalign.zoo.build import NetCfg, init_network, train_batched, train_one


def benchmark_training(
    arch: Arch, data: Split, net: NetCfg, seeds_one: list[int], seeds_batched: list[int]
) -> dict[str, float]:
    """Networks per second of both training paths, timed in one process."""
    t0 = time.perf_counter()
    for seed in seeds_one:
        train_one(arch, init_network(arch, seed), data, net, seed)
    t1 = time.perf_counter()
    start = stack([init_network(arch, s) for s in seeds_batched])
    train_batched(arch, start, data, net, seeds_batched, torch.device("cpu"), progress=False)
    t2 = time.perf_counter()
    one, batched = len(seeds_one) / (t1 - t0), len(seeds_batched) / (t2 - t1)
    return {"one_by_one_nets_per_s": one, "batched_nets_per_s": batched, "speedup": batched / one}


def benchmark_weight_matching(widths: list[int], pairs: int, cfg: WeightMatchingCfg) -> dict:
    """Median seconds per pair and sweeps of weight matching on 64-w-w-w-10 MLPs."""
    out = {}
    for width in widths:
        arch = mlp_arch(64, [width] * 3, 10, "relu")
        seconds, sweeps = [], []
        for k in range(pairs):
            a, b = init_network(arch, 2 * k), init_network(arch, 2 * k + 1)
            start = time.perf_counter()
            _, traces = weight_matching_trace(Problem.of(a, b, arch), cfg)
            seconds.append(time.perf_counter() - start)
            sweeps.append(len(traces[0]))
        out[f"width_{width}"] = {
            "seconds_per_pair": statistics.median(seconds),
            "sweeps": statistics.median(sweeps),
        }
    return out


@contextmanager
def competing_process() -> Iterator[None]:
    """Another CPU-bound process (a Python busy loop) running for the duration of the block."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let it reach the scheduler
        yield
    finally:
        spinner.kill()
        spinner.wait()


def seconds_per_pair(method: str, problems: list[Problem], cfg: MethodsCfg) -> float:
    """Median seconds of `method` over the problems (one run each)."""
    return statistics.median(align(method, p, cfg).seconds for p in problems)


def benchmark_busy(
    methods: list[str], problems: list[Problem], cfg: MethodsCfg, thread_counts: dict[str, int]
) -> dict[str, dict[str, float]]:
    """Per method and named thread count ({'one_thread': 1, 'all_cores': 2}): median seconds
    per pair on a quiet machine, beside one busy process, and their ratio."""
    out: dict[str, dict[str, float]] = {}
    for method in methods:
        for name, n in thread_counts.items():
            with threads(n):
                idle = seconds_per_pair(method, problems, cfg)
                with competing_process():
                    busy = seconds_per_pair(method, problems, cfg)
            out.setdefault(method, {}).update(
                {
                    f"{name}_idle_s": idle,
                    f"{name}_busy_s": busy,
                    f"{name}_busy_over_idle": busy / idle,
                }
            )
    return out
