"""INRs (DEEP-ALIGN's Figure 4): SIREN zoos fitted to sine waves and to digit images, a
DEEP-ALIGN model trained on each zoo's train signals, every method on two fits of each test
signal, and Sinkhorn re-basin's barrier against its steps from the identity, weight
matching's and DEEP-ALIGN's starts.

Nothing here is INR-specific but the data: the task loss (MSE) comes with the zoo's data set
(`Split.task`), the symmetries with the network (a sine chain is stored in canonical form and
refuses ReLU rescaling), and the pairs with the zoo (`Zoo.pairs`: two views of one signal).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from deepalign.config import (
    MAX_POINTS,
    Count,
    GridPoints,
    Name,
    Positive,
    Seed,
    between,
    invalid,
)
from deepalign.core.data import Dataset
from deepalign.core.signals import SignalsCfg, inr_dataset, signal_limit
from deepalign.errors import DeepAlignError
from deepalign.evaluation import convergence as cv
from deepalign.evaluation import experiment
from deepalign.evaluation.experiment import AlignCfg
from deepalign.methods import check_methods
from deepalign.methods.deep_align.train import AlignerCfg
from deepalign.methods.learned import DeepAlignCfg
from deepalign.zoo.kinds import NetCfg
from deepalign.zoo.store import Zoo


@dataclass(frozen=True)
class InrZooCfg:
    """One INR zoo: the signals it fits and its recipe (kind siren; its network counts are
    views x signals per split)."""

    signals: SignalsCfg
    net: NetCfg

    def __post_init__(self) -> None:
        if self.net.kind != "siren":
            raise invalid("net.kind", self.net.kind, "siren")
        for key in ("n_train", "n_val", "n_test"):
            count = getattr(self.net, key)
            if count % self.signals.views:
                raise invalid(f"net.{key}", count, f"a multiple of views ({self.signals.views})")
        limit = signal_limit(self.signals.kind)
        if limit is not None and self.networks > limit * self.signals.views:
            allowed = f"n_train + n_val + n_test <= {self.signals.views} views x {limit}"
            raise invalid("net.n_train", self.net.n_train, f"{allowed} digit images")

    @property
    def networks(self) -> int:
        return self.net.n_train + self.net.n_val + self.net.n_test


@dataclass(frozen=True)
class InrCfg:
    """Section `inr` of params.yaml."""

    seed: Seed  # network j of every INR zoo trains from seed + j
    zoos: dict[Name, InrZooCfg]  # by folder name
    aligner: AlignerCfg  # DEEP-ALIGN on each zoo's train signals (augment.rescale 0: no
    # SIREN keeps its function under ReLU rescaling)
    methods: list[str]
    pairs: Count  # test pairs: two fits of one test signal
    points: GridPoints
    converge_pairs: Positive  # the first K test pairs, for Sinkhorn from three starts
    converge_steps: list[Annotated[int, between(0, MAX_POINTS)]]  # step counts scored

    def __post_init__(self) -> None:
        check_methods("methods", self.methods)
        if not self.zoos:
            raise invalid("zoos", self.zoos, "at least one INR zoo")
        if self.aligner.augment.rescale > 0:
            raise invalid("aligner.augment.rescale", self.aligner.augment.rescale, "0 for SIRENs")


def zoo_data(zoo: InrZooCfg) -> Dataset:
    """The zoo's data: every network's signal on the shared coordinates."""
    return inr_dataset(zoo.signals, zoo.networks)


def settings(align: AlignCfg, aligner: Path, pairs: int) -> AlignCfg:
    """The align stage's method settings, with this zoo's own DEEP-ALIGN model."""
    return dataclasses.replace(align, pairs=pairs, deep_align=DeepAlignCfg([str(aligner)]))


def score_methods(
    zoo: Zoo, data: Dataset, cfg: InrCfg, methods: AlignCfg, name: str
) -> tuple[dict[str, dict], dict[str, list]]:
    """Every method on the zoo's test pairs: barrier metrics and the lines behind them."""
    return experiment.score_methods(zoo, data, cfg.methods, methods, cfg.points, f"inr {name}")


def convergence(
    zoo: Zoo, data: Dataset, cfg: InrCfg, methods: AlignCfg, name: str
) -> tuple[list[dict], dict[str, dict]]:
    """Sinkhorn re-basin's barrier after each step count of the grid, from the identity,
    weight matching and DEEP-ALIGN: rows per start, pair and steps, and the summary."""
    if methods.sinkhorn.loss == "l2":
        raise DeepAlignError("inr: align.sinkhorn.loss is l2; the INR curves need a task loss")
    grid = cv.ConvergeCfg([name], cfg.converge_pairs, cfg.converge_steps, cfg.points)
    rows, _ = cv.refine_rows(name, zoo, data, methods, grid)
    return rows, cv.summarize_convergence(rows, cfg.converge_steps, methods.sinkhorn.steps)
