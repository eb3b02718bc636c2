"""Stage `merge` (study pipeline): pairs of networks trained on complementary class skews of
digits (the default zoo's architecture, then ResNets with BatchNorm), aligned by every
method, averaged with `deepalign`'s merge code and judged on the whole test split against
both endpoints."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

import flows  # noqa: F401  (offline defaults first)
from deepalign.core.data import DataCfg, Dataset, load_dataset
from deepalign.core.shifts import ShiftCfg, shifted
from deepalign.evaluation import disjoint
from deepalign.evaluation.experiment import AlignCfg
from deepalign.evaluation.report import interpolation_rows, plot_curves
from deepalign.io import write_csv
from deepalign.zoo import build
from deepalign.zoo.store import Zoo, load_zoo
from flows.common import StageRun, cli, log_method_run, stage_run
from flows.ood import ALIGN_KEYS
from flows.stages import Paths, Plot, Stage

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
    reads=("aligner",),
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
def side_zoo(
    folder: Path, data: Dataset, data_cfg: DataCfg, net: build.NetCfg, seed: int, shift: ShiftCfg
) -> tuple[Zoo, dict]:
    """Train one side's networks not yet trained (resumes) on its class skew."""
    skewed = shifted(data, shift)
    records, trained = build.train_zoo(
        folder, folder.name, net, seed, (skewed, data_cfg), asdict(shift)
    )
    return load_zoo(folder, data), build.summarize(records, trained) | {
        "train_images": len(skewed.train.y)
    }


@task(cache_policy=NO_CACHE)
def merge_sides(
    run: StageRun, zoos: dict, data: Dataset, sides: disjoint.Sides, cfg, align: AlignCfg
) -> dict:
    """Every method on the pairs (A_k, B_k): nested MLflow runs, mean lines as CSV and PNG."""
    zoo, pairs = disjoint.paired(zoos["a"], zoos["b"])
    summary, lines = disjoint.merge_pairs(zoo, pairs, data, sides, cfg.points, align)
    for method, metrics in summary.items():
        log_method_run(run, STAGE.name, sides.arch, method, metrics)
    name = f"interpolation_{sides.arch}"
    write_csv(run.io.interpolation / f"{name}.csv", interpolation_rows(lines))
    plot_curves(run.io.figures / f"{name}.png", lines, f"{sides.arch}, A to B")
    return summary


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
            for side, shift in shifts.items():
                folder = io.out / sides.arch / side
                seed = sides.seed_of(side)
                zoos[side], summaries[side] = side_zoo(
                    folder, data, data_cfg, sides.net, seed, shift
                )
            methods = merge_sides(run, zoos, data, sides, cfg, align)
            run.metrics.setdefault("metrics", {})[sides.arch] = {
                "sides": summaries,
                "methods": methods,
            }
    return run.metrics


if __name__ == "__main__":
    cli(merge)
