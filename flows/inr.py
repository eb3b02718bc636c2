"""Stage `inr` (study pipeline): SIREN zoos fitted to sine waves and digit images, a
DEEP-ALIGN model trained on each, every method on two fits of each test signal, and Sinkhorn
re-basin's barrier against its steps from three starts."""

from __future__ import annotations

from pathlib import Path

import mlflow
import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

import flows  # noqa: F401  (offline defaults first)
from deepalign.core.data import Dataset
from deepalign.evaluation import inr as study
from deepalign.evaluation.experiment import AlignCfg
from deepalign.evaluation.figures import plot_convergence
from deepalign.io import write_csv
from deepalign.methods.deep_align import train as trainer
from deepalign.zoo.store import Zoo, load_zoo, zoo_digest
from flows.common import StageRun, cli, stage_run, untimed
from flows.stages import Paths, Plot, Stage
from flows.studies import ALIGN_KEYS, publish_scores, trained_zoo

STAGE = Stage(
    "inr",
    configs={"cfg": "inr", "align": "align"},
    params=("inr", *(k for k in ALIGN_KEYS if k != "align.deep_align")),
    partial=("align",),  # the method settings of `align`
    persist={"out": "inr"},
    plots={"interpolation": "plots/inr/interpolation", "converge": "plots/inr/converge"},
    uncached={"figures": "figures/inr"},
    plot={
        "interpolation": Plot("lambda", "test_loss", "lambda", "test MSE", "by_method_log"),
        "converge": Plot("steps", "loss_barrier", "Sinkhorn steps", "MSE barrier", "by_method_log"),
    },
    metrics={"metrics": "metrics/inr.json"},
    nested=("metrics",),
    notes={"out": "(per signal kind: the zoo `net-NNNN.pt` + `manifest.json`, `aligner.pt`)"},
    pipeline="study/dvc.yaml",
)


@task(cache_policy=NO_CACHE)
def fit_zoo(folder: Path, name: str, cfg: study.InrCfg) -> tuple[Zoo, Dataset, dict]:
    """Fit the INRs not yet fitted with these settings (resumes); the zoo, its data, summary."""
    zoo_cfg = cfg.zoos[name]
    signals = (study.zoo_data(zoo_cfg), zoo_cfg.signals)
    data, summary = trained_zoo(
        folder, name, zoo_cfg.net, cfg.seed, signals, views=signals[1].views
    )
    mlflow.log_artifact(str(folder / "manifest.json"), artifact_path=f"inr/{name}")
    return load_zoo(folder, data), data, summary


@task(cache_policy=NO_CACHE)
def train_aligner(folder: Path, zoo: Zoo, data: Dataset, cfg: trainer.AlignerCfg) -> dict:
    """DEEP-ALIGN on the zoo's train signals (resumes), saved as `aligner.pt`; its numbers."""
    fp = trainer.aligner_fingerprint(cfg, zoo.arch, zoo_digest(folder), data)
    out, desc = folder / "aligner.pt", f"aligner {folder.name}"
    return trainer.train_and_save(zoo, data, cfg, out, fp, "test", {}, desc=desc)


@task(cache_policy=NO_CACHE)
def score(run: StageRun, name: str, zoo: Zoo, data: Dataset, cfg, methods: AlignCfg) -> dict:
    """Every method on the test pairs: nested MLflow runs, the mean lines as CSV and PNG."""
    scored = study.score_methods(zoo, data, cfg, methods, name)
    return publish_scores(run, STAGE.name, name, scored, f"SIREN, {name} signals")


@task(cache_policy=NO_CACHE)
def converge(run: StageRun, name: str, zoo: Zoo, data: Dataset, cfg, methods: AlignCfg) -> dict:
    """Sinkhorn's barrier against its steps from three starts, as CSV and PNG."""
    rows, summary = study.convergence(zoo, data, cfg, methods, name)
    write_csv(run.io.converge / f"converge_{name}.csv", untimed(rows))
    target = summary["target_loss_barrier"]["value"]
    plot_convergence(run.io.figures / f"converge_{name}.png", rows, target, f"SIREN, {name}")
    return summary


@flow(name="inr", validate_parameters=False)
def inr(io: Paths, cfg: study.InrCfg, align: AlignCfg) -> dict:
    """Fit each INR zoo, train its aligner, align and score it; logged to MLflow."""
    torch.manual_seed(cfg.seed)
    with stage_run(STAGE, io, cfg=cfg) as run:
        metrics = {}
        for name in cfg.zoos:
            folder = io.out / name
            zoo, data, summary = fit_zoo(folder, name, cfg)
            aligner = train_aligner(folder, zoo, data, cfg.aligner)
            methods = study.settings(align, folder / "aligner.pt", cfg.pairs)
            metrics[name] = {
                "zoo": summary,
                "aligner": aligner,
                "methods": score(run, name, zoo, data, cfg, methods),
                "converge": converge(run, name, zoo, data, cfg, methods),
            }
        run.metrics["metrics"] = metrics
    return run.metrics


if __name__ == "__main__":
    cli(inr)
