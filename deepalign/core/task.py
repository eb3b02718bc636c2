"""The task loss a zoo's networks are trained and judged by, chosen by their data (`Split.task`).

Classifiers: cross-entropy, and accuracy as the score. INRs (regression of a signal): the mean
squared error over output channels, and R^2 (1 - MSE / the signal's variance) as the score,
so "higher is better, 1 is perfect" holds for both. Targets are shared by every network,
(n,) labels or (n, out), or one set per network, (K, n, out).

A loss passed in (`LossFn`: curve fitting and evaluation) maps K networks' outputs (K, n, C)
and targets to per-example losses (K, n), per-network means (K,), or one mean over all ().
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from deepalign.core.data import Split
from deepalign.errors import DeepAlignError

LossFn = Callable[[Tensor, Tensor], Tensor]  # (K, n, C), targets -> (K, n), (K,) or ()


def example_losses(out: Tensor, y: Tensor, task: str) -> Tensor:
    """Each network's loss on each example: out (K, n, C) -> (K, n)."""
    if task == "regress":
        return ((out - y) ** 2).mean(-1)
    return F.cross_entropy(out.transpose(1, 2), y.expand(out.shape[0], -1), reduction="none")


def task_loss(out: Tensor, y: Tensor, task: str, reduction: str = "sum") -> Tensor:
    """The loss over every network and example: summed, or averaged (`reduction` mean)."""
    if task == "regress":
        squared = example_losses(out, y, task)  # (K, n)
        return squared.sum() if reduction == "sum" else squared.mean()
    labels = y.expand(out.shape[0], -1).reshape(-1)  # (K * n,)
    return F.cross_entropy(out.flatten(0, 1), labels, reduction=reduction)


def example_hits(out: Tensor, y: Tensor) -> Tensor:
    """Classifiers: whether each example is classified right, (K, n) in {0, 1}."""
    return (out.argmax(-1) == y).double()


def scores(split: Split, mean_loss: Tensor) -> Tensor:
    """Regression's score from each network's mean loss (K,): R^2 against its targets."""
    variance = split.y.double().var(dim=-2, unbiased=False).mean(-1)  # (K,) or ()
    return 1 - mean_loss.double() / variance.clamp_min(1e-12)


def mean_task_loss(task: str) -> LossFn:
    """The task's loss (cross-entropy or MSE) as a LossFn: the mean over networks and examples."""
    return functools.partial(task_loss, task=task, reduction="mean")


def _shape_of(value: Tensor, out: Tensor) -> str:
    """Which of the LossFn forms `value` is for outputs `out`: 'example', 'network' or 'mean'."""
    k, n = out.shape[:2]
    forms = {(k, n): "example", (k,): "network", (): "mean"}
    if tuple(value.shape) not in forms:
        raise DeepAlignError(
            f"a loss gave shape {tuple(value.shape)} for outputs {tuple(out.shape)}: "
            f"expected ({k}, {n}), ({k},) or ()"
        )
    return forms[tuple(value.shape)]


def networks_total(value: Tensor, out: Tensor) -> Tensor:
    """A LossFn's value on outputs `out` as the sum over networks of each one's mean loss."""
    form = _shape_of(value, out)
    if form == "mean":
        return value * out.shape[0]
    return value.sum() if form == "network" else value.mean(1).sum()


def network_sums(loss: LossFn, out: Tensor, y: Tensor) -> Tensor:
    """Each network's loss summed over its examples: out (K, n, C) -> (K,)."""
    value = loss(out, y)
    k, n = out.shape[:2]
    form = _shape_of(value, out)
    if form == "example":
        return value.sum(1)
    if form == "network" or k == 1:
        return value.reshape(k) * n
    own = y.ndim == out.ndim  # one target set per network: (K, n, out)
    each = [loss(out[i : i + 1], y[i : i + 1] if own else y) for i in range(k)]
    return torch.stack(each) * n
