"""Assignments: the linear assignment problem (scipy's Hungarian, lapx's Jonker-Volgenant for large
layers) and its Sinkhorn relaxation."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import lap
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from deepalign.core.permspec import Perm
from deepalign.errors import DeepAlignError

Scores = dict[str, Tensor]  # per group (n, n): ref unit i vs other unit j, higher = more alike


LARGE = 2048  # units from which `solve_lap` uses lapx's float32 Jonker-Volgenant kernel


def solve_lap(score: Tensor) -> Tensor:
    """The permutation maximising sum_i score[i, perm[i]]; (n, n) -> (n,).

    scipy's exact float64 Hungarian below `LARGE` units; from there lapx's Jonker-Volgenant
    kernel on the row-reduced costs in float32, 2-4x faster at 4096 units (a VGG's or an
    AlexNet's classifier, ~180 assignments per alignment), with the same answer on every
    matrix measured (`deepalign.evaluation.lap_check`). Float32 may pick another permutation
    only where two differ by less than about 1e-7 of a row's spread.
    """
    matrix = score.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(matrix).all():
        raise DeepAlignError("assignment scores hold NaN or inf")
    if matrix.shape[0] >= LARGE and matrix.shape[0] == matrix.shape[1]:
        return torch.as_tensor(solve_large_lap(matrix), dtype=torch.long)
    _, cols = linear_sum_assignment(matrix, maximize=True)
    return torch.as_tensor(cols, dtype=torch.long)


def solve_large_lap(matrix: np.ndarray) -> np.ndarray:
    """lapx's Jonker-Volgenant on costs = row max - score (every row's best costs 0, which
    keeps float32's precision for the differences that decide): (n, n) -> (n,) columns."""
    costs = matrix.max(axis=1, keepdims=True) - matrix  # (n, n) >= 0
    cols, _ = lap.lapjvs(costs, return_cost=False, jvx_like=False)
    return np.asarray(cols)


@dataclass(frozen=True)
class Answer:
    """What every aligner returns for one pair, and the start the next step of a chain gets:
    a permutation per group (n,), or the scores {g: (n, n)} it comes from. From scores the
    permutation is their Hungarian solution, solved on first use (so it is timed where used);
    a step that can start from scores (Sinkhorn) reads `scores`, every other step `perm`."""

    hard: Perm | None = None
    scores: Scores | None = None

    def __post_init__(self) -> None:
        if (self.hard is None) == (self.scores is None):
            raise DeepAlignError("an answer holds either a permutation or scores")

    @cached_property
    def perm(self) -> Perm:
        if self.hard is not None:
            return self.hard
        return {g: solve_lap(s) for g, s in self.scores.items()}  # type: ignore[union-attr]


def _normalise(log_p: Tensor, iterations: int, rows_first: bool) -> Tensor:
    dims = (-1, -2) if rows_first else (-2, -1)
    for _ in range(iterations):
        for dim in dims:
            log_p = log_p - torch.logsumexp(log_p, dim=dim, keepdim=True)
    return log_p


def sinkhorn_groups(logits: Scores, iterations: int, tau: float = 1.0) -> Scores:
    """`sinkhorn` of every group's (..., n, n) logits, groups of one shape in one call."""
    shapes: dict[tuple[int, ...], list[str]] = {}
    for g, lg in logits.items():
        shapes.setdefault(tuple(lg.shape), []).append(g)
    out = {}
    for groups in shapes.values():
        soft = sinkhorn(torch.stack([logits[g] for g in groups]), iterations, tau)
        out |= dict(zip(groups, soft.unbind(0)))
    return {g: out[g] for g in logits}


def sinkhorn(logits: Tensor, iterations: int, tau: float = 1.0) -> Tensor:
    """Doubly-stochastic matrix from scores: (..., n, n) -> (..., n, n).

    Averages the row-first and the column-first schedules, so that
    sinkhorn(x.mT) == sinkhorn(x).mT exactly (swapping two networks transposes the result).
    """
    log_p = logits / tau
    rows = _normalise(log_p, iterations, rows_first=True).exp()
    cols = _normalise(log_p, iterations, rows_first=False).exp()
    return 0.5 * (rows + cols)
