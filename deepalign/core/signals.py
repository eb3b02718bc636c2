"""Signals for implicit neural representations (INRs): what an INR zoo's networks fit.

An INR maps coordinates to a signal's value. Two kinds, as in DEEP-ALIGN's Figure 4:
- `sine`: f(x) = sin(a x) on [-pi, pi], a ~ U(low, high) per signal, sampled at `points`
  evenly spaced x (the network reads x / pi, in [-1, 1], as SIREN expects);
- `digits`: scikit-learn's 8x8 digit images as 2-D signals, pixel centres in [-1, 1]^2 ->
  intensity in [0, 1] (the paper fits CIFAR10 images; digits need no download).

Network j of an INR zoo fits signal j // views; its split is its signal's, so the aligner
never sees a test signal. The zoo's data set gives every network its own targets
(`Split.per_network`), the coordinates shared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import torch
from torch import Tensor

from deepalign.config import Positive, PositiveFloat, Seed, invalid, one_of
from deepalign.core.data import Dataset, Split, digits_arrays
from deepalign.errors import DeepAlignError

SIGNAL_KINDS = ("sine", "digits")


@dataclass(frozen=True)
class SignalsCfg:
    """What an INR zoo fits."""

    kind: Annotated[str, one_of(*SIGNAL_KINDS)]
    points: Positive  # sine: samples of [-pi, pi] (digits: its 64 pixels, whatever is set)
    frequencies: list[PositiveFloat]  # sine: [low, high], a ~ U(low, high) (digits: unused)
    views: Positive  # fits of each signal from different seeds: network j fits signal j // views
    seed: Seed  # draws the frequencies, or which digit images are the signals

    def __post_init__(self) -> None:
        low_high = len(self.frequencies) == 2 and self.frequencies[0] <= self.frequencies[1]
        if not low_high:
            raise invalid("frequencies", self.frequencies, "[low, high] with low <= high")
        if self.views < 2:
            raise invalid("views", self.views, ">= 2 (a pair is two fits of one signal)")


def signal_limit(kind: str) -> int | None:
    """How many distinct signals `kind` has: the digit images' count; sines have no limit."""
    return len(digits_arrays()[0]) if kind == "digits" else None


def sine_signals(cfg: SignalsCfg, count: int) -> tuple[Tensor, Tensor]:
    """Coordinates (N, 1) in [-1, 1] and `count` sine waves sin(a x) at x = pi * coordinate:
    (count, N, 1)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    low, high = cfg.frequencies
    a = low + (high - low) * torch.rand(count, generator=gen)  # (S,)
    coords = torch.linspace(-1, 1, cfg.points).unsqueeze(1)  # (N, 1)
    return coords, torch.sin(a.view(-1, 1, 1) * math.pi * coords)


def digit_signals(cfg: SignalsCfg, count: int) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates (64, 2) in [-1, 1]^2 and `count` digit images drawn without
    replacement as signals: (count, 64, 1), intensities in [0, 1]."""
    images, _ = digits_arrays()
    if count > len(images):
        raise DeepAlignError(f"an INR zoo of {count} digit signals: digits has {len(images)}")
    chosen = np.random.default_rng(cfg.seed).permutation(len(images))[:count]
    side = images.shape[-1]
    centres = (torch.arange(side) + 0.5) / side * 2 - 1
    rows, cols = torch.meshgrid(centres, centres, indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()], 1)  # (64, 2)
    values = torch.as_tensor(images[chosen] / 16.0, dtype=torch.float32)
    return coords, values.reshape(count, -1, 1)


def signals(cfg: SignalsCfg, count: int) -> tuple[Tensor, Tensor]:
    """The coordinates (N, d) and `count` signals (count, N, 1) of `cfg.kind`."""
    return (sine_signals if cfg.kind == "sine" else digit_signals)(cfg, count)


def inr_dataset(cfg: SignalsCfg, networks: int) -> Dataset:
    """The data of an INR zoo of `networks` networks: every network's own targets, (Z, N, 1).

    Train, validation and test splits are the same coordinates: an INR is judged on the
    signal it fits; what the zoo's split keeps apart is the signals."""
    if networks % cfg.views:
        raise invalid("views", cfg.views, f"a divisor of the zoo's {networks} networks")
    coords, values = signals(cfg, networks // cfg.views)
    split = Split(coords, values.repeat_interleave(cfg.views, 0), "regress")
    return Dataset(f"inr-{cfg.kind}", split, split, split, n_classes=1)
