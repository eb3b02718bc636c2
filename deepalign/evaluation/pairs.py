"""Aligning many zoo pairs with one method: pairing, planted copies, results on disk."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from deepalign.core.data import Split
from deepalign.core.lmc import planted_pair, recovery
from deepalign.core.permspec import Perm
from deepalign.errors import DeepAlignError
from deepalign.io import load_current, read_result, save_current
from deepalign.methods import Method, MethodsCfg, Problem, align_all
from deepalign.zoo.store import Zoo


@dataclass(frozen=True)
class MethodRun:
    """One method on a list of pairs: permutations (group -> (K, n)), timings, objectives."""

    method: str
    pairs: list[tuple[int, int]]
    perms: dict[str, Tensor]
    seconds: Tensor  # (K,); NaN when read back (`save_run` keeps no timings)
    objective: Tensor  # (K,)
    planted_recovery: Tensor  # (P,) fraction of units recovered on planted copies

    def perm(self, k: int) -> Perm:
        return {g: p[k] for g, p in self.perms.items()}


def align_pairs(
    method: str | Method,
    zoo: Zoo,
    pairs: list[tuple[int, int]],
    data: Split | None,
    cfg: MethodsCfg,
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Run `method` on every pair: stacked perms, seconds and objectives.

    Steps that can (DEEP-ALIGN, Sinkhorn re-basin) run on all pairs at once, their time shared
    evenly; the rest (the Hungarian algorithm at least) runs and is timed per pair.
    """
    problems = [Problem.of(zoo.nets[i], zoo.nets[j], zoo.arch, _of(data, i)) for i, j in pairs]
    results = align_all(method, problems, cfg)
    perms = {g: torch.stack([r.perm[g] for r in results]) for g in results[0].perm}
    seconds = torch.tensor([r.seconds for r in results], dtype=torch.float64)
    return perms, seconds, torch.tensor([r.objective for r in results], dtype=torch.float64)


def _of(data: Split | None, i: int) -> Split | None:
    """Network i's data (its own signal's, in an INR zoo)."""
    return data.of_networks(i) if data is not None else None


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
    spec = zoo.arch.spec
    copies = [planted_pair(zoo.nets[i], spec, noise, gen) for i in indices]
    problems = [
        Problem.of(zoo.nets[i], copy, zoo.arch, _of(data, i))
        for i, (copy, _) in zip(indices, copies)
    ]
    found = align_all(method, problems, cfg)
    return torch.tensor(
        [recovery(r.perm, truth) for r, (_, truth) in zip(found, copies)], dtype=torch.float64
    )


def save_run(path: Path, run: MethodRun, fp: str) -> None:
    """Save a run without its timings, so that the same alignment writes the same bytes (the
    align stage keeps the seconds in its metrics file)."""
    blob = {
        "method": run.method,
        "pairs": [list(p) for p in run.pairs],
        "perms": run.perms,
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
        torch.full((len(pairs),), float("nan"), dtype=torch.float64),
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
