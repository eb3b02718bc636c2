"""Mode-connectivity curves (Garipov et al. 2018; Tatro et al. 2020): the parametrisation, the
fit of the control point on a training split, and loss and score along the curve.

A curve phi(t), t in [0, 1], joins two fixed endpoints A and B through one trainable control
point theta:
  bezier:   phi(t) = (1-t)^2 A + 2t(1-t) theta + t^2 B
  polyline: phi(t) = A + 2t (theta - A) for t <= 1/2, theta + (2t-1)(B - theta) after
With theta = (A + B) / 2 both are the straight line. Many pairs train at once: every tensor
has a leading pair dimension, and one batched forward pass (`forward_batched`) runs them all.
The loss is passed in (`deepalign.core.task.LossFn`); by default it is the split's task loss
(cross-entropy for classifiers, MSE for INRs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor

from deepalign.config import Positive, PositiveFloat, Seed, Steps, one_of
from deepalign.core.arch import Arch, as_input
from deepalign.core.data import Split
from deepalign.core.lmc import evaluate_networks, reset_statistics
from deepalign.core.task import LossFn, mean_task_loss, networks_total
from deepalign.core.weightspace import WeightSpace, lerp
from deepalign.errors import DeepAlignError

KINDS = ("bezier", "polyline")


@dataclass(frozen=True)
class CurveFitCfg:
    kind: Annotated[str, one_of(*KINDS)]  # bezier | polyline
    epochs: Steps  # passes over the training split
    batch_size: Positive
    lr: PositiveFloat
    seed: Seed


def coefficients(kind: str, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Weights of A, theta and B at t: each (K,)."""
    if kind == "bezier":
        return (1 - t) ** 2, 2 * t * (1 - t), t**2
    if kind == "polyline":
        first = t <= 0.5
        a = torch.where(first, 1 - 2 * t, torch.zeros_like(t))
        b = torch.where(first, torch.zeros_like(t), 2 * t - 1)
        return a, 1 - a - b, b
    raise DeepAlignError(f"unknown curve kind '{kind}' (known: {', '.join(KINDS)})")


def point(kind: str, a: WeightSpace, theta: WeightSpace, b: WeightSpace, t: Tensor) -> WeightSpace:
    """phi(t) for K pairs at once: t (K,), every WeightSpace batched (K, ...)."""
    ca, ct, cb = coefficients(kind, t)

    def mix(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
        shape = (-1, *[1] * (x.ndim - 1))
        return ca.view(shape) * x + ct.view(shape) * y + cb.view(shape) * z

    return a.replace([mix(*ts) for ts in zip(a.tensors(), theta.tensors(), b.tensors())])


def midpoint(a: WeightSpace, b: WeightSpace) -> WeightSpace:
    """The control point that makes either kind of curve the straight line."""
    return lerp(a, b, 0.5)


def fit_curve(
    arch: Arch,
    a: WeightSpace,
    b: WeightSpace,
    data: Split,
    cfg: CurveFitCfg,
    theta: WeightSpace | None = None,
    loss: LossFn | None = None,
) -> WeightSpace:
    """Train the control points of K curves (endpoints fixed) with Adam on `loss` (the split's
    task loss by default), one t per batch and pair; each pair's mean loss is its own."""
    gen = torch.Generator().manual_seed(cfg.seed)
    params = [t.detach().clone().requires_grad_() for t in (theta or midpoint(a, b)).tensors()]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    a, b = a.detach(), b.detach()
    x, loss = as_input(arch, data.x), loss or mean_task_loss(data.task)
    for _ in range(cfg.epochs):
        for idx in torch.randperm(data.size, generator=gen).split(cfg.batch_size):
            t = torch.rand(a.batch_size, generator=gen)
            phi = point(cfg.kind, a, a.replace(params), b, t)
            # BatchNorm: batch statistics while fitting (Garipov et al.), reset to evaluate
            out = arch.forward_batched(phi, x[idx], train=True)  # (K, b, C)
            total = networks_total(loss(out, data.examples(idx)[1]), out)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
    return a.replace([p.detach() for p in params])


@dataclass(frozen=True)
class CurveEval:
    t: Tensor  # (T,)
    loss: Tensor  # (K, T)
    acc: Tensor  # (K, T): the task's score (accuracy, or R^2 for INRs)


@torch.no_grad()
def evaluate_curve(
    arch: Arch,
    kind: str,
    a: WeightSpace,
    theta: WeightSpace,
    b: WeightSpace,
    split: Split,
    points: int,
    reset: Tensor | None = None,
    loss: LossFn | None = None,
) -> CurveEval:
    """Loss (the task's, or `loss`) and score of every pair's curve on a grid of t; with
    `reset` images, every network on a curve gets BatchNorm statistics of its own."""
    ts = torch.linspace(0, 1, points)
    k = a.batch_size
    losses, accs = [], []
    for t in ts:
        phi = reset_statistics(arch, point(kind, a, theta, b, t.expand(k)), reset)
        value, acc = evaluate_networks(arch, phi, split, loss=loss)
        losses.append(value)
        accs.append(acc)
    return CurveEval(ts, torch.stack(losses, 1), torch.stack(accs, 1))


def curve_metrics(ev: CurveEval) -> dict[str, Tensor]:
    """Per pair: mean/min accuracy and max loss along the curve, and its loss barrier."""
    line = (1 - ev.t) * ev.loss[:, :1] + ev.t * ev.loss[:, -1:]
    return {
        "mean_acc": ev.acc.mean(1),
        "min_acc": ev.acc.min(1).values,
        "max_loss": ev.loss.max(1).values,
        "curve_barrier": (ev.loss - line).max(1).values.clamp_min(0),
    }
