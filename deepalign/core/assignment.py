"""Assignments: the linear assignment problem (Hungarian via scipy) and its Sinkhorn relaxation."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from deepalign.errors import DeepAlignError

Scores = dict[str, Tensor]  # per group (n, n): ref unit i vs other unit j, higher = more alike


def solve_lap(score: Tensor) -> Tensor:
    """Hungarian: the permutation maximising sum_i score[i, perm[i]]; (n, n) -> (n,)."""
    matrix = score.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(matrix).all():
        raise DeepAlignError("assignment scores hold NaN or inf")
    _, cols = linear_sum_assignment(matrix, maximize=True)
    return torch.as_tensor(cols, dtype=torch.long)


def harden(answer: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
    """A permutation per group from an aligner's answer: Hungarian on scores (n, n),
    permutations (n,) as they are."""
    if answer is None:
        return None
    return {g: solve_lap(t) if t.ndim == 2 else t for g, t in answer.items()}


def _normalise(log_p: Tensor, iterations: int, rows_first: bool) -> Tensor:
    dims = (-1, -2) if rows_first else (-2, -1)
    for _ in range(iterations):
        for dim in dims:
            log_p = log_p - torch.logsumexp(log_p, dim=dim, keepdim=True)
    return log_p


def sinkhorn(logits: Tensor, iterations: int, tau: float = 1.0) -> Tensor:
    """Doubly-stochastic matrix from scores: (..., n, n) -> (..., n, n).

    Averages the row-first and the column-first schedules, so that
    sinkhorn(x.mT) == sinkhorn(x).mT exactly (swapping two networks transposes the result).
    """
    log_p = logits / tau
    rows = _normalise(log_p, iterations, rows_first=True).exp()
    cols = _normalise(log_p, iterations, rows_first=False).exp()
    return 0.5 * (rows + cols)
