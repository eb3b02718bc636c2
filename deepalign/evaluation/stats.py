"""Statistics over pairs: mean and spread, and paired bootstrap intervals."""

from __future__ import annotations

import torch
from torch import Tensor


def mean_std(values: Tensor | list[float]) -> tuple[float, float]:
    t = torch.as_tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(t) > 1 else 0.0)


def summarize_pairs(per_pair: dict[str, list[float]]) -> dict[str, float]:
    """{'loss_barrier': [..], ...} -> {'loss_barrier_mean': .., 'loss_barrier_std': .., ...}."""
    out = {}
    for name, values in per_pair.items():
        out[f"{name}_mean"], out[f"{name}_std"] = mean_std(values)
    return out


def paired_bootstrap(
    a: list[float], b: list[float], samples: int = 10_000, seed: int = 0
) -> dict[str, float]:
    """Mean of a - b over pairs with a 95% bootstrap interval (resampling pairs)."""
    diff = torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(diff), (samples, len(diff)), generator=gen)
    means = diff[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {
        "mean_diff": diff.mean().item(),
        "ci_low": lo,
        "ci_high": hi,
        "frac_pairs_a_le_b": (diff <= 0).double().mean().item(),
    }
