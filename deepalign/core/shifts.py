"""Shifted data sets, for zoos out of the default's distribution and for disjoint-data merging:
every image turned by a fixed random angle, and training splits that keep only a fraction of
each class's images."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor

from deepalign.config import Check, Seed, between
from deepalign.core.data import Dataset, Split
from deepalign.errors import DeepAlignError

ClassFraction = Annotated[float, Check(lambda v: 0 < v <= 1, "in (0, 1]")]


@dataclass(frozen=True)
class ShiftCfg:
    """How a zoo's data differs from the data set's."""

    rotate: Annotated[float, between(0, 180)]  # degrees: every image of every split turned
    # by its own angle ~ U(-rotate, rotate), drawn once (0: not turned)
    class_fractions: list[ClassFraction]  # per class, the part of its training images kept
    # ([]: all; validation and test splits stay whole)
    seed: Seed


def rotate_images(x: Tensor, degrees: Tensor) -> Tensor:
    """Images (N, C, H, W) turned about their centres by degrees (N,), zeros filled in."""
    rad = degrees * math.pi / 180
    cos, sin, zero = rad.cos(), rad.sin(), torch.zeros_like(rad)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (N, H, W, 2)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def _turned(split: Split, limit: float, gen: torch.Generator) -> Split:
    angles = (2 * torch.rand(len(split.y), generator=gen) - 1) * limit  # (N,)
    return Split(rotate_images(split.x, angles), split.y)


def class_subset(split: Split, fractions: list[float], gen: torch.Generator) -> Split:
    """The split with a seeded `fractions[c]` of class c's examples kept (at least one each)."""
    keep = []
    for c, fraction in enumerate(fractions):
        members = (split.y == c).nonzero().flatten()
        count = max(1, round(fraction * len(members)))
        keep.append(members[torch.randperm(len(members), generator=gen)[:count]])
    order = torch.cat(keep).sort().values
    return Split(split.x[order], split.y[order])


def shifted(data: Dataset, shift: ShiftCfg) -> Dataset:
    """`data` with `shift` applied (the same data set object when nothing shifts)."""
    if shift.class_fractions and len(shift.class_fractions) != data.n_classes:
        raise DeepAlignError(
            f"class_fractions: {len(shift.class_fractions)} values, but {data.name} has "
            f"{data.n_classes} classes"
        )
    gen = torch.Generator().manual_seed(shift.seed)
    out = data
    if shift.rotate:
        turned = {s: _turned(getattr(data, s), shift.rotate, gen) for s in ("train", "val", "test")}
        out = dataclasses.replace(out, **turned)
    if shift.class_fractions:
        out = dataclasses.replace(out, train=class_subset(out.train, shift.class_fractions, gen))
    return out
