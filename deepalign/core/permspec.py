"""Permutation specs as data, and the one generic way to apply a permutation.

A permutation is a dict `group -> LongTensor` of shape (n,) (or (B, n) for a batch).
Convention: after `apply_permutation(ws, perm)`, hidden unit i of group g is unit
`perm[g][i]` of `ws`. So to bring `other` into `ref`'s basis, `perm[g][i]` names the unit of
`other` that matches unit i of `ref`. As a matrix, P[i, perm[i]] = 1 and the permuted
weight is P @ W (rows) and W @ P.T (columns).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from deepalign.core.weightspace import WeightSpace
from deepalign.errors import DeepAlignError

Perm = dict[str, Tensor]
Slot = tuple[str, int]  # ("w", layer) or ("b", layer)


@dataclass(frozen=True)
class AxisPerm:
    """A hidden permutation acting on one tensor axis; `block` units per permuted index.

    `block` is 1 except on the Linear after Flatten, where channel c owns the `h * w`
    flattened features [c*h*w, (c+1)*h*w).
    """

    group: str
    block: int = 1


@dataclass(frozen=True)
class PermSpec:
    """Which hidden permutation acts on which axis of which (unbatched) tensor."""

    axes: dict[Slot, tuple[AxisPerm | None, ...]]
    sizes: dict[str, int]  # group -> number of units it permutes

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(self.sizes)

    def acting(self, group: str) -> Iterator[tuple[Slot, int, int]]:
        """(slot, axis, block) for every tensor axis that `group` permutes."""
        for slot, axes in self.axes.items():
            for axis, ap in enumerate(axes):
                if ap is not None and ap.group == group:
                    yield slot, axis, ap.block


def _group(layer: int, n_layers: int) -> str | None:
    """Group of layer `layer`'s output units: hidden layers only."""
    return f"h{layer}" if 0 <= layer < n_layers - 1 else None


def _flatten_block(shapes: tuple[tuple[int, ...], ...], layer: int) -> int:
    """Features per input unit of `layer`: h*w after conv -> flatten -> linear, else 1."""
    units_in, features_in = shapes[layer - 1][0], shapes[layer][1]
    if features_in % units_in:
        raise DeepAlignError(
            f"layer {layer} takes {features_in} inputs, not a multiple of the "
            f"{units_in} units of layer {layer - 1}"
        )
    return features_in // units_in


def perm_spec(shapes: WeightSpace | tuple[tuple[int, ...], ...]) -> PermSpec:
    """Derive the permutation spec of a feed-forward net from its weight shapes."""
    if isinstance(shapes, WeightSpace):
        shapes = shapes.layer_shapes()
    n = len(shapes)
    axes: dict[Slot, tuple[AxisPerm | None, ...]] = {}
    for i, shape in enumerate(shapes):
        out_g, in_g = _group(i, n), _group(i - 1, n)
        out_ax = AxisPerm(out_g) if out_g else None
        in_ax = AxisPerm(in_g, _flatten_block(shapes, i)) if in_g else None
        axes[("w", i)] = (out_ax, in_ax) + (None,) * (len(shape) - 2)
        axes[("b", i)] = (out_ax,)
    sizes = {_group(i, n): shapes[i][0] for i in range(n - 1)}
    return PermSpec(axes=axes, sizes=sizes)


def _slot_tensor(ws: WeightSpace, slot: Slot) -> Tensor:
    kind, i = slot
    return ws.weights[i] if kind == "w" else ws.biases[i]


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


def apply_permutation(ws: WeightSpace, perm: Perm, spec: PermSpec | None = None) -> WeightSpace:
    """Permute the hidden units of `ws` (batched or not) by index permutations."""
    spec = spec or perm_spec(ws)
    _check_perm(spec, perm)
    out = {("w", i): w for i, w in enumerate(ws.weights)} | {
        ("b", i): b for i, b in enumerate(ws.biases)
    }
    for group in spec.groups:
        for slot, axis, block in spec.acting(group):
            index = _block_index(perm[group], block)
            out[slot] = _take(out[slot], axis, index, ws.is_batched)
    n = ws.n_layers
    return WeightSpace(
        tuple(out[("w", i)] for i in range(n)), tuple(out[("b", i)] for i in range(n))
    )


def _mix(t: Tensor, axis: int, mat: Tensor, block: int, batched: bool) -> Tensor:
    """new[..., i, ...] = sum_j mat[i, j] * t[..., j, ...] along `axis` in blocks."""
    dim = axis + int(batched)
    moved = t.movedim(dim, -1)  # (..., n*block)
    moved = moved.unflatten(-1, (-1, block))  # (..., n, block)
    pattern = "bij,b...jk->b...ik" if batched else "ij,...jk->...ik"
    mixed = torch.einsum(pattern, mat, moved)
    return mixed.flatten(-2).movedim(-1, dim)


def apply_soft_permutation(
    ws: WeightSpace, mats: dict[str, Tensor], spec: PermSpec | None = None
) -> WeightSpace:
    """Apply (doubly-stochastic) matrices P, (n, n) or (B, n, n): rows P @ W, columns W @ P.T.

    With P = perm_to_matrix(perm) this equals `apply_permutation(ws, perm)`.
    """
    spec = spec or perm_spec(ws)
    out = {("w", i): w for i, w in enumerate(ws.weights)} | {
        ("b", i): b for i, b in enumerate(ws.biases)
    }
    for group in spec.groups:
        for slot, axis, block in spec.acting(group):
            out[slot] = _mix(out[slot], axis, mats[group], block, ws.is_batched)
    n = ws.n_layers
    return WeightSpace(
        tuple(out[("w", i)] for i in range(n)), tuple(out[("b", i)] for i in range(n))
    )


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
