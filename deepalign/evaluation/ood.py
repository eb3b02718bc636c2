"""Out of distribution (DEEP-ALIGN's Table 3): the aligner trained on the default zoo, applied
unchanged, and every classical method beside it, on zoos of the same architecture trained
otherwise: on rotated digits, and with another optimiser and learning rate.

A shifted zoo follows the default zoo's recipe for its architecture with the shift's
optimiser, momentum, learning rate and epochs; all its networks are test networks, paired
in a ring, and every method sees the shifted data (its training images, its test images).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated

from deepalign.config import (
    Count,
    Fraction,
    GridPoints,
    Iterations,
    Name,
    Positive,
    PositiveFloat,
    Seed,
    between,
    invalid,
    one_of,
)
from deepalign.core.data import Dataset
from deepalign.core.lmc import Curve
from deepalign.core.shifts import ShiftCfg
from deepalign.evaluation import experiment
from deepalign.evaluation.experiment import AlignCfg
from deepalign.methods import check_methods
from deepalign.zoo.kinds import OPTIMIZERS, NetCfg
from deepalign.zoo.store import Zoo


@dataclass(frozen=True)
class ShiftedZooCfg:
    """One shifted zoo: its data's rotation and its training recipe's changes."""

    rotate: Annotated[float, between(0, 180)]  # degrees, as `ShiftCfg.rotate`
    optimizer: Annotated[str, one_of(*OPTIMIZERS)]
    momentum: Fraction
    lr: PositiveFloat
    epochs: Iterations


@dataclass(frozen=True)
class OodCfg:
    """Section `ood` of params.yaml."""

    arch: Name  # the default zoo's architecture: its recipe, and its DEEP-ALIGN model
    networks: Positive  # per shifted zoo, all test networks
    seed: Seed  # network j of every shifted zoo trains from seed + j
    methods: list[str]
    pairs: Count  # ring pairs of each shifted zoo
    points: GridPoints
    zoos: dict[Name, ShiftedZooCfg]  # by folder name

    def __post_init__(self) -> None:
        check_methods("methods", self.methods)
        if not self.zoos:
            raise invalid("zoos", self.zoos, "at least one shifted zoo")
        if self.networks < 2:
            raise invalid("networks", self.networks, ">= 2 (networks are paired)")


def recipe(base: NetCfg, cfg: OodCfg, zoo: ShiftedZooCfg) -> NetCfg:
    """The default recipe with the shifted zoo's training changes, every network a test one."""
    return dataclasses.replace(
        base,
        n_train=0,
        n_val=0,
        n_test=cfg.networks,
        optimizer=zoo.optimizer,
        momentum=zoo.momentum,
        lr=zoo.lr,
        epochs=zoo.epochs,
    )


def data_shift(cfg: OodCfg, zoo: ShiftedZooCfg) -> ShiftCfg:
    """The shifted zoo's data: rotated (or not), every class whole."""
    return ShiftCfg(rotate=zoo.rotate, class_fractions=[], seed=cfg.seed)


def score_methods(
    zoo: Zoo, data: Dataset, cfg: OodCfg, align: AlignCfg, name: str
) -> tuple[dict[str, dict], dict[str, list[Curve]]]:
    """Every method on the shifted zoo's ring pairs: barrier metrics and the lines behind."""
    settings = dataclasses.replace(align, pairs=cfg.pairs)
    return experiment.score_methods(zoo, data, cfg.methods, settings, cfg.points, f"ood {name}")
