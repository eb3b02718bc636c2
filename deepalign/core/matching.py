"""Weight-matching scores of one group (Git Re-Basin, Alg. 1), hard and soft.

score[i, j] = <ref unit i, other unit j>, summed over every parameter axis the group permutes,
with the other groups' permutations already applied to `other`. Weight matching solves a LAP
on it. `soft_group_score` takes doubly-stochastic matrices for the neighbouring groups
instead, so the score is differentiable in them and in the weights.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
from torch import Tensor

from deepalign.core.permspec import (
    Axis,
    Perm,
    PermSpec,
    apply_soft_permutation,
    runs_index,
    take,
)
from deepalign.core.weightspace import WeightSpace
from deepalign.errors import DeepAlignError


def _units_first(t: Tensor, ax: Axis, n: int, batched: bool = False) -> Tensor:
    """The group's span of the axis (of the unbatched tensor) first, the rest flattened:
    (n, m), or (B, n, m)."""
    dim = ax.axis + int(batched)
    span = t.narrow(dim, ax.offset, n * ax.block)
    if batched:
        return span.movedim(dim, 1).reshape(t.shape[0], n, -1)
    return span.movedim(dim, 0).reshape(n, -1)


def group_score(spec: PermSpec, ref: WeightSpace, other_fixed: WeightSpace, group: str) -> Tensor:
    """score[i, j] = <ref unit i, other unit j> over every parameter `group` touches: (n, n)
    in float64 (running statistics are permuted with their channel but not matched).

    `other_fixed` has every permutation but `group`'s already applied.
    """
    n = spec.sizes[group]
    score = torch.zeros(n, n, dtype=torch.float64)
    for ax in spec.acting(group):
        if ax.key in ref.buffers:
            continue
        a = _units_first(ref.named[ax.key], ax, n).double()
        b = _units_first(other_fixed.named[ax.key], ax, n).double()
        score += a @ b.T
    return score


class Scorer:
    """`group_score` of one group at a time with every other group's permutation applied to
    `other`, for coordinate descent (weight matching): only the tensors the group touches
    are permuted, and a large tensor's share of the score is kept while the permutations of
    its other axes stay as they were (a 4096 x 25088 Linear is one matrix product per change
    of the convolution before it, not one per sweep)."""

    CACHED = 1 << 27  # multiply-adds from which a share is computed in float32 and kept

    def __init__(self, spec: PermSpec, ref: WeightSpace, other: WeightSpace) -> None:
        self.spec, self.ref, self.other = spec, ref, other
        self.order = {g: i for i, g in enumerate(spec.groups)}
        self.runs: dict[str, list[tuple[str, Axis]]] = {}  # key -> (group, axis), spec order
        for g in spec.groups:
            for ax in spec.acting(g):
                self.runs.setdefault(ax.key, []).append((g, ax))
        self.depends = {  # group -> itself and every group sharing a tensor with it
            g: tuple(dict.fromkeys(h for ax in spec.acting(g) for h, _ in self.runs[ax.key]))
            for g in spec.groups
        }
        self.kept: dict[tuple[str, Axis], tuple[list[Tensor], Tensor]] = {}
        self.refs: dict[tuple[str, Axis], Tensor] = {}  # ref's units (`_ref_units`)
        self.sums: dict[int, Tensor] = {}  # n -> (n, n) float64 (`_summed`)

    def score(self, perm: Perm, group: str) -> Tensor:
        """(n, n) float64, equal to `group_score(spec, ref, apply(other, perm | {group: id}))`.
        Read-only and valid until the next call: it may be a kept share or a reused sum."""
        n = self.spec.sizes[group]
        shares = [
            self._share(perm, group, ax, n)
            for ax in self.spec.acting(group)
            if ax.key not in self.ref.buffers
        ]
        if not shares:
            return torch.zeros(n, n, dtype=torch.float64)
        if len(shares) == 1:
            return shares[0]
        score = torch.add(shares[0], shares[1], out=self._summed(n))  # kept shares stay as are
        for share in shares[2:]:
            score.add_(share)
        return score

    def _summed(self, n: int) -> Tensor:
        """The (n, n) float64 a score of n units is summed into, one per size for the scorer's
        life (a fresh 4096 x 4096 costs more in page faults than in adding): read-only, valid
        until the next `score` of that size."""
        if n not in self.sums:
            self.sums[n] = torch.empty(n, n, dtype=torch.float64)
        return self.sums[n]

    def _ref_units(self, group: str, ax: Axis, n: int) -> Tensor:
        """ref's units of the run, (n, m): float64, or the tensor's own dtype for a large share
        (float64 copies of a VGG's 4096 x 25088 layer are 0.8 GB and seconds per sweep)."""
        a = self.refs.get((group, ax))
        if a is None:
            a = _units_first(self.ref.named[ax.key], ax, n)
            a = a if n * a.numel() >= self.CACHED else a.double()
            self.refs[(group, ax)] = a
        return a

    def _share(self, perm: Perm, group: str, ax: Axis, n: int) -> Tensor:
        others = [(g, a) for g, a in self.runs[ax.key] if g != group]
        used = [perm[g] for g, _ in others]
        kept = self.kept.get((group, ax))
        if kept is not None:
            if all(torch.equal(p, q) for p, q in zip(kept[0], used)):
                return kept[1]
            if self._few_moved(ax, others, kept[0], used):  # a Linear's or Conv's input
                share = kept[1].add_(self._moved_inputs(ax, n, others[0][1], kept[0][0], used[0]))
                self.kept[(group, ax)] = (used, share)
                return share
        nested = [i for i, (g, a) in enumerate(others) if self._inside(g, a, group, ax)]
        by_axis: dict[int, list[tuple[Axis, Tensor]]] = {ax.axis: []}
        for i, ((_, a), p) in enumerate(zip(others, used)):
            if i not in nested:
                by_axis.setdefault(a.axis, []).append((a, p))
        t = self._span_of(self.other.named[ax.key], ax, n, by_axis.pop(ax.axis))
        for axis, runs in by_axis.items():
            t = take(t, axis, runs_index(runs, t.shape[axis]), batched=False)
        here = ax._replace(offset=0)  # t holds the group's span of the axis alone
        a = self._ref_units(group, ax, n)
        if nested:
            runs = [
                (b._replace(offset=b.offset - ax.offset), p)
                for b, p in ((others[i][1], used[i]) for i in nested)
            ]
            share = self._nested_share(a, t, here, n, runs)
        else:
            share = (a @ _units_first(t, here, n).to(a.dtype).T).double()
        if n * n * a.shape[1] >= self.CACHED:
            self.kept[(group, ax)] = (used, share)  # weight matching replaces, never edits, perms
        return share

    def _few_moved(
        self, ax: Axis, others: list[tuple[str, Axis]], before: list[Tensor], now: list[Tensor]
    ) -> bool:
        """Whether a kept share is cheaper updated than recomputed: the tensor's one other run
        is on another axis (a Linear's or Conv's input) and under half its units moved."""
        if len(others) != 1 or others[0][1].axis == ax.axis:
            return False
        return 2 * int((before[0] != now[0]).sum()) < len(now[0])

    def _moved_inputs(self, ax: Axis, n: int, other: Axis, before: Tensor, now: Tensor) -> Tensor:
        """What a kept share gains when only the units of the tensor's other axis that moved
        (before -> now) are read anew: far fewer than all once weight matching settles."""
        moved = (before != now).nonzero().squeeze(1)  # (k,) units of the other group
        offsets = torch.arange(other.block)
        entries = (moved.unsqueeze(1) * other.block + offsets + other.offset).flatten()
        source = self.other.named[ax.key].narrow(ax.axis, ax.offset, n * ax.block)
        ref = self.ref.named[ax.key].narrow(ax.axis, ax.offset, n * ax.block)
        length = source.shape[other.axis]
        was = runs_index([(other, before)], length)[entries]
        is_ = runs_index([(other, now)], length)[entries]
        here = ax._replace(offset=0)
        gain = source.index_select(other.axis, is_) - source.index_select(other.axis, was)
        a = _units_first(ref.index_select(other.axis, entries), here, n)  # (n, k * block * ...)
        return a @ _units_first(gain, here, n).to(a.dtype).T  # (n, n), added to float64

    @staticmethod
    def _span_of(t: Tensor, ax: Axis, n: int, runs: list[tuple[Axis, Tensor]]) -> Tensor:
        """The entries of `ax`'s span as they stand after the other runs of the same axis."""
        length, span = t.shape[ax.axis], n * ax.block
        if not runs:
            return t.narrow(ax.axis, ax.offset, span)
        index = runs_index(runs, length)[ax.offset : ax.offset + span]
        return t.index_select(ax.axis, index)

    def _inside(self, g: str, a: Axis, group: str, ax: Axis) -> bool:
        """Whether group g's run lies inside one unit of `group`'s run of the same axis and is
        applied after it (a conv group's units inside a permutation of whole groups)."""
        if a.axis != ax.axis or self.order[g] < self.order[group]:
            return False
        start, size = a.offset - ax.offset, self.spec.sizes[g] * a.block
        return 0 <= start < self.spec.sizes[group] * ax.block and (
            start // ax.block == (start + size - 1) // ax.block
        )

    def _nested_share(
        self, a: Tensor, t: Tensor, ax: Axis, n: int, nested: list[tuple[Axis, Tensor]]
    ) -> Tensor:
        """score[u, v] = <ref unit u, other unit v with the nested permutations at position u>:
        with whole units moved first, the runs nested in position u permute whichever unit
        lands there."""
        blocks = t.narrow(ax.axis, ax.offset, n * ax.block).unflatten(ax.axis, (n, ax.block))
        share = torch.empty(n, n, dtype=torch.float64)
        for u in range(n):
            here = [
                (b._replace(offset=b.offset - ax.offset - u * ax.block), p)
                for b, p in nested
                if (b.offset - ax.offset) // ax.block == u
            ]
            moved = blocks
            if here:
                moved = blocks.index_select(ax.axis + 1, runs_index(here, ax.block))
            units = moved.movedim((ax.axis, ax.axis + 1), (0, 1)).reshape(n, -1).to(a.dtype)
            share[u] = (a[u] @ units.T).double()
        return share


def _neighbours(spec: PermSpec, group: str, keys: set[str]) -> PermSpec:
    """The spec of the other groups, restricted to the tensors `keys`."""
    members: dict[str, tuple[Axis, ...]] = {}
    for g, axes in spec.members.items():
        kept = tuple(ax for ax in axes if ax.key in keys)
        if g != group and kept:
            members[g] = kept
    return PermSpec(members, {g: spec.sizes[g] for g in members})


def _batched_matrix(mat: Tensor, group: str, ws: WeightSpace) -> Tensor:
    """A group's matrix laid out for `ws`: (n, n), or (B, n, n) for batched networks."""
    if not ws.is_batched and mat.ndim == 3:
        raise DeepAlignError(
            f"soft matrix of group {group} is batched {tuple(mat.shape)}, the networks are not"
        )
    if ws.is_batched and mat.ndim == 2:
        return mat.expand(ws.batch_size, *mat.shape)
    return mat


def soft_group_score(
    spec: PermSpec,
    ref: WeightSpace,
    other: WeightSpace,
    group: str,
    soft: Mapping[str, Tensor],
) -> Tensor:
    """score[i, j] = <ref unit i, unit j of P#other> over every parameter `group` touches, P
    the neighbouring groups' matrices `soft` ((n, n), or (B, n, n) with batched networks) and
    `group` itself left unpermuted: (n, n) or (B, n, n), in the inputs' promoted dtype.

    Differentiable in `soft`, `ref` and `other`; equals `group_score` for one-hot matrices.
    """
    keys = [ax.key for ax in spec.acting(group) if ax.key not in ref.buffers]
    near = _neighbours(spec, group, set(keys))
    missing = [g for g in near.groups if g not in soft]
    if missing:
        raise DeepAlignError(f"soft_group_score of {group}: no matrix for group {missing[0]}")
    mats = {g: _batched_matrix(soft[g], g, other) for g in near.groups}
    inputs = [*(ref.named[k] for k in keys), *(other.named[k] for k in keys), *mats.values()]
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in inputs))
    part = WeightSpace({k: other.named[k].to(dtype) for k in keys}, batched=other.is_batched)
    fixed = apply_soft_permutation(part, {g: m.to(dtype) for g, m in mats.items()}, near)
    n, batched = spec.sizes[group], ref.is_batched
    score = None
    for ax in spec.acting(group):
        if ax.key in ref.buffers:
            continue
        a = _units_first(ref.named[ax.key].to(dtype), ax, n, batched)  # (n, m) or (B, n, m)
        b = _units_first(fixed.named[ax.key], ax, n, batched)
        score = a @ b.mT if score is None else score + a @ b.mT
    return score
