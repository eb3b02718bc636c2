"""What one machine does with a big zoo: wall time and peak memory of building a zoo of n
networks (the zoo stage's code: train, test, one checkpoint each), of DEEP-ALIGN aligning n
pairs batched (forward passes + one Hungarian solve per group), and of weight matching on
the same pairs. Each part runs in a fresh process, so its peak resident memory is its own.
"""

from __future__ import annotations

import multiprocessing
import resource
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from deepalign.config import Name, Positive, Seed
from deepalign.core.assignment import Answer
from deepalign.core.data import DataCfg, load_dataset
from deepalign.core.weightspace import WeightSpace, stack
from deepalign.io import load_checkpoint, save_torch
from deepalign.methods import MethodsCfg, Problem, align
from deepalign.methods.learned import DeepAlignCfg, deep_align_batch
from deepalign.threads import threads
from deepalign.zoo.build import Job, NetCfg, make_arch, train_chunk


@dataclass(frozen=True)
class ScaleCfg:
    arch: Name  # the zoo architecture whose recipe the big zoos follow
    sizes: list[Positive]  # networks built, and pairs aligned, per run
    chunk_size: Positive  # networks trained at once
    pair_chunk: Positive  # pairs per DEEP-ALIGN forward pass
    seed: Seed


def peak_memory_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measured(fn: Callable[..., dict], args: tuple, n_threads: int) -> dict:
    torch.set_num_threads(n_threads)
    return fn(*args) | {"peak_memory_mb": peak_memory_mb()}


def in_fresh_process(fn: Callable[..., dict], *args: Any, n_threads: int) -> dict:
    """fn(*args) in a spawned process with `n_threads` torch threads, plus its peak memory."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        return pool.submit(_measured, fn, args, n_threads).result()


def idle() -> dict:
    """Nothing: the fresh process's own memory (interpreter, torch, deepalign)."""
    return {}


def build_zoo(net: NetCfg, data_cfg: DataCfg, n: int, cfg: ScaleCfg, out: Path) -> dict:
    """Train, test and save n networks of `net`'s recipe in chunks; their stack to out."""
    data = load_dataset(data_cfg)
    arch = make_arch(net, data)
    jobs = [Job(j, cfg.seed + j, "train", out / f"net-{j:05d}.pt") for j in range(n)]
    start = time.perf_counter()
    records = []
    for k in tqdm(range(0, n, cfg.chunk_size), desc=f"zoo of {n}", mininterval=5.0):
        chunk = jobs[k : k + cfg.chunk_size]
        fps = {j.index: "scale" for j in chunk}
        records += train_chunk(arch, chunk, data, net, fps, torch.device("cpu"), progress=False)
    seconds = time.perf_counter() - start
    nets = stack([load_checkpoint(j.path).ws for j in jobs])  # for the alignment parts
    save_torch(out / "stack.pt", dict(nets.named))
    acc = torch.tensor([r["test_acc"] for r in records])
    return {
        "networks": n,
        "seconds": seconds,
        "networks_per_s": n / seconds,
        "test_acc_mean": acc.mean().item(),
    }


def ring(n: int) -> tuple[Tensor, Tensor]:
    """Pairs (k, k + 1 mod n) of n networks: n pairs, each network in two."""
    first = torch.arange(n)
    return first, (first + 1) % n


def load_stack(stack_file: Path) -> WeightSpace:
    """The networks `build_zoo` saved, batched."""
    return WeightSpace(torch.load(stack_file, weights_only=True), batched=True)


def align_deep(
    stack_file: Path, net: NetCfg, data_cfg: DataCfg, cfg: DeepAlignCfg, pair_chunk: int
) -> dict:
    """DEEP-ALIGN on n ring pairs of the saved stack: forward passes of `pair_chunk` pairs,
    then the Hungarian solve of each pair's scores."""
    nets = load_stack(stack_file)
    arch = make_arch(net, load_dataset(data_cfg))
    first, second = ring(nets.batch_size)
    deep_align_batch(arch, nets[first[:1]], nets[second[:1]], cfg)  # loads the model
    start = time.perf_counter()
    forward = 0.0
    for k in tqdm(range(0, len(first), pair_chunk), desc="deep_align", mininterval=5.0):
        t0 = time.perf_counter()
        scores = deep_align_batch(
            arch, nets[first[k : k + pair_chunk]], nets[second[k : k + pair_chunk]], cfg
        )
        forward += time.perf_counter() - t0
        for b in range(len(next(iter(scores.values())))):
            Answer(scores={g: s[b] for g, s in scores.items()}).perm  # noqa: B018  (solves)
    seconds = time.perf_counter() - start
    n = len(first)
    return {"pairs": n, "seconds": seconds, "forward_seconds": forward, "pairs_per_s": n / seconds}


def align_wm(stack_file: Path, net: NetCfg, data_cfg: DataCfg, cfg: MethodsCfg) -> dict:
    """Weight matching on the same ring pairs, one pair at a time (1 thread per pair)."""
    nets = load_stack(stack_file)
    arch = make_arch(net, load_dataset(data_cfg))
    first, second = ring(nets.batch_size)
    start = time.perf_counter()
    with threads(1):
        for i, j in tqdm(
            list(zip(first.tolist(), second.tolist())), desc="weight_matching", mininterval=5.0
        ):
            align("weight_matching", Problem.of(nets[i], nets[j], arch), cfg)
    seconds = time.perf_counter() - start
    n = len(first)
    return {"pairs": n, "seconds": seconds, "pairs_per_s": n / seconds}
