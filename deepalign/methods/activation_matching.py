"""Activation matching (Git Re-Basin 3.1; Tatro et al. 2020's correlation-based alignment).

Per hidden group, statistics of the two networks' unit activations are streamed over the
training split in float64; conv channels count each spatial position as a sample. Each
group is then one assignment problem, independent of the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor

from deepalign.config import Count, Positive, one_of
from deepalign.core.arch import as_input
from deepalign.core.permspec import Perm
from deepalign.errors import DeepAlignError
from deepalign.methods.problem import Problem, solve_lap

STATISTICS = ("correlation", "inner_product")


@dataclass(frozen=True)
class ActivationMatchingCfg:
    statistic: Annotated[str, one_of(*STATISTICS)]  # correlation (Tatro) | inner_product
    batch_size: Positive  # images per forward pass while streaming statistics
    max_examples: Count  # cap on training images used (0: all)


def _units_as_columns(act: Tensor) -> Tensor:
    """(N, n) or (N, C, *space) -> (samples, n) in float64."""
    if act.ndim > 2:
        act = act.movedim(1, -1).flatten(0, -2)
    return act.double()


class _Moments:
    """Running sums for the cross-correlation of two sets of units."""

    def __init__(self, n: int) -> None:
        self.count = 0
        self.sum_a, self.sum_b = (
            torch.zeros(n, dtype=torch.float64),
            torch.zeros(n, dtype=torch.float64),
        )
        self.sq_a, self.sq_b = (
            torch.zeros(n, dtype=torch.float64),
            torch.zeros(n, dtype=torch.float64),
        )
        self.cross = torch.zeros(n, n, dtype=torch.float64)

    def add(self, a: Tensor, b: Tensor) -> None:  # (samples, n) each
        self.count += a.shape[0]
        self.sum_a += a.sum(0)
        self.sum_b += b.sum(0)
        self.sq_a += (a * a).sum(0)
        self.sq_b += (b * b).sum(0)
        self.cross += a.T @ b

    def score(self, statistic: str) -> Tensor:
        """(n, n): score[i, j] between unit i of ref and unit j of other."""
        if statistic == "inner_product":
            return self.cross / self.count
        mean_a, mean_b = self.sum_a / self.count, self.sum_b / self.count
        cov = self.cross / self.count - torch.outer(mean_a, mean_b)
        std_a = (self.sq_a / self.count - mean_a**2).clamp_min(0).sqrt()
        std_b = (self.sq_b / self.count - mean_b**2).clamp_min(0).sqrt()
        return cov / (torch.outer(std_a, std_b) + 1e-12)


@torch.no_grad()
def activation_scores(problem: Problem, cfg: ActivationMatchingCfg) -> dict[str, Tensor]:
    """Per group, the (n, n) statistic between ref's and other's hidden units."""
    if cfg.statistic not in STATISTICS:
        raise DeepAlignError(
            f"unknown statistic '{cfg.statistic}' (known: {', '.join(STATISTICS)})"
        )
    arch, data = problem.needs_data("activation_matching")
    x = as_input(arch, data.x[: cfg.max_examples or None])
    moments = {g: _Moments(n) for g, n in problem.spec.sizes.items()}
    for batch in x.split(cfg.batch_size):
        taps_ref = arch.activations(problem.ref, batch)  # group -> its taps
        taps_other = arch.activations(problem.other, batch)
        for g in problem.spec.groups:  # a residual group's taps all count as its samples
            for a, b in zip(taps_ref[g], taps_other[g], strict=True):
                moments[g].add(_units_as_columns(a), _units_as_columns(b))
    return {g: m.score(cfg.statistic) for g, m in moments.items()}


def activation_matching(
    problem: Problem, cfg: ActivationMatchingCfg, init: Perm | None = None
) -> Perm:
    """One LAP per group on activation statistics (`init` is not used: the LAPs are exact)."""
    return {g: solve_lap(score) for g, score in activation_scores(problem, cfg).items()}
