"""Stage `merge` (study pipeline): pairs of networks trained on complementary class skews of
digits, aligned by every method, averaged with `deepalign`'s merge code and judged on the
whole test split against both endpoints."""

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
    configs={"data_cfg": "data", "zoo_cfg": "zoo", "cfg": "merge", "align": "align"},
    params=("data", "zoo.archs", "merge", *ALIGN_KEYS),
    partial=("zoo_cfg", "align"),  # the recipes of `zoo`; the method settings of `align`
    reads=("aligner",),
    persist={"out": "merge"},
    plots={"interpolation": "plots/merge"},
    uncached={"figures": "figures/merge"},
    plot={"interpolation": Plot("lambda", "test_acc", "lambda", "test accuracy (all classes)")},
    metrics={"metrics": "metrics/merge.json"},
    nested=("metrics",),
    notes={"out": "(a zoo per side: `a/`, `b/`)"},
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
def merge_sides(run: StageRun, zoos: dict, data: Dataset, cfg, align: AlignCfg) -> dict:
    """Every method on the pairs (A_k, B_k): nested MLflow runs, mean lines as CSV and PNG."""
    zoo, pairs = disjoint.paired(zoos["a"], zoos["b"])
    summary, lines = disjoint.merge_pairs(zoo, pairs, data, cfg, align)
    for method, metrics in summary.items():
        log_method_run(run, STAGE.name, cfg.arch, method, metrics)
    write_csv(run.io.interpolation / "interpolation_disjoint.csv", interpolation_rows(lines))
    plot_curves(run.io.figures / "interpolation_disjoint.png", lines, f"{cfg.arch}, A to B")
    return summary


@flow(name="merge", validate_parameters=False)
def merge(
    io: Paths, data_cfg: DataCfg, zoo_cfg: build.ZooCfg, cfg: disjoint.MergeCfg, align: AlignCfg
) -> dict:
    """Train both sides, align and merge every pair by every method; logged to MLflow."""
    data = load_dataset(data_cfg)
    net = disjoint.side_recipe(build.recipe_of(zoo_cfg, cfg.arch, "merge.arch"), cfg)
    shifts = disjoint.side_shifts(cfg, data.n_classes)
    with stage_run(STAGE, io, data_cfg=data_cfg, cfg=cfg) as run:
        zoos, sides = {}, {}
        for side, shift in shifts.items():
            seed = disjoint.side_seed(cfg, side)
            zoos[side], sides[side] = side_zoo(io.out / side, data, data_cfg, net, seed, shift)
        methods = merge_sides(run, zoos, data, cfg, align)
        run.metrics["metrics"] = {"sides": sides, "methods": methods}
    return run.metrics


if __name__ == "__main__":
    cli(merge)
