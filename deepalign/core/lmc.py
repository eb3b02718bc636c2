"""Linear mode connectivity: loss and accuracy along the line between two networks.

Barriers (Frankle et al. 2020; Entezari et al. 2022; Git Re-Basin Def. 2.2), on a lambda grid
that holds both ends and 0.5:
  loss_barrier      max_l [L(l) - ((1-l) L(0) + l L(1))], clipped at 0
  loss_barrier_ends max_l L(l) - (L(0) + L(1)) / 2   (against the mean of the two ends)
  loss_auc          trapezoid of the first gap, clipped at 0 per point
and the same for accuracy with the gap taken below the line.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deepalign.core.arch import Arch, as_input, batchnorm_statistics, passes, per_pass
from deepalign.core.data import Split
from deepalign.core.permspec import Perm, PermSpec, apply_permutation, invert, random_permutation
from deepalign.core.task import LossFn, example_hits, example_losses, network_sums, scores
from deepalign.core.weightspace import WeightSpace, lerp, stack
from deepalign.errors import DeepAlignError


@dataclass(frozen=True)
class Curve:
    lambdas: Tensor  # (L,)
    loss: Tensor  # (L,)
    acc: Tensor  # (L,)


def lambda_grid(points: int) -> Tensor:
    if points < 3 or points % 2 == 0:
        raise DeepAlignError(f"lambda grid needs an odd number >= 3 of points (got {points})")
    return torch.linspace(0, 1, points)


@torch.no_grad()
def evaluate_networks(
    arch: Arch, nets: WeightSpace, split: Split, chunk: int = 32, loss: LossFn | None = None
) -> tuple[Tensor, Tensor]:
    """Mean task loss (or `loss`'s) and score of each of B networks on a split: (B,), (B,).

    The score is accuracy for classifiers, R^2 for INRs (`deepalign.core.task`). Networks go
    `chunk` at a time, examples as many at a time as `per_pass` allows; per-network targets
    (`Split.per_network`) are B sets, one per network.
    """
    x = as_input(arch, split.x)
    images = per_pass(arch, min(chunk, nets.batch_size))
    losses, accs = [], []
    for start in range(0, nets.batch_size, chunk):
        group = nets[start : start + chunk]
        targets = split.of_networks(slice(start, start + chunk))
        task_sum = torch.zeros(group.batch_size, dtype=torch.float64)
        loss_sum, hits = torch.zeros_like(task_sum), torch.zeros_like(task_sum)
        for rows in passes(split.size, images):
            out = arch.forward_batched(group, x[rows])  # (b, n, C)
            part = targets.examples(rows)[1]
            task_sum += example_losses(out, part, split.task).double().sum(1)
            if loss is not None:
                loss_sum += network_sums(loss, out, part).double()
            if split.task == "classify":
                hits += example_hits(out, part).sum(1)
        mean = task_sum / split.size
        own = mean if loss is None else loss_sum / split.size
        losses.append(own.to(torch.get_default_dtype()))
        accs.append(hits / split.size if split.task == "classify" else scores(targets, mean))
    return torch.cat(losses), torch.cat(accs)


def reset_statistics(arch: Arch, nets: WeightSpace, images: Tensor | None) -> WeightSpace:
    """Batched `nets` with their BatchNorm running statistics recomputed on `images` (N, ...),
    as an interpolated or merged network needs (its parents' statistics do not describe it);
    unchanged without BatchNorm or without images."""
    if images is None or not arch.has_batchnorm:
        return nets
    x = as_input(arch, images)
    step = per_pass(arch, min(len(x), BN_BATCH))
    parts = [
        batchnorm_statistics(arch, nets[s], x, BN_BATCH) for s in passes(nets.batch_size, step)
    ]
    return nets.replace([torch.cat(ts) for ts in zip(*(p.tensors() for p in parts))])


BN_BATCH = 256  # images per batch while recomputing BatchNorm statistics


def interpolate(
    arch: Arch,
    a: WeightSpace,
    b: WeightSpace,
    split: Split,
    points: int = 25,
    reset: Tensor | None = None,
) -> Curve:
    """Loss and accuracy of (1 - l) a + l b on a split, l on an evenly spaced grid; with
    `reset` images, every network on the line gets BatchNorm statistics of its own."""
    lambdas = lambda_grid(points)
    nets = lerp(stack([a] * points), stack([b] * points), lambdas)
    loss, acc = evaluate_networks(arch, reset_statistics(arch, nets, reset), split)
    return Curve(lambdas, loss, acc)


def _gap(values: Tensor, lambdas: Tensor) -> Tensor:
    """values minus the straight line between the endpoint values: (L,)."""
    return values - ((1 - lambdas) * values[0] + lambdas * values[-1])


def barriers(curve: Curve) -> dict[str, float]:
    """Barrier metrics of one interpolation curve (loss and accuracy)."""
    lam = curve.lambdas
    loss_gap, acc_gap = _gap(curve.loss, lam), -_gap(curve.acc, lam)
    mid = int(torch.argmin((lam - 0.5).abs()))
    return {
        "loss_barrier": loss_gap.max().clamp_min(0).item(),
        "loss_barrier_ends": (curve.loss.max() - 0.5 * (curve.loss[0] + curve.loss[-1])).item(),
        "loss_auc": torch.trapezoid(loss_gap.clamp_min(0), lam).item(),
        "acc_barrier": acc_gap.max().clamp_min(0).item(),
        "acc_barrier_ends": (0.5 * (curve.acc[0] + curve.acc[-1]) - curve.acc.min()).item(),
        "acc_auc": torch.trapezoid(acc_gap.clamp_min(0), lam).item(),
        "merged_acc": curve.acc[mid].item(),
        "merged_loss": curve.loss[mid].item(),
    }


def perturb(ws: WeightSpace, noise: float, gen: torch.Generator) -> WeightSpace:
    """Add Gaussian noise of `noise` times each parameter's std (running statistics kept; a
    single-entry tensor, an INR's output bias, has no spread and gets none)."""

    def noisy(key: str, t: Tensor) -> Tensor:
        if key in ws.buffers:
            return t
        spread = t.std() if t.numel() > 1 else t.new_zeros(())
        return t + noise * spread * torch.randn(t.shape, generator=gen)

    return ws.replace([noisy(k, t) for k, t in ws.named.items()])


def planted_pair(
    ws: WeightSpace, spec: PermSpec, noise: float, gen: torch.Generator
) -> tuple[WeightSpace, Perm]:
    """A permuted, perturbed copy of `ws`, and the permutation that aligns it back."""
    planted = random_permutation(spec, gen)
    return apply_permutation(perturb(ws, noise, gen), planted, spec), invert(planted)


def recovery(found: Perm, truth: Perm) -> float:
    """Fraction of hidden units matched as in `truth`."""
    hits = sum(int((found[g] == truth[g]).sum()) for g in truth)
    return hits / sum(t.numel() for t in truth.values())
