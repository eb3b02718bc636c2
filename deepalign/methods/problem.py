"""What every aligner takes: the pair, its permutation spec, and data where a method needs it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from deepalign.core.arch import Arch
from deepalign.core.assignment import solve_lap  # noqa: F401  (re-exported for aligners)
from deepalign.core.data import Split
from deepalign.core.permspec import PermSpec
from deepalign.core.weightspace import WeightSpace, check_same_shapes, stack
from deepalign.errors import DeepAlignError
from deepalign.memory import check_fits

# Bytes per entry of a group's (n, n) scores while aligning: float32 scores, scipy's float64
# copy, and the work arrays of Sinkhorn (logits, their gradient, Adam's two moments).
ASSIGNMENT_BYTES = 32


def check_assignment_memory(spec: PermSpec) -> None:
    """Refuse a pair whose widest group's score matrices cannot fit in memory, naming it."""
    if not spec.sizes:
        return
    group, n = max(spec.sizes.items(), key=lambda item: item[1])
    check_fits(ASSIGNMENT_BYTES * n * n, f"aligning group {group} ({n:,} units)")


def _stacked_data(problems: Sequence[Problem]) -> Split | None:
    """The data of stacked pairs: the first pair's (classifiers share their images), or (INR
    pairs, each fitting its own signal) every pair's targets stacked, (K, N, out)."""
    first = problems[0].data
    if first is None or first.task == "classify" or all(p.data is first for p in problems):
        return first
    if any(p.data is None or p.data.task != "regress" for p in problems):
        raise DeepAlignError("stacked pairs must share their data, or each have its targets")
    return Split(first.x, torch.stack([p.data.y for p in problems]), first.task)


@dataclass(frozen=True)
class Problem:
    """Bring `other` into `ref`'s basis: find perm with apply_permutation(other, perm) ~ ref."""

    spec: PermSpec  # the architecture's, carried along
    ref: WeightSpace
    other: WeightSpace
    arch: Arch
    data: Split | None = None  # training images for activation statistics or a task loss

    @classmethod
    def of(
        cls, ref: WeightSpace, other: WeightSpace, arch: Arch, data: Split | None = None
    ) -> Problem:
        """Both networks checked against one architecture, whose spec the problem carries."""
        check_same_shapes(ref, other, ("reference", "other"))
        spec = arch.spec
        spec.check(ref)
        check_assignment_memory(spec)
        return cls(spec, ref, other, arch, data)

    @classmethod
    def stack(cls, problems: Sequence[Problem]) -> Problem:
        """K problems of one architecture as one: `ref` and `other` batched, (K, ...) each."""
        first = problems[0]
        for k, p in enumerate(problems[1:], start=1):
            check_same_shapes(first.ref, p.ref, ("pair 0", f"pair {k}"))
        ref = stack([p.ref.detach() for p in problems])
        other = stack([p.other.detach() for p in problems])
        return cls(first.spec, ref, other, first.arch, _stacked_data(problems))

    def of_pairs(self, part: slice) -> Problem:
        """Pairs `part` of a stacked problem, with their own targets where each has some."""
        data = self.data.of_networks(part) if self.data is not None else None
        return Problem(self.spec, self.ref[part], self.other[part], self.arch, data)

    def needs_data(self, method: str) -> tuple[Arch, Split]:
        if self.data is None:
            raise DeepAlignError(
                f"method '{method}' needs data: --data digits on the command line, "
                "data='digits' (or a Dataset) in Python"
            )
        return self.arch, self.data
