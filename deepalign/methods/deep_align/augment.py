"""Function-preserving and mild augmentations of batched networks, and planted copies."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deepalign.config import Fraction, NonNegative
from deepalign.core.permspec import Perm, PermSpec, apply_permutation, invert, random_permutation
from deepalign.core.weightspace import WeightSpace


@dataclass(frozen=True)
class AugmentCfg:
    noise: NonNegative  # Gaussian noise, times each tensor's std
    dropout: Fraction  # fraction of entries zeroed (no rescaling)
    rescale: Fraction  # ReLU positive rescaling of hidden units by U(1 - r, 1 + r)
    prune: Fraction  # fraction of smallest-magnitude entries zeroed per tensor


def rescale_units(ws: WeightSpace, spec: PermSpec, scales: dict[str, Tensor]) -> WeightSpace:
    """Scale each hidden unit's incoming weights and bias by s, its outgoing weights by 1/s.

    Leaves a ReLU network's function unchanged. `scales[g]` is (B, n).
    """
    tensors = {("w", i): w for i, w in enumerate(ws.weights)}
    tensors |= {("b", i): b for i, b in enumerate(ws.biases)}
    for g, s in scales.items():
        for slot, axis, block in spec.acting(g):
            t = tensors[slot]
            factor = s if axis == 0 else 1 / s
            factor = factor.repeat_interleave(block, dim=-1)  # (B, n * block)
            shape = [t.shape[0]] + [1] * (t.ndim - 1)
            shape[axis + 1] = factor.shape[-1]
            tensors[slot] = t * factor.view(shape)
    n = ws.n_layers
    return WeightSpace(
        tuple(tensors[("w", i)] for i in range(n)), tuple(tensors[("b", i)] for i in range(n))
    )


def _prune(t: Tensor, fraction: float) -> Tensor:
    """Zero the smallest |entries| of each network's tensor: (B, ...)."""
    flat = t.flatten(1).abs()
    k = int(fraction * flat.shape[1])
    if k == 0:
        return t
    threshold = flat.kthvalue(k, dim=1).values.view(-1, *[1] * (t.ndim - 1))
    return torch.where(t.abs() <= threshold, torch.zeros_like(t), t)


def augment(ws: WeightSpace, spec: PermSpec, cfg: AugmentCfg, gen: torch.Generator) -> WeightSpace:
    """Rescale, prune, drop out and add noise to a batch of networks."""
    batch = ws.batch_size
    scales = {
        g: 1 + cfg.rescale * (2 * torch.rand(batch, n, generator=gen) - 1)
        for g, n in spec.sizes.items()
    }
    ws = rescale_units(ws, spec, {g: s.to(ws.biases[0].device) for g, s in scales.items()})

    def perturb(t: Tensor) -> Tensor:
        t = _prune(t, cfg.prune)
        keep = (torch.rand(t.shape, generator=gen) >= cfg.dropout).to(t)
        std = t.flatten(1).std(1).view(-1, *[1] * (t.ndim - 1))
        return t * keep + cfg.noise * std * torch.randn(t.shape, generator=gen).to(t)

    return ws.map(perturb)


def planted_copies(
    ws: WeightSpace, spec: PermSpec, cfg: AugmentCfg, gen: torch.Generator
) -> tuple[WeightSpace, Perm]:
    """Augmented, randomly permuted copies, and the permutations aligning them back: (B, n)."""
    planted = random_permutation(spec, gen, batch=ws.batch_size)
    planted = {g: p.to(ws.biases[0].device) for g, p in planted.items()}
    return apply_permutation(augment(ws, spec, cfg, gen), planted, spec), invert(planted)
