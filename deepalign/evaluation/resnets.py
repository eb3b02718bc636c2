"""The ResNet study: a zoo of small ResNets with BatchNorm on digits, aligned by the classical
methods, its straight lines scored with and without recomputed BatchNorm statistics, and
Bezier curves between unaligned and aligned endpoints; and DEEP-ALIGN trained on the zoo's
train networks (the spec encoder), scored on the same test pairs with paired intervals.

A network averaged from two others has no statistics of its own: the averaged running means
and variances describe neither parent (Jordan et al. 2022's variance collapse), so every
network on a line or curve is scored after its BatchNorm statistics are recomputed on
training images (`bn_reset_images`); the same lines with the averaged statistics kept show
what the reset is worth.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tqdm import tqdm

from deepalign.config import Count, GridPoints, Positive, invalid
from deepalign.core.data import Dataset
from deepalign.errors import DeepAlignError
from deepalign.evaluation import curves as mc
from deepalign.evaluation.experiment import (
    AlignCfg,
    method_metrics,
    over_weight_matching,
    pair_curves,
    run_method,
)
from deepalign.evaluation.pairs import MethodRun
from deepalign.evaluation.stats import paired_bootstrap
from deepalign.methods import check_methods
from deepalign.methods.deep_align.train import AlignerCfg
from deepalign.zoo.kinds import NetCfg
from deepalign.zoo.store import Zoo


@dataclass(frozen=True)
class ResNetCurvesCfg:
    methods: list[str]  # alignments whose endpoints Bezier curves join
    pairs: Count  # the first K test pairs


@dataclass(frozen=True)
class ResNetStudyCfg:
    """Section `resnets` of params.yaml."""

    zoo: NetCfg  # the recipe (kind resnet); train and val networks are DEEP-ALIGN's
    seed: int
    methods: list[str]
    pairs: Count  # ring pairs of the test networks
    points: GridPoints
    bn_reset_images: Count
    curves: ResNetCurvesCfg

    def __post_init__(self) -> None:
        if self.zoo.kind != "resnet":
            raise DeepAlignError(f"resnets.zoo.kind: {self.zoo.kind!r}; this study is 'resnet'")
        check_methods("methods", self.methods)
        check_methods("curves.methods", self.curves.methods)
        missing = [m for m in self.curves.methods if m not in self.methods]
        if missing:
            raise DeepAlignError(f"resnets.curves.methods: {missing[0]} is not in resnets.methods")


def aligned_runs(zoo: Zoo, data: Dataset, cfg: ResNetStudyCfg, align: AlignCfg) -> dict:
    """Every method's alignment of the ring pairs (and of planted copies)."""
    settings = dataclasses.replace(align, pairs=cfg.pairs)
    return {m: run_method(m, zoo, data, settings) for m in cfg.methods}


def line_metrics(
    runs: dict[str, MethodRun], zoo: Zoo, data: Dataset, cfg: ResNetStudyCfg, reset: bool
) -> tuple[dict[str, dict], dict[str, list]]:
    """Barrier metrics per method on the straight lines (statistics reset or kept), and the
    curves behind them."""
    images = cfg.bn_reset_images if reset else 0
    summary, lines = {}, {}
    label = "lines, BN reset" if reset else "lines, BN kept"
    for method, run in tqdm(runs.items(), desc=label, unit="method", mininterval=5.0):
        lines[method] = pair_curves(run, zoo, data, cfg.points, images)
        summary[method], _ = method_metrics(run, lines[method])
    return summary, lines


def barrier_ratios(summary: dict[str, dict]) -> dict[str, float]:
    """Each method's mean loss barrier over naive's (the acceptance bar: <= 0.5)."""
    naive = summary["naive"]["loss_barrier_mean"]
    return {m: s["loss_barrier_mean"] / naive for m, s in summary.items() if m != "naive"}


def bezier_curves(
    runs: dict[str, MethodRun], zoo: Zoo, data: Dataset, cfg: ResNetStudyCfg, fit: mc.CurvesCfg
) -> dict[str, mc.CurveResult]:
    """A Bezier curve per pair between each method's endpoints (train-mode fit, every
    network on the t grid scored after its statistics are reset)."""
    curve_cfg = mc.CurvesCfg(
        archs=["resnet"],
        methods=cfg.curves.methods,
        pam_from="",
        pairs=cfg.curves.pairs,
        points=fit.points,
        bn_reset_images=cfg.bn_reset_images,
        fit=fit.fit,
        pam=fit.pam,
    )
    results = {}
    for method in tqdm(cfg.curves.methods, desc="Bezier curves", unit="method", mininterval=5.0):
        run = runs[method]
        a, _, b = mc.endpoints(zoo.arch, zoo.nets, run.pairs[: cfg.curves.pairs], run.perms)
        results[method] = mc.fit_and_evaluate(zoo.arch, a, b, data.train, data.test, curve_cfg)
    return results


@dataclass(frozen=True)
class ResNetLearnedCfg:
    """Section `resnets_learned` of params.yaml: DEEP-ALIGN on the ResNet zoo."""

    aligner: AlignerCfg  # trained on the zoo's train networks, validated on its val networks
    methods: list[str]  # scored on the ResNet study's test pairs (statistics reset)
    compare: list[list[str]]  # [a, b]: paired differences of the loss barrier a - b
    bootstrap: Positive

    def __post_init__(self) -> None:
        check_methods("methods", self.methods)
        for i, pair in enumerate(self.compare):
            if len(pair) != 2 or any(m not in self.methods for m in pair):
                raise invalid(f"compare[{i}]", pair, "a pair [a, b] of `methods`")
        if self.aligner.augment.rescale > 0:
            raise invalid(
                "aligner.augment.rescale", self.aligner.augment.rescale, "0 (BatchNorm networks)"
            )


def learned_scores(
    zoo: Zoo, data: Dataset, study: ResNetStudyCfg, cfg: ResNetLearnedCfg, align: AlignCfg
) -> tuple[dict[str, dict], dict[str, list], dict[str, dict]]:
    """Every method of `cfg` on the study's test pairs with statistics reset (`align`'s
    deep_align: this zoo's aligner): metrics, the lines behind them, paired differences."""
    settings = dataclasses.replace(align, pairs=study.pairs)
    summary, lines, barriers = {}, {}, {}
    for method in tqdm(cfg.methods, desc="learned", unit="method", mininterval=5.0):
        run = run_method(method, zoo, data, settings)
        lines[method] = pair_curves(run, zoo, data, study.points, study.bn_reset_images)
        summary[method], rows = method_metrics(run, lines[method])
        barriers[method] = [r["loss_barrier"] for r in rows]
    for method, ratio in over_weight_matching(summary).items():
        summary[method]["loss_barrier_over_weight_matching"] = ratio
    compared = {
        f"{a} - {b}": paired_bootstrap(barriers[a], barriers[b], cfg.bootstrap)
        for a, b in cfg.compare
    }
    return summary, lines, compared
