"""Permutation specs as data, and the one generic way to apply a permutation.

A permutation is a dict `group -> LongTensor` of shape (n,) (or (B, n) for a batch).
Convention: after `apply_permutation(ws, perm, spec)`, hidden unit i of group g is unit
`perm[g][i]` of `ws`. So to bring `other` into `ref`'s basis, `perm[g][i]` names the unit of
`other` that matches unit i of `ref`. As a matrix, P[i, perm[i]] = 1 and the permuted
weight is P @ W (rows) and W @ P.T (columns).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from deepalign.core.weightspace import WeightSpace
from deepalign.errors import DeepAlignError

Perm = dict[str, Tensor]


class Axis(NamedTuple):
    """One tensor axis a group permutes: its `n` units own the entries
    [offset, offset + n * block) of that axis, `block` contiguous entries per unit.

    `block` is 1 except where a flatten turned channels into features (the Linear after it sees
    channel c as the `h * w` features [c*h*w, (c+1)*h*w)) or where a grouped convolution
    permutes whole groups of channels. `offset` is 0 except where the axis is a concatenation
    of several groups' units (DenseNet, Inception) or one group of a grouped convolution.
    """

    key: str  # the tensor's state_dict key
    axis: int  # of the unbatched tensor
    block: int = 1
    offset: int = 0  # first entry of the axis this group permutes


@dataclass(frozen=True)
class PermSpec:
    """Which hidden permutation acts on which axis of which tensor: a network's symmetry as
    data, made once where the network is described (`deepalign.core.trace`) and carried with
    it; nothing re-derives it from shapes."""

    members: Mapping[str, tuple[Axis, ...]]  # group -> every axis it permutes
    sizes: Mapping[str, int]  # group -> number of units it permutes

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(self.sizes)

    def acting(self, group: str) -> Iterator[Axis]:
        """(key, axis, block, offset) for every tensor axis that `group` permutes."""
        yield from self.members[group]

    def keys(self) -> set[str]:
        """Every tensor some group permutes."""
        return {ax.key for axes in self.members.values() for ax in axes}

    def check(self, ws: WeightSpace) -> None:
        """Refuse a network whose tensors do not have the axes this spec permutes."""
        shapes = ws.shapes()
        for group, n in self.sizes.items():
            for key, axis, block, offset in self.acting(group):
                if key not in shapes:
                    raise DeepAlignError(f"group {group} permutes '{key}', which is missing")
                shape = shapes[key]
                whole = offset == 0 and not self.shares(key, axis)
                if axis >= len(shape) or (
                    shape[axis] != n * block if whole else shape[axis] < offset + n * block
                ):
                    raise DeepAlignError(
                        f"group {group} permutes axis {axis} of '{key}' {shape} as {n} units "
                        f"of {block} from entry {offset}"
                    )

    def shares(self, key: str, axis: int) -> bool:
        """Whether several groups permute parts of this axis (concatenation, conv groups)."""
        return (
            sum(ax.key == key and ax.axis == axis for g in self.groups for ax in self.members[g])
            > 1
        )


def _block_index(perm: Tensor, block: int) -> Tensor:
    """Expand unit indices to feature indices: (..., n) -> (..., n * block)."""
    if block == 1:
        return perm
    offsets = torch.arange(block, device=perm.device)
    return (perm.unsqueeze(-1) * block + offsets).flatten(-2)


def _axis_index(perm: Tensor, ax: Axis, length: int) -> Tensor:
    """Entry indices of a whole axis of `length` with the group's span permuted: (..., length)."""
    span = _block_index(perm, ax.block) + ax.offset  # (..., n * block)
    if ax.offset == 0 and span.shape[-1] == length:
        return span
    full = torch.arange(length, device=perm.device).expand(*perm.shape[:-1], length).clone()
    full[..., ax.offset : ax.offset + span.shape[-1]] = span
    return full


def take(t: Tensor, axis: int, index: Tensor, batched: bool) -> Tensor:
    """Gather `index` along `axis` (of the unbatched tensor); index (n,) or (B, n)."""
    dim = axis + int(batched)
    if index.ndim == 1:
        return t.index_select(dim, index)
    moved = t.movedim(dim, 1)  # (B, n, ...)
    rows = torch.arange(t.shape[0], device=t.device).unsqueeze(1)
    return moved[rows, index].movedim(1, dim)


def _check_perm(spec: PermSpec, perm: Perm) -> None:
    missing = set(spec.groups) - set(perm)
    if missing:
        raise DeepAlignError(f"permutation lacks groups {sorted(missing)}")
    for g, n in spec.sizes.items():
        if perm[g].shape[-1] != n:
            raise DeepAlignError(f"permutation of group {g} has {perm[g].shape[-1]} units, not {n}")


