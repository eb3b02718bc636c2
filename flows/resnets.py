"""Stage `resnets` (study pipeline): a zoo of ResNets with BatchNorm, aligned by the classical
methods, scored on straight lines with BatchNorm statistics reset and kept, and joined by
Bezier curves."""

from __future__ import annotations

from pathlib import Path

import mlflow
import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

import flows  # noqa: F401  (offline defaults first)
from deepalign.core.data import DataCfg, Dataset, load_dataset
from deepalign.evaluation import curves as mc
from deepalign.evaluation import resnets as rs
from deepalign.evaluation.experiment import AlignCfg
from deepalign.evaluation.figures import plot_curve_accuracy
from deepalign.io import write_csv
from deepalign.zoo.store import load_zoo
from flows.common import StageRun, cli, stage_run
from flows.stages import Paths, Plot, Stage
from flows.studies import publish_scores, trained_zoo

STAGE = Stage(
    "resnets",
    configs={"data_cfg": "data", "cfg": "resnets", "align": "align", "curves": "curves"},
    params=(
        "data",
        "resnets",
        "align.weight_matching",
        "align.activation_matching",
        "align.planted_pairs",
        "align.planted_noise",
        "align.seed",
        "curves.fit",
        "curves.points",
    ),
    partial=("align", "curves"),  # method settings of `align`; fit and t grid of `curves`
    persist={"out": "resnets"},
    plots={"interpolation": "plots/resnets/interpolation", "curves": "plots/resnets/curves"},
    uncached={"figures": "figures/resnets"},
    plot={
        "interpolation": Plot("lambda", "test_loss", "lambda", "test loss", "by_method_log"),
        "curves": Plot("t", "curve_acc", "t along the curve", "test accuracy"),
    },
    metrics={"metrics": "metrics/resnets.json"},
    notes={"out": "(the zoo: `net-NNNN.pt` + `manifest.json`)", "metrics": "(~13 min)"},
    pipeline="study/dvc.yaml",
)


@task(cache_policy=NO_CACHE)
def train_zoo(folder: Path, data: Dataset, data_cfg: DataCfg, cfg: rs.ResNetStudyCfg) -> dict:
    """Train the networks not yet trained with these settings (resumes), then the manifest."""
    _, summary = trained_zoo(folder, "resnet", cfg.zoo, cfg.seed, (data, data_cfg))
    mlflow.log_artifact(str(folder / "manifest.json"), artifact_path="resnets")
    return summary


@task(cache_policy=NO_CACHE)
def lines(run: StageRun, runs: dict, zoo, data: Dataset, cfg: rs.ResNetStudyCfg) -> dict:
    """Straight lines with BatchNorm statistics reset (the scored ones) and kept."""
    reset, curves = rs.line_metrics(runs, zoo, data, cfg, reset=True)
    kept, _ = rs.line_metrics(runs, zoo, data, cfg, reset=False)
    publish_scores(run, STAGE.name, "resnet", (reset, curves), "digits resnet (BN reset)")
    return {"bn_reset": reset, "bn_kept": kept, "loss_barrier_over_naive": rs.barrier_ratios(reset)}


@task(cache_policy=NO_CACHE)
def fit_curves(run: StageRun, runs: dict, zoo, data: Dataset, cfg, fit: mc.CurvesCfg) -> dict:
    """Bezier curves between each configured method's endpoints."""
    results = rs.bezier_curves(runs, zoo, data, cfg, fit)
    write_csv(run.io.curves / "curves_resnet.csv", mc.curve_rows(results))
    plot_curve_accuracy(run.io.figures / "curves_resnet.png", results, "digits resnet")
    return {m: mc.summarize_curves(r) for m, r in results.items()}


@flow(name="resnets", validate_parameters=False)
def resnets(
    io: Paths, data_cfg: DataCfg, cfg: rs.ResNetStudyCfg, align: AlignCfg, curves: mc.CurvesCfg
) -> dict:
    """Build, align and score the ResNet zoo; everything logged to MLflow."""
    data = load_dataset(data_cfg)
    torch.manual_seed(curves.fit.seed)
    with stage_run(STAGE, io, data_cfg=data_cfg, cfg=cfg) as run:
        zoo_summary = train_zoo(io.out, data, data_cfg, cfg)
        zoo = load_zoo(io.out, data)
        runs = rs.aligned_runs(zoo, data, cfg, align)
        metrics = {"zoo": zoo_summary, **lines(run, runs, zoo, data, cfg)}
        metrics["curves"] = fit_curves(run, runs, zoo, data, cfg, curves)
        run.metrics["metrics"] = metrics
    return run.metrics


if __name__ == "__main__":
    cli(resnets)
