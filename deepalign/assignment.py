"""The linear assignment problem (Hungarian / Jonker-Volgenant via scipy)."""

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
