"""The task loss a zoo's networks are trained and judged by, chosen by their data (`Split.task`).

Classifiers: cross-entropy, and accuracy as the score. INRs (regression of a signal): the mean
squared error over output channels, and R^2 (1 - MSE / the signal's variance) as the score,
so "higher is better, 1 is perfect" holds for both. Targets are shared by every network,
(n,) labels or (n, out), or one set per network, (K, n, out).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from deepalign.core.data import Split


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
