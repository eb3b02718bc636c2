"""Function-preserving and mild augmentations of batched networks, and planted copies."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from deepalign.config import Fraction, NonNegative
from deepalign.core.arch import Arch
from deepalign.core.permspec import Perm, apply_permutation, invert, random_permutation
from deepalign.core.weightspace import WeightSpace
from deepalign.errors import DeepAlignError


@dataclass(frozen=True)
class AugmentCfg:
    noise: NonNegative  # Gaussian noise, times each tensor's std
    dropout: Fraction  # fraction of entries zeroed (no rescaling)
    rescale: Fraction  # ReLU positive rescaling of hidden units by U(1 - r, 1 + r)
    prune: Fraction  # fraction of smallest-magnitude entries zeroed per tensor


def check_rescalable(arch: Arch) -> None:
    """Refuse the positive rescaling where the network does not have that symmetry."""
    traced = arch.traced
    if not traced.rescalable:
        kinds = ", ".join(sorted(traced.activations)) or "no activation"
        norm = " and normalisation layers" if traced.norms else ""
        raise DeepAlignError(
            f"augment.rescale: {arch.describe()} ({kinds}{norm}) does not keep its function "
            "when a unit's inputs are scaled by s and its outputs by 1/s; set it to 0"
        )


def rescale_units(ws: WeightSpace, arch: Arch, scales: dict[str, Tensor]) -> WeightSpace:
    """Scale each hidden unit's incoming weights and bias by s, its outgoing weights by 1/s.

    Leaves the function unchanged where the activations are positively homogeneous (ReLU);
    refused elsewhere. `scales[g]` is (B, n).
    """
    check_rescalable(arch)
    tensors = dict(ws.named)
    for g, s in scales.items():
        for key, axis, block, offset in arch.spec.acting(g):
            t = tensors[key]
            factor = s if axis == 0 else 1 / s
            factor = factor.repeat_interleave(block, dim=-1)  # (B, n * block)
            rest = t.shape[axis + 1] - offset - factor.shape[-1]
            factor = F.pad(factor, (offset, rest), value=1.0)  # (B, the whole axis)
            shape = [t.shape[0]] + [1] * (t.ndim - 1)
            shape[axis + 1] = factor.shape[-1]
            tensors[key] = t * factor.view(shape)
    return ws.replace(tensors.values())


def _prune(t: Tensor, fraction: float) -> Tensor:
    """Zero the smallest |entries| of each network's tensor: (B, ...)."""
    flat = t.flatten(1).abs()
    k = int(fraction * flat.shape[1])
    if k == 0:
        return t
    threshold = flat.kthvalue(k, dim=1).values.view(-1, *[1] * (t.ndim - 1))
    return torch.where(t.abs() <= threshold, torch.zeros_like(t), t)


def augment(ws: WeightSpace, arch: Arch, cfg: AugmentCfg, gen: torch.Generator) -> WeightSpace:
    """Rescale (where the activations allow), prune, drop out and add noise to a batch of
    networks' weights (not to BatchNorm's running statistics)."""
    batch, device = ws.batch_size, ws.tensors()[0].device
    scales = {  # drawn whether used or not: the same random stream either way
        g: 1 + cfg.rescale * (2 * torch.rand(batch, n, generator=gen) - 1)
        for g, n in arch.spec.sizes.items()
    }
    if cfg.rescale > 0:
        ws = rescale_units(ws, arch, {g: s.to(device) for g, s in scales.items()})

    def perturb(t: Tensor) -> Tensor:
        t = _prune(t, cfg.prune)
        keep = (torch.rand(t.shape, generator=gen) >= cfg.dropout).to(t)
        flat = t.flatten(1)  # (B, entries); a single entry has no spread and gets no noise
        spread = flat.std(1) if flat.shape[1] > 1 else flat.new_zeros(flat.shape[0])
        std = spread.view(-1, *[1] * (t.ndim - 1))
        return t * keep + cfg.noise * std * torch.randn(t.shape, generator=gen).to(t)

    # BatchNorm running statistics stay as they are: they describe the weights they follow
    return ws.replace([t if k in ws.buffers else perturb(t) for k, t in ws.named.items()])


def planted_copies(
    ws: WeightSpace, arch: Arch, cfg: AugmentCfg, gen: torch.Generator
) -> tuple[WeightSpace, Perm]:
    """Augmented, randomly permuted copies, and the permutations aligning them back: (B, n)."""
    spec = arch.spec
    planted = random_permutation(spec, gen, batch=ws.batch_size)
    planted = {g: p.to(ws.tensors()[0].device) for g, p in planted.items()}
    return apply_permutation(augment(ws, arch, cfg, gen), planted, spec), invert(planted)
