"""Stage `evaluate`: barriers, merged accuracy, timings and recovery of every method."""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

import flows  # noqa: F401  (offline defaults first)
from deepalign.config import load_section
from deepalign.core.data import DataCfg, Dataset, load_dataset
from deepalign.errors import DeepAlignError
from deepalign.evaluation.experiment import (
    AlignCfg,
    EvaluateCfg,
    method_metrics,
    pair_curves,
    paired_comparisons,
)
from deepalign.evaluation.pairs import load_run
from deepalign.evaluation.report import interpolation_rows, plot_curves
from deepalign.io import write_csv
from deepalign.zoo.store import load_zoo
from flows.common import cli, log_metrics_file, stage_run


@task(cache_policy=NO_CACHE)
def evaluate_arch(
    arch: str,
    methods: list[str],
    zoo_dir: Path,
    aligned: Path,
    plots: Path,
    data: Dataset,
    cfg: EvaluateCfg,
    parent: str,
) -> tuple[dict, list[dict]]:
    """Curves and metrics of every method on one architecture's pairs."""
    zoo = load_zoo(zoo_dir / arch)
    summary, rows, curves = {}, [], {}
    for method in methods:
        run = load_run(aligned / arch / f"{method}.pt")
        if run is None:
            raise DeepAlignError(f"{aligned / arch / method}.pt: missing; run the align stage")
        curves[method] = pair_curves(run, zoo, data, cfg.points)
        summary[method], pair_rows = method_metrics(run, curves[method])
        rows += [
            {"arch": arch, "method": method, "pair": f"{i}-{j}"} | r
            for (i, j), r in zip(run.pairs, pair_rows)
        ]
        with mlflow.start_run(run_name=f"{arch}/{method}", nested=True, parent_run_id=parent):
            mlflow.log_params({"arch": arch, "method": method})
            mlflow.log_metrics(summary[method])
    write_csv(plots / f"interpolation_{arch}.csv", interpolation_rows(curves))
    plot_curves(plots / f"interpolation_{arch}.png", curves, f"digits {arch}")
    return summary, rows


@flow(name="evaluate")
def evaluate(
    params: Path = Path("params.yaml"),
    zoo: Path = Path("zoo"),
    aligned: Path = Path("aligned"),
    plots: Path = Path("plots/evaluate"),
    table: Path = Path("plots/pairs.csv"),
    metrics: Path = Path("metrics/evaluate.json"),
) -> dict:
    """Score every aligned pair along the linear path and log the comparison."""
    data_cfg, align_cfg = (
        load_section("data", DataCfg, params),
        load_section("align", AlignCfg, params),
    )
    cfg = load_section("evaluate", EvaluateCfg, params)
    data = load_dataset(data_cfg)
    summary, rows = {}, []
    with stage_run("evaluate", cfg, align_cfg) as run:
        futures = {
            arch: evaluate_arch.submit(
                arch, align_cfg.methods, zoo, aligned, plots, data, cfg, run.info.run_id
            )
            for arch in align_cfg.archs
        }
        for arch, future in futures.items():  # fan-out: one task per architecture
            summary[arch], arch_rows = future.result()
            rows += arch_rows
        write_csv(table, rows)
        log_metrics_file(metrics, summary)
        log_metrics_file(metrics.with_name("compare.json"), paired_comparisons(rows, cfg))
        mlflow.log_artifacts(str(plots), artifact_path="plots")  # this stage's folder only
        mlflow.log_artifact(str(table), artifact_path="plots")
    return summary


if __name__ == "__main__":
    cli(evaluate)
