"""The linear assignment problem (Hungarian / Jonker-Volgenant via scipy)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from deepalign.errors import DeepAlignError


def solve_lap(score: Tensor) -> Tensor:
    """Hungarian: the permutation maximising sum_i score[i, perm[i]]; (n, n) -> (n,)."""
    matrix = score.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(matrix).all():
        raise DeepAlignError("assignment scores hold NaN or inf")
    _, cols = linear_sum_assignment(matrix, maximize=True)
    return torch.as_tensor(cols, dtype=torch.long)
