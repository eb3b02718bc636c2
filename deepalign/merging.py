"""Merging aligned networks: weighted averages, MergeMany, REPAIR and BatchNorm resets.

Two networks: OTHER aligned to REF by any method, then averaged. More: Git Re-Basin's
MergeMany (Ainsworth et al. 2023, Alg. 3): every network in turn is weight-matched to the
average of the others until no permutation changes, then all are averaged. A merged network
has no statistics of its own: with BatchNorm they are recomputed on training images; without
it, REPAIR (Jordan et al. 2022) rescales every hidden unit's pre-activation so that its mean
and standard deviation are the weighted averages of the parents' (folded into the layer's
weight and bias).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from deepalign.core.arch import Arch, as_input, layer_outputs, producers
from deepalign.core.data import Split, reset_images_of
from deepalign.core.lmc import reset_statistics
from deepalign.core.permspec import Perm, apply_permutation, identity
from deepalign.core.weightspace import WeightSpace, average, stack
from deepalign.errors import DeepAlignError, UsageError
from deepalign.methods import Method, MethodsCfg, Problem, align
from deepalign.methods.weight_matching import WeightMatchingCfg, weight_matching


def check_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """One finite, non-negative weight per network, not all zero (equal weights by default),
    normalised to sum to 1."""
    if weights is None:
        return [1.0 / count] * count
    values = list(weights)
    if len(values) != count or not all(math.isfinite(w) and w >= 0 for w in values):
        raise DeepAlignError(
            f"weights {values}: one finite, non-negative weight per network ({count})"
        )
    largest = max(values)
    if largest <= 0:
        raise DeepAlignError(f"weights {values}: not all zero")
    scaled = [w / largest for w in values]  # 1e308 twice would overflow their sum
    return [w / sum(scaled) for w in scaled]


def merge_many(
    arch: Arch, nets: Sequence[WeightSpace], cfg: WeightMatchingCfg, max_rounds: int = 100
) -> list[Perm]:
    """MergeMany: a permutation per network bringing all into one basis (the first network's
    units keep their order up to the common relabelling); rounds until none changes."""
    spec = arch.spec
    perms = [identity(spec) for _ in nets]
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(max_rounds):
        changed = False
        for i in torch.randperm(len(nets), generator=gen).tolist():
            others = [apply_permutation(n, p, spec) for k, (n, p) in enumerate(zip(nets, perms))]
            target = average([o for k, o in enumerate(others) if k != i])
            found = weight_matching(Problem(spec, target, nets[i], arch), cfg, perms[i])
            if any(not torch.equal(found[g], perms[i][g]) for g in spec.groups):
                perms[i], changed = found, True
        if not changed:
            break
    return perms


def merged(
    arch: Arch,
    aligned: Sequence[WeightSpace],
    weights: Sequence[float],
    reset: Tensor | None = None,
    repair: bool = False,
) -> WeightSpace:
    """The weighted average of networks already in one basis; with `reset` images, its
    BatchNorm statistics recomputed, and with `repair` (networks without BatchNorm), REPAIR."""
    mean = average(aligned, weights)
    if repair:
        if reset is None:
            raise DeepAlignError("REPAIR needs training images (--data)")
        if arch.has_batchnorm:  # REPAIR on a BatchNorm network is its statistics' reset
            return reset_statistics(arch, stack([mean]), reset)[0]
        return repaired(arch, aligned, weights, mean, reset)
    if reset is not None and arch.has_batchnorm:
        return reset_statistics(arch, stack([mean]), reset)[0]
    return mean


def _moments(outputs: Tensor) -> tuple[Tensor, Tensor]:
    """Each unit's mean and standard deviation over examples (and positions): (N, n, ...)."""
    units = outputs.movedim(1, -1).flatten(0, -2)  # (samples, n)
    return units.mean(0), units.std(0)


def repaired(
    arch: Arch,
    parents: Sequence[WeightSpace],
    weights: Sequence[float],
    mean: WeightSpace,
    images: Tensor,
) -> WeightSpace:
    """REPAIR: layer by layer in forward order, each hidden unit's output statistics made the
    weighted average of the parents', by rescaling its layer's weight and shifting its bias
    (a layer without a bias is rescaled only)."""
    x = as_input(arch, images)
    layers = producers(arch)
    nodes = tuple(p.node for p in layers)
    parent_moments = [[_moments(t) for t in layer_outputs(arch, p, x, nodes)] for p in parents]
    out = mean
    for k, layer in enumerate(layers):
        goal_mean = sum(w * m[k][0] for w, m in zip(weights, parent_moments))
        goal_std = sum(w * m[k][1] for w, m in zip(weights, parent_moments))
        now_mean, now_std = _moments(layer_outputs(arch, out, x, (layer.node,))[0])
        scale = goal_std / now_std.clamp_min(1e-8)  # (n,)
        w = out.named[layer.weight]
        changed = {layer.weight: w * scale.view(-1, *[1] * (w.ndim - 1))}
        if layer.bias is not None:
            changed[layer.bias] = (out.named[layer.bias] - now_mean) * scale + goal_mean
        out = out.with_tensors(changed)
    return out


def merge_networks(
    arch: Arch,
    nets: Sequence[WeightSpace],
    method: str,
    cfg: MethodsCfg,
    weights: Sequence[float] | None = None,
    train: Split | None = None,
    repair: bool = False,
    reset_images: int = 1024,
) -> WeightSpace:
    """Align and average networks of one architecture: two by `method` (the second brought
    into the first's basis), more by MergeMany (weight matching); BatchNorm statistics reset
    on `reset_images` training images where the network has BatchNorm."""
    shares = check_weights(weights, len(nets))
    if len(nets) < 2:
        raise DeepAlignError(f"merging needs at least 2 networks, got {len(nets)}")
    if len(nets) == 2:
        result = align(method, Problem.of(nets[0], nets[1], arch, train), cfg)
        aligned = [nets[0], apply_permutation(nets[1], result.perm, arch.spec)]
    elif Method.parse(method).steps != ("weight_matching",):
        raise UsageError(
            f"--method {method}: more than two networks merge by MergeMany, which "
            "is weight matching; leave --method out or give weight_matching"
        )
    else:
        perms = merge_many(arch, nets, cfg.weight_matching)
        aligned = [apply_permutation(n, p, arch.spec) for n, p in zip(nets, perms)]
    images = reset_images_of(train, reset_images)
    if arch.has_batchnorm and images is None and (repair or reset_images):
        raise DeepAlignError(
            "merging networks with BatchNorm resets their statistics on training images: "
            "give the data set (--data)"
        )
    return merged(arch, aligned, shares, images, repair)
