"""Stage `curves`: Bezier curves between the endpoints of every alignment, and PAM."""

from __future__ import annotations

from pathlib import Path

import mlflow
import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

import flows  # noqa: F401  (offline defaults first)
from deepalign.config import load_section
from deepalign.core.data import DataCfg, Dataset, load_dataset
from deepalign.errors import DeepAlignError
from deepalign.evaluation.curves import (
    CurvesCfg,
    curve_rows,
    endpoints,
    fit_and_evaluate,
    pam_and_evaluate,
    summarize_curves,
)
from deepalign.evaluation.pairs import load_run
from deepalign.evaluation.report import plot_curve_accuracy
from deepalign.io import write_csv
from deepalign.zoo.store import load_zoo
from flows.common import cli, log_metrics_file, stage_run


def _run(aligned: Path, arch: str, method: str):
    run = load_run(aligned / arch / f"{method}.pt")
    if run is None:
        raise DeepAlignError(
            f"{aligned / arch / method}.pt: missing; add '{method}' to align.methods"
        )
    return run


@task(cache_policy=NO_CACHE)
def curves_for_arch(
    arch: str, zoo_dir: Path, aligned: Path, plots: Path, data: Dataset, cfg: CurvesCfg, parent: str
) -> dict:
    """Fit and score curves for every method's alignment of one architecture's pairs."""
    zoo, results = load_zoo(zoo_dir / arch), {}
    for method in cfg.methods:
        run = _run(aligned, arch, method)
        a, _, b = endpoints(zoo.nets, run.pairs[: cfg.pairs], run.perms)
        results[method] = fit_and_evaluate(zoo.arch, a, b, data.train, data.test, cfg)
    if cfg.pam_from:
        run = _run(aligned, arch, cfg.pam_from)
        a, b_raw, _ = endpoints(zoo.nets, run.pairs[: cfg.pairs], run.perms)
        perms = {g: p[: cfg.pairs] for g, p in run.perms.items()}
        results[f"{cfg.pam_from}+pam"], _ = pam_and_evaluate(
            zoo.arch, a, b_raw, perms, data.train, data.test, cfg
        )
    summary = {m: summarize_curves(r) for m, r in results.items()}
    for method, metrics in summary.items():
        with mlflow.start_run(run_name=f"{arch}/{method}", nested=True, parent_run_id=parent):
            mlflow.log_params({"arch": arch, "method": method})
            mlflow.log_metrics(metrics)
    write_csv(plots / f"curves_{arch}.csv", curve_rows(results))
    plot_curve_accuracy(plots / f"curves_{arch}.png", results, f"digits {arch}")
    return summary


@flow(name="curves")
def curves(
    params: Path = Path("params.yaml"),
    zoo: Path = Path("zoo"),
    aligned: Path = Path("aligned"),
    plots: Path = Path("plots/curves"),
    metrics: Path = Path("metrics/curves.json"),
) -> dict:
    """Mode-connectivity curves for every configured alignment, logged to MLflow."""
    data_cfg, cfg = load_section("data", DataCfg, params), load_section("curves", CurvesCfg, params)
    data = load_dataset(data_cfg)
    torch.manual_seed(cfg.fit.seed)
    with stage_run("curves", data_cfg, cfg) as run:
        summary = {
            arch: curves_for_arch(arch, zoo, aligned, plots, data, cfg, run.info.run_id)
            for arch in cfg.archs
        }
        log_metrics_file(metrics, summary)
        mlflow.log_artifacts(str(plots), artifact_path="plots")
    return summary


if __name__ == "__main__":
    cli(curves)
