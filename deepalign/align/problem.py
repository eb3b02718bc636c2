"""What every aligner takes: the pair, its permutation spec, and data where a method needs it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from deepalign.arch import Arch
from deepalign.data import Split
from deepalign.errors import DeepAlignError
from deepalign.permspec import PermSpec, perm_spec
from deepalign.weightspace import WeightSpace, check_same_shapes


@dataclass(frozen=True)
class Problem:
    """Bring `other` into `ref`'s basis: find perm with apply_permutation(other, perm) ~ ref."""

    spec: PermSpec
    ref: WeightSpace
    other: WeightSpace
    arch: Arch | None = None  # needed by methods that run the networks
    data: Split | None = None  # training images for activation statistics or a task loss

    @classmethod
    def of(
        cls,
        ref: WeightSpace,
        other: WeightSpace,
        arch: Arch | None = None,
        data: Split | None = None,
    ) -> Problem:
        """Check that both networks share one architecture and derive the spec."""
        check_same_shapes(ref, other, ("reference", "other"))
        return cls(perm_spec(ref), ref, other, arch, data)

    def needs_data(self, method: str) -> tuple[Arch, Split]:
        if self.arch is None or self.data is None:
            raise DeepAlignError(f"method '{method}' needs data: pass --data (e.g. digits)")
        return self.arch, self.data


def solve_lap(score: Tensor) -> Tensor:
    """Hungarian: the permutation maximising sum_i score[i, perm[i]]; (n, n) -> (n,)."""
    matrix = score.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(matrix).all():
        raise DeepAlignError("assignment scores hold NaN or inf")
    _, cols = linear_sum_assignment(matrix, maximize=True)
    return torch.as_tensor(cols, dtype=torch.long)
