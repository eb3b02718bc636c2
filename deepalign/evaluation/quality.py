"""Experiments on DEEP-ALIGN's one pass: the default recipe against one change at a time, each
trained from several aligner seeds on one zoo and scored on its test pairs against weight
matching (ratio, gap closed, paired interval of the barrier difference).

The changes: pair-aware coupling (`aligner.model.coupling`), semi-amortised training
(`aligner.unroll_steps`), and the paper's regime, the default recipe on wider MLP zoos.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

from deepalign.config import GridPoints, Iterations, Positive, Seed, Steps, invalid
from deepalign.core.data import Dataset
from deepalign.evaluation.experiment import (
    AlignCfg,
    gap_closed,
    method_metrics,
    over_weight_matching,
    pair_curves,
    run_method,
)
from deepalign.evaluation.stats import paired_bootstrap
from deepalign.methods import check_methods
from deepalign.methods.deep_align.model import ModelCfg
from deepalign.methods.deep_align.train import AlignerCfg
from deepalign.methods.learned import DeepAlignCfg
from deepalign.zoo.store import Zoo

ONE_PASS = "deep_align"


@dataclass(frozen=True)
class Variant:
    """A change to the `aligner` recipe: coupling rounds, unrolled steps, epochs (0: the
    recipe's)."""

    coupling: Steps
    unroll_steps: Steps
    epochs: Steps

    def applied(self, cfg: AlignerCfg, seed: int) -> AlignerCfg:
        """`cfg` with this change, trained from `seed`."""
        model: ModelCfg = dataclasses.replace(cfg.model, coupling=self.coupling)
        return dataclasses.replace(
            cfg,
            seed=seed,
            epochs=self.epochs or cfg.epochs,
            unroll_steps=self.unroll_steps,
            model=model,
        )


@dataclass(frozen=True)
class QualityCfg:
    """Section `quality`: each stage's variants of the `aligner` recipe, trained from every
    seed on zoo `arch` and scored with `methods` on its test pairs."""

    arch: str  # zoo folder (the default zoo's) whose `aligner` recipe is varied
    seeds: list[Seed]  # aligner seeds of every variant
    variants: dict[str, Variant]  # name -> change; `default` is the recipe as it is
    stages: dict[str, list[str]]  # stage -> the variants it trains (each within 15 minutes)
    widths: dict[str, list[Iterations]]  # stage -> the hidden widths of the MLP zoos it trains
    width_seed: Seed  # network j of a wider zoo trains from width_seed + j
    methods: list[str]  # scored on every aligner; weight_matching and deep_align required
    pairs: Positive  # test pairs (i, i+1)
    points: GridPoints
    bootstrap: Positive

    def __post_init__(self) -> None:
        check_methods("methods", self.methods)
        for needed in ("weight_matching", ONE_PASS):
            if needed not in self.methods:
                raise invalid("methods", self.methods, f"a list including {needed}")
        for stage, names in self.stages.items():
            for name in names:
                if name not in self.variants:
                    raise invalid(f"stages.{stage}", names, f"names of `variants` ({name}?)")
        for stage in self.widths:
            if stage not in self.stages:
                raise invalid(f"widths.{stage}", self.widths[stage], "a stage of `stages`")


def trained_variants(cfg: QualityCfg, names: list[str]) -> Iterator[tuple[str, int, Variant]]:
    """(variant, seed, change) for every variant of `names` and every seed."""
    for name in names:
        for seed in cfg.seeds:
            yield name, seed, cfg.variants[name]


def score_aligner(
    zoo: Zoo, data: Dataset, cfg: QualityCfg, align: AlignCfg, aligner: str
) -> dict[str, dict]:
    """Every method of `cfg` on the zoo's test pairs, DEEP-ALIGN read from file `aligner`:
    per method its mean barrier, its ratio to weight matching, the gap it closes and its
    seconds per pair; and the paired difference one pass - weight matching, 95% interval."""
    settings = dataclasses.replace(align, pairs=cfg.pairs, deep_align=DeepAlignCfg([aligner]))
    summary, per_pair = {}, {}
    for method in cfg.methods:
        run = run_method(method, zoo, data, settings)
        summary[method], rows = method_metrics(run, pair_curves(run, zoo, data, cfg.points))
        per_pair[method] = [r["loss_barrier"] for r in rows]
    ratio, closed = over_weight_matching(summary), gap_closed(summary)
    methods = {}
    for m, v in summary.items():  # ratio and gap closed where defined (weight matching > 0)
        methods[m] = {"loss_barrier": v["loss_barrier_mean"]}
        if m in ratio:
            methods[m]["loss_barrier_over_weight_matching"] = ratio[m]
        if m in closed:
            methods[m]["gap_closed"] = closed[m]
        methods[m]["seconds_per_pair"] = v["seconds_per_pair_mean"]
    diff = paired_bootstrap(per_pair[ONE_PASS], per_pair["weight_matching"], cfg.bootstrap)
    return {"methods": methods, "compare": {f"{ONE_PASS} - weight_matching": diff}}
