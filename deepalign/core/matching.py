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

from deepalign.core.permspec import Axis, PermSpec, apply_soft_permutation
from deepalign.core.weightspace import WeightSpace
from deepalign.errors import DeepAlignError


def _units_first(t: Tensor, axis: int, n: int, batched: bool = False) -> Tensor:
    """Move `axis` (of the unbatched tensor) first and flatten the rest: (n, m), or (B, n, m)."""
    if batched:
        return t.movedim(axis + 1, 1).reshape(t.shape[0], n, -1)
    return t.movedim(axis, 0).reshape(n, -1)


def group_score(spec: PermSpec, ref: WeightSpace, other_fixed: WeightSpace, group: str) -> Tensor:
    """score[i, j] = <ref unit i, other unit j> over every parameter `group` touches: (n, n)
    in float64 (running statistics are permuted with their channel but not matched).

    `other_fixed` has every permutation but `group`'s already applied.
    """
    n = spec.sizes[group]
    score = torch.zeros(n, n, dtype=torch.float64)
    for key, axis, _block in spec.acting(group):
        if key in ref.buffers:
            continue
        a = _units_first(ref.named[key], axis, n).double()
        b = _units_first(other_fixed.named[key], axis, n).double()
        score += a @ b.T
    return score


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
    keys = [key for key, _, _ in spec.acting(group) if key not in ref.buffers]
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
    for key, axis, _block in spec.acting(group):
        if key in ref.buffers:
            continue
        a = _units_first(ref.named[key].to(dtype), axis, n, batched)  # (n, m) or (B, n, m)
        b = _units_first(fixed.named[key], axis, n, batched)
        score = a @ b.mT if score is None else score + a @ b.mT
    return score
