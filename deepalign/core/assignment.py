"""Assignments: the linear assignment problem (Hungarian via scipy) and its Sinkhorn relaxation."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from deepalign.core.permspec import Perm
from deepalign.errors import DeepAlignError

Scores = dict[str, Tensor]  # per group (n, n): ref unit i vs other unit j, higher = more alike


def solve_lap(score: Tensor) -> Tensor:
    """Hungarian: the permutation maximising sum_i score[i, perm[i]]; (n, n) -> (n,)."""
    matrix = score.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(matrix).all():
        raise DeepAlignError("assignment scores hold NaN or inf")
    _, cols = linear_sum_assignment(matrix, maximize=True)
    return torch.as_tensor(cols, dtype=torch.long)


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