def apply_permutation(ws: WeightSpace, perm: Perm, spec: PermSpec) -> WeightSpace:
    """Permute the hidden units of `ws` (batched or not) by index permutations."""
    _check_perm(spec, perm)
    runs: dict[tuple[str, int], list[tuple[Axis, Tensor]]] = {}
    for group in spec.groups:  # in order: nested runs (conv groups) apply after the outer one
        for ax in spec.acting(group):
            runs.setdefault((ax.key, ax.axis), []).append((ax, perm[group]))
    out = dict(ws.named)
    for (key, axis), found in runs.items():
        length = out[key].shape[axis + int(ws.is_batched)]
        out[key] = take(out[key], axis, runs_index(found, length), ws.is_batched)
    return ws.replace(out.values())


def _span(ax: Axis, p: Tensor) -> tuple[int, int]:
    return ax.offset, ax.offset + p.shape[-1] * ax.block


def _layers(runs: list[tuple[Axis, Tensor]]) -> list[list[tuple[Axis, Tensor]]]:
    """The runs in order, cut where a run may overlap the ones before it in the same layer:
    runs of one layer lie side by side (a concatenation, the groups of a grouped convolution).
    Cutting more often than needed is only slower: runs side by side commute."""
    layers: list[list[tuple[Axis, Tensor]]] = []
    low = high = 0  # the span the last layer covers
    for ax, p in runs:
        start, end = _span(ax, p)
        if layers and (start >= high or end <= low):
            layers[-1].append((ax, p))
            low, high = min(low, start), max(high, end)
        else:
            layers.append([(ax, p)])
            low, high = start, end
    return layers


def runs_index(runs: list[tuple[Axis, Tensor]], length: int) -> Tensor:
    """One gather index for every group's run of one axis, (length,) or (B, length): runs side
    by side written into one index, nested runs (conv groups inside a permutation of whole
    groups) composed in order."""
    index = None
    for layer in _layers(runs):
        if len(layer) == 1:
            step = _axis_index(layer[0][1], layer[0][0], length)
        else:
            batch = torch.broadcast_shapes(*(p.shape[:-1] for _, p in layer))
            step = torch.arange(length, device=layer[0][1].device).expand(*batch, length).clone()
            for ax, p in layer:
                span = _block_index(p, ax.block) + ax.offset
                step[..., ax.offset : ax.offset + span.shape[-1]] = span
        if index is None:
            index = step
        else:  # index[step] along the last axis
            shape = torch.broadcast_shapes(index.shape, step.shape)
            index = torch.gather(index.expand(shape), -1, step.expand(shape))
    return index


def _mix(t: Tensor, ax: Axis, mat: Tensor, batched: bool) -> Tensor:
    """new[..., i, ...] = sum_j mat[i, j] * t[..., j, ...] along the group's span of the axis,
    in blocks; the rest of the axis unchanged."""
    dim, span = ax.axis + int(batched), mat.shape[-1] * ax.block
    moved = t.narrow(dim, ax.offset, span).movedim(dim, -1)  # (..., n*block)
    moved = moved.unflatten(-1, (-1, ax.block))  # (..., n, block)
    pattern = "bij,b...jk->b...ik" if batched else "ij,...jk->...ik"
    mixed = torch.einsum(pattern, mat, moved).flatten(-2).movedim(-1, dim)
    if span == t.shape[dim]:
        return mixed
    after = t.shape[dim] - ax.offset - span
    return torch.cat(
        [t.narrow(dim, 0, ax.offset), mixed, t.narrow(dim, ax.offset + span, after)], dim
    )


def apply_soft_permutation(ws: WeightSpace, mats: dict[str, Tensor], spec: PermSpec) -> WeightSpace:
    """Apply (doubly-stochastic) matrices P, (n, n) or (B, n, n): rows P @ W, columns W @ P.T.

    With P = perm_to_matrix(perm) this equals `apply_permutation(ws, perm, spec)`.
    """
    out = dict(ws.named)
    for group in spec.groups:
        for ax in spec.acting(group):
            out[ax.key] = _mix(out[ax.key], ax, mats[group], ws.is_batched)
    return ws.replace(out.values())


def perm_to_matrix(perm: Perm) -> dict[str, Tensor]:
    """Index permutations to 0/1 matrices with P[i, perm[i]] = 1: (n,) -> (n, n)."""
    return {
        g: torch.nn.functional.one_hot(p, p.shape[-1]).to(torch.get_default_dtype())
        for g, p in perm.items()
    }


def invert(perm: Perm) -> Perm:
    """The permutation that undoes `perm`."""
    return {g: torch.argsort(p, dim=-1) for g, p in perm.items()}


def compose(first: Perm, second: Perm) -> Perm:
    """apply(apply(ws, first), second) == apply(ws, compose(first, second))."""
    return {g: torch.gather(first[g], -1, second[g]) for g in first}


def identity(spec: PermSpec, batch: int | None = None) -> Perm:
    shape = (batch,) if batch else ()
    return {g: torch.arange(n).expand(*shape, n).clone() for g, n in spec.sizes.items()}


def random_permutation(
    spec: PermSpec, generator: torch.Generator | None = None, batch: int | None = None
) -> Perm:
    """Uniformly random permutation per group ((B, n) per group when `batch` is set)."""
    shape = (batch,) if batch else ()
    return {
        g: torch.rand(*shape, n, generator=generator).argsort(dim=-1) for g, n in spec.sizes.items()
    }
