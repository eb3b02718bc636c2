"""What every aligner takes: the pair, its permutation spec, and data where a method needs it."""

from __future__ import annotations

from dataclasses import dataclass

from deepalign.core.arch import Arch
from deepalign.core.assignment import solve_lap  # noqa: F401  (re-exported for aligners)
from deepalign.core.data import Split
from deepalign.core.permspec import PermSpec, perm_spec
from deepalign.core.weightspace import WeightSpace, check_same_shapes
from deepalign.errors import DeepAlignError


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
