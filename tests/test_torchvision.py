"""Torchvision's convolutional families, randomly initialised, aligned by weight matching
through the API: the aligned copy of OTHER computes OTHER's function, or the family is refused
in one line naming the module and the operation (ShuffleNet's channel shuffle). Seconds per
family are measured by `python -m deepalign.evaluation.torchvision_check` (docs/results.md)."""

from __future__ import annotations

import os

import pytest
import torch

import deepalign
from deepalign.errors import DeepAlignError
from deepalign.evaluation.torchvision_check import FAMILIES, REFUSED, build

pytestmark = pytest.mark.slow
# over a minute each on 2 cores (docs/results.md): run with DEEPALIGN_TORCHVISION=all, and by
# `python -m deepalign.evaluation.torchvision_check`
HEAVY = {"vgg11_bn", "alexnet", "resnext50_32x4d", "resnet50", "googlenet"}
ALL = os.environ.get("DEEPALIGN_TORCHVISION") == "all"


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.skipif(n in HEAVY and not ALL, reason="over a minute"))
        for n in FAMILIES
        if n not in REFUSED
    ],
)
def test_a_torchvision_family_aligns_keeping_others_function(name):
    ref, other = build(name, 0), build(name, 1)
    aligned = deepalign.align(ref, other, method="weight_matching", input_shape=(3, 64, 64))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = other(x), aligned(x)
    # relative: randomly initialised MobileNet and EfficientNet output values near 1e-9
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    moved = [
        k for k, t in other.state_dict().items() if not torch.equal(t, aligned.state_dict()[k])
    ]
    assert moved  # it was permuted, not handed back


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_family_that_cannot_be_aligned_is_refused_in_one_line(name):
    with pytest.raises(DeepAlignError) as info:
        deepalign.align(build(name, 0), build(name, 1), input_shape=(3, 64, 64))
    message = str(info.value)
    assert "\n" not in message and REFUSED[name] in message and "module '" in message
