"""Benchmarks: zoo training throughput, and weight matching's cost against width."""

from __future__ import annotations

import statistics
import time

import torch

from deepalign.core.arch import Arch, mlp_arch
from deepalign.core.data import Split
from deepalign.core.weightspace import stack
from deepalign.methods import Problem
from deepalign.methods.weight_matching import WeightMatchingCfg, weight_matching_trace
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
