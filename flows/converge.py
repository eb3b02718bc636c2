"""Stage `converge`: Sinkhorn re-basin from the identity, weight matching and DEEP-ALIGN."""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

import flows  # noqa: F401  (offline defaults first)
from deepalign.config import load_section
from deepalign.core.data import DataCfg, Dataset, load_dataset
from deepalign.evaluation.convergence import (
    ConvergeCfg,
    refine_rows,
    summarize_convergence,
    summarize_layers,
)
from deepalign.evaluation.report import plot_convergence
from deepalign.io import write_csv
from deepalign.methods import MethodsCfg
from deepalign.zoo.store import load_zoo
from flows.common import cli, log_metrics_file, stage_run


@task(cache_policy=NO_CACHE)
def converge_arch(
    arch: str, zoo_dir: Path, plots: Path, data: Dataset, methods: MethodsCfg, cfg: ConvergeCfg
) -> dict:
    """Barrier-vs-steps of the three starts on one architecture's test pairs."""
    rows, layers = refine_rows(arch, load_zoo(zoo_dir / arch), data, methods, cfg)
    summary = summarize_convergence(rows, cfg.steps, methods.sinkhorn.steps)
    summary["deep_align"]["per_group"] = summarize_layers(layers)
    write_csv(plots / f"refine_convergence_{arch}.csv", rows)
    target = summary["target_loss_barrier"]["value"]
    plot_convergence(plots / f"refine_convergence_{arch}.png", rows, target, f"digits {arch}")
    return summary


@flow(name="converge")
def converge(
    params: Path = Path("params.yaml"),
    zoo: Path = Path("zoo"),
    plots: Path = Path("plots/converge"),
    metrics: Path = Path("metrics/converge.json"),
) -> dict:
    """How many Sinkhorn steps each start needs to reach plain Sinkhorn's final barrier."""
    data_cfg, cfg = (
        load_section("data", DataCfg, params),
        load_section("converge", ConvergeCfg, params),
    )
    methods = load_section("align", MethodsCfg, params, allow_extra=True)  # the align settings
    data = load_dataset(data_cfg)
    with stage_run("converge", cfg, methods.sinkhorn):
        summary = {arch: converge_arch(arch, zoo, plots, data, methods, cfg) for arch in cfg.archs}
        log_metrics_file(metrics, summary)
        mlflow.log_artifacts(str(plots), artifact_path="plots")
    return summary


if __name__ == "__main__":
    cli(converge)
