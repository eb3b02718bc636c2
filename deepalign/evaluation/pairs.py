"""Aligning many zoo pairs with one method: pairing, planted copies, results on disk."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from deepalign.core.assignment import Answer, Scores
from deepalign.core.data import Split
from deepalign.core.lmc import planted_pair, recovery
from deepalign.core.permspec import Perm, perm_spec
from deepalign.core.weightspace import WeightSpace
from deepalign.errors import DeepAlignError
from deepalign.io import load_current, read_result, save_current
from deepalign.methods import ALIGNERS, Method, MethodsCfg, Problem, align
from deepalign.zoo.store import Zoo


@dataclass(frozen=True)
class MethodRun:
    """One method on a list of pairs: permutations (group -> (K, n)), timings, objectives."""

    method: str
    pairs: list[tuple[int, int]]
    perms: dict[str, Tensor]
    seconds: Tensor  # (K,)
    objective: Tensor  # (K,)
    planted_recovery: Tensor  # (P,) fraction of units recovered on planted copies

    def perm(self, k: int) -> Perm:
        return {g: p[k] for g, p in self.perms.items()}


def batched_answers(
    batch: Callable[[WeightSpace, WeightSpace, Any], Scores],
    zoo: Zoo,
    pairs: list[tuple[int, int]],
    settings: Any,
) -> tuple[list[Answer], float]:
    """A batchable method's answer for every pair from one call, and its seconds per pair."""
    refs = zoo.nets[torch.tensor([i for i, _ in pairs])]
    others = zoo.nets[torch.tensor([j for _, j in pairs])]
    batch(refs[:1], others[:1], settings)  # warm-up: loads the model once
    start = time.perf_counter()
    scores = batch(refs, others, settings)
    seconds = (time.perf_counter() - start) / len(pairs)
    return [Answer(scores={g: s[k] for g, s in scores.items()}) for k in range(len(pairs))], seconds


def _batched_start(
    method: Method, zoo: Zoo, pairs: list[tuple[int, int]], cfg: MethodsCfg
) -> tuple[Method, list[Answer | None], float]:
    """Run a batchable first step on all pairs at once: the rest of the chain, starts, time."""
    first = method.steps[0]
    batch = ALIGNERS[first].batch
    if batch is None:
        return method, [None] * len(pairs), 0.0
    inits, seconds = batched_answers(batch, zoo, pairs, method.settings(cfg)[first])
    return method.rest(), list(inits), seconds


def align_pairs(
    method: str | Method,
    zoo: Zoo,
    pairs: list[tuple[int, int]],
    data: Split | None,
    cfg: MethodsCfg,
    progress: bool = True,
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Run `method` on every pair: stacked perms, seconds and objectives.

    A batchable first step (DEEP-ALIGN) runs once over all pairs and its time is shared evenly;
    the rest (the Hungarian algorithm at least) runs and is timed per pair.
    """
    method = Method.parse(method)
    rest, inits, shared = _batched_start(method, zoo, pairs, cfg)
    results = []
    for (i, j), init in tqdm(
        list(zip(pairs, inits)), desc=method.name, disable=not progress, mininterval=2.0
    ):
        problem = Problem.of(zoo.nets[i], zoo.nets[j], zoo.arch, data)
        results.append(align(rest, problem, cfg, init))
    perms = {g: torch.stack([r.perm[g] for r in results]) for g in results[0].perm}
    seconds = torch.tensor([r.seconds + shared for r in results], dtype=torch.float64)
    return perms, seconds, torch.tensor([r.objective for r in results], dtype=torch.float64)


def planted_recoveries(
    method: str,
    zoo: Zoo,
    indices: list[int],
    data: Split | None,
    cfg: MethodsCfg,
    noise: float,
    seed: int,
) -> Tensor:
    """Recovery of planted permutations of perturbed copies of the given networks: (P,)."""
    gen = torch.Generator().manual_seed(seed)
    spec = perm_spec(zoo.nets[indices[0]])
    out = []
    for i in indices:
        copy, truth = planted_pair(zoo.nets[i], spec, noise, gen)
        found = align(method, Problem.of(zoo.nets[i], copy, zoo.arch, data), cfg).perm
        out.append(recovery(found, truth))
    return torch.tensor(out, dtype=torch.float64)


def save_run(path: Path, run: MethodRun, fp: str) -> None:
    blob = {
        "method": run.method,
        "pairs": [list(p) for p in run.pairs],
        "perms": run.perms,
        "seconds": run.seconds,
        "objective": run.objective,
        "planted_recovery": run.planted_recovery,
    }
    save_current(path, blob, fp)


def load_run(path: Path, fp: str | None = None) -> MethodRun | None:
    """A saved run (made with fingerprint `fp` when given), or None when missing or unreadable."""
    blob = read_result(path) if fp is None else load_current(path, fp)
    if blob is None:
        return None
    pairs = [tuple(p) for p in blob["pairs"]]
    return MethodRun(
        blob["method"],
        pairs,
        blob["perms"],
        blob["seconds"],
        blob["objective"],
        blob["planted_recovery"],
    )


def saved_run(aligned: Path, arch: str, method: str) -> MethodRun:
    """The align stage's result for one architecture and method, or an error saying how."""
    path = aligned / arch / f"{method}.pt"
    run = load_run(path)
    if run is None:
        raise DeepAlignError(
            f"{path}: missing; run the align stage with '{method}' in align.methods"
        )
    return run
