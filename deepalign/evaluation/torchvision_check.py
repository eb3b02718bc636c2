"""Torchvision's convolutional families, randomly initialised, aligned by weight matching through
the API: seconds, and how far the aligned copy's outputs are from OTHER's (0 up to rounding).

    python -m deepalign.evaluation.torchvision_check [out.json | -] [family ...]

Each family runs in this process one after another, on every core torch is given; nothing is
downloaded (random weights).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import torch
import torchvision.models as tvm
from torch import nn

import deepalign
from deepalign.errors import DeepAlignError

FAMILIES = (
    "resnet18", "resnet50", "vgg11_bn", "alexnet", "mobilenet_v2", "efficientnet_b0",
    "densenet121", "squeezenet1_0", "shufflenet_v2_x0_5", "regnet_x_400mf", "resnext50_32x4d",
    "convnext_tiny", "googlenet", "mnasnet1_0",
)  # fmt: skip
# families refused, and what their one-line refusal names
REFUSED = {"shufflenet_v2_x0_5": "channel shuffle"}
T = TypeVar("T")
OPTIONS = {"googlenet": {"aux_logits": False, "init_weights": False}}  # no auxiliary heads
SHAPE = (3, 64, 64)


def build(name: str, seed: int) -> nn.Module:
    """A randomly initialised family member (eval mode), seeded."""
    torch.manual_seed(seed)
    return getattr(tvm, name)(weights=None, **OPTIONS.get(name, {})).eval()


def measure(name: str) -> dict[str, float | str]:
    """Seconds to align OTHER to REF, and OTHER's function kept (largest output difference)."""
    ref, other = build(name, 0), build(name, 1)
    start = time.perf_counter()
    try:
        aligned = deepalign.align(ref, other, method="weight_matching", input_shape=SHAPE)
    except DeepAlignError as e:
        return {"refused": str(e)}
    seconds = time.perf_counter() - start
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = other(x), aligned(x)
    return {
        "seconds": round(seconds, 1),
        "max_difference": float((got - want).abs().max()),
        "output_scale": float(want.abs().max()),
    }


def measure_all(cases: Mapping[str, T], measure_one: Callable[[T], dict], argv: list[str]) -> None:
    """Each case's numbers, printed as they come and written as JSON to argv[0] (`-`: none)."""
    out = Path(argv[0]) if argv and argv[0] != "-" else None
    found = {}
    for name, case in cases.items():
        found[name] = measure_one(case)
        print(name, found[name], flush=True)
    if out is not None:
        out.write_text(json.dumps(found, indent=2) + "\n")


def main(argv: list[str]) -> None:
    names = argv[1:] or list(FAMILIES)
    measure_all({name: name for name in names}, measure, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
