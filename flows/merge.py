"""Stage `merge` (study pipeline): pairs of networks trained on complementary class skews of
digits (the default zoo's architecture, then ResNets with BatchNorm), aligned by every
method, averaged with `deepalign`'s merge code and judged on the whole test split against
both endpoints."""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

import flows  # noqa: F401  (offline defaults first)
from deepalign.core.data import DataCfg, Dataset, load_dataset
from deepalign.evaluation import disjoint
from deepalign.evaluation.experiment import AlignCfg
from deepalign.zoo import build
from flows.common import StageRun, cli, stage_run
from flows.stages import Paths, Plot, Stage
from flows.studies import ALIGN_KEYS, publish_scores, shifted_zoo

STAGE = Stage(
    "merge",
    configs={
        "data_cfg": "data",
        "zoo_cfg": "zoo",
        "resnet_net": "resnets.zoo",
        "cfg": "merge",
        "align": "align",
    },
    params=("data", "zoo.archs", "resnets.zoo", "merge", *ALIGN_KEYS),
    partial=("zoo_cfg", "align"),  # the recipes of `zoo`; the method settings of `align`
    reads=("aligner", "resnets_aligner"),
    persist={"out": "merge"},
    plots={"interpolation": "plots/merge"},
    uncached={"figures": "figures/merge"},
    plot={"interpolation": Plot("lambda", "test_acc", "lambda", "test accuracy (all classes)")},
    metrics={"metrics": "metrics/merge.json"},
    nested=("metrics",),
    notes={"out": "(per architecture, a zoo per side: `mlp/a/`, `mlp/b/`, `resnet/a/`, ...)"},
    pipeline="study/dvc.yaml",
)


@task(cache_policy=NO_CACHE)
def merge_sides(
    run: StageRun, zoos: dict, data: Dataset, sides: disjoint.Sides, cfg, align: AlignCfg
) -> dict:
    """Every method on the pairs (A_k, B_k): nested MLflow runs, mean lines as CSV and PNG."""
    zoo, pairs = disjoint.paired(zoos["a"], zoos["b"])
    scored = disjoint.merge_pairs(zoo, pairs, data, sides, cfg.points, align)
    return publish_scores(run, STAGE.name, sides.arch, scored, f"{sides.arch}, A to B")


@flow(name="merge", validate_parameters=False)
def merge(
    io: Paths,
    data_cfg: DataCfg,
    zoo_cfg: build.ZooCfg,
    resnet_net: build.NetCfg,
    cfg: disjoint.MergeCfg,
    align: AlignCfg,
) -> dict:
    """Train both sides of each architecture, align and merge every pair by every method;
    logged to MLflow."""
    data = load_dataset(data_cfg)
    default = build.recipe_of(zoo_cfg, cfg.arch, "merge.arch")
    shifts = disjoint.side_shifts(cfg, data.n_classes)
    with stage_run(STAGE, io, data_cfg=data_cfg, resnet_net=resnet_net, cfg=cfg) as run:
        for sides in disjoint.plan_sides(cfg, default, resnet_net):
            zoos, summaries = {}, {}
            for side, shift in shifts.items():  # each side trains on its class skew
                folder, seed = io.out / sides.arch / side, sides.seed_of(side)
                zoos[side], skewed, summary = shifted_zoo(
                    folder, side, sides.net, seed, (data, data_cfg), shift
                )
                summaries[side] = summary | {"train_images": len(skewed.train.y)}
            methods = merge_sides(run, zoos, data, sides, cfg, align)
            run.metrics.setdefault("metrics", {})[sides.arch] = {
                "sides": summaries,
                "methods": methods,
            }
    return run.metrics


if __name__ == "__main__":
    cli(merge)
