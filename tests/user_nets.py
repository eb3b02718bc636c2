"""Networks a user would hand to `--model tests.user_nets:<name>` (importable callables)."""

from __future__ import annotations

from torch import nn

from deepalign.core.resnet import ResNetModule


def small_resnet() -> nn.Module:
    """Two stages (4 and 8 channels) of one basic block each, BatchNorm, 8x8 digits."""
    return ResNetModule(1, (4, 8), 1, 10)
