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

import torch
from torch import Tensor

from deepalign.core.weightspace import WeightSpace
from deepalign.errors import DeepAlignError

Perm = dict[str, Tensor]


@dataclass(frozen=True)
class Axis:
    """One tensor axis a group permutes; `block` entries per permuted unit.

    `block` is 1 except where a flatten turned channels into features: the Linear after it sees
    channel c as the `h * w` features [c*h*w, (c+1)*h*w).
    """

    key: str  # the tensor's state_dict key
    axis: int  # of the unbatched tensor
    block: int = 1


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

    def acting(self, group: str) -> Iterator[tuple[str, int, int]]:
        """(key, axis, block) for every tensor axis that `group` permutes."""
        for ax in self.members[group]:
            yield ax.key, ax.axis, ax.block

    def keys(self) -> set[str]:
        """Every tensor some group permutes."""
        return {ax.key for axes in self.members.values() for ax in axes}

    def check(self, ws: WeightSpace) -> None:
        """Refuse a network whose tensors do not have the axes this spec permutes."""
        shapes = ws.shapes()
        for group, n in self.sizes.items():
            for key, axis, block in self.acting(group):
                if key not in shapes:
                    raise DeepAlignError(f"group {group} permutes '{key}', which is missing")
                shape = shapes[key]
                if axis >= len(shape) or shape[axis] != n * block:
                    raise DeepAlignError(
                        f"group {group} permutes axis {axis} of '{key}' {shape} as {n} units "
                        f"of {block}"
                    )


def _block_index(perm: Tensor, block: int) -> Tensor:
    """Expand unit indices to feature indices: (..., n) -> (..., n * block)."""
    if block == 1:
        return perm
    offsets = torch.arange(block, device=perm.device)
    return (perm.unsqueeze(-1) * block + offsets).flatten(-2)


def _take(t: Tensor, axis: int, index: Tensor, batched: bool) -> Tensor:
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
    out = dict(ws.named)
    for group in spec.groups:
        for key, axis, block in spec.acting(group):
            index = _block_index(perm[group], block)
            out[key] = _take(out[key], axis, index, ws.is_batched)
    return ws.replace(out.values())


def _mix(t: Tensor, axis: int, mat: Tensor, block: int, batched: bool) -> Tensor:
    """new[..., i, ...] = sum_j mat[i, j] * t[..., j, ...] along `axis` in blocks."""
    dim = axis + int(batched)
    moved = t.movedim(dim, -1)  # (..., n*block)
    moved = moved.unflatten(-1, (-1, block))  # (..., n, block)
    pattern = "bij,b...jk->b...ik" if batched else "ij,...jk->...ik"
    mixed = torch.einsum(pattern, mat, moved)
    return mixed.flatten(-2).movedim(-1, dim)


def apply_soft_permutation(ws: WeightSpace, mats: dict[str, Tensor], spec: PermSpec) -> WeightSpace:
    """Apply (doubly-stochastic) matrices P, (n, n) or (B, n, n): rows P @ W, columns W @ P.T.

    With P = perm_to_matrix(perm) this equals `apply_permutation(ws, perm, spec)`.
    """
    out = dict(ws.named)
    for group in spec.groups:
        for key, axis, block in spec.acting(group):
            out[key] = _mix(out[key], axis, mats[group], block, ws.is_batched)
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
