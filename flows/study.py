"""Stage `study` (study/dvc.yaml, outside the default run): DEEP-ALIGN vs zoo size and steps."""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import flow

import flows  # noqa: F401  (offline defaults first)
from deepalign.config import load_section
from deepalign.core.data import DataCfg, load_dataset
from deepalign.evaluation.report import plot_scaling
from deepalign.evaluation.study import (
    StudyCfg,
    build_train_networks,
    scaling_rows,
    weight_matching_barrier,
)
from deepalign.io import write_csv
from deepalign.methods import MethodsCfg
from deepalign.methods.deep_align.train import AlignerCfg
from deepalign.zoo.build import ZooCfg
from deepalign.zoo.store import load_zoo
from flows.common import cli, log_metrics_file, stage_run


@flow(name="study")
def study(
    params: Path = Path("params.yaml"),
    zoo: Path = Path("zoo"),
    out: Path = Path("study"),
    plots: Path = Path("plots"),
    metrics: Path = Path("metrics/study.json"),
) -> dict:
    """Test barrier of DEEP-ALIGN per train-set size and step count, and weight matching's."""
    cfg, aligner = (
        load_section("study", StudyCfg, params),
        load_section("aligner", AlignerCfg, params),
    )
    zoo_cfg, data_cfg = load_section("zoo", ZooCfg, params), load_section("data", DataCfg, params)
    wm = load_section("align", MethodsCfg, params, allow_extra=True).weight_matching
    data, base = load_dataset(data_cfg), load_zoo(zoo / cfg.arch)
    with stage_run("study", cfg, aligner):
        net, size = zoo_cfg.archs[cfg.arch], max(cfg.train_sizes)
        nets = build_train_networks(out / "zoo" / cfg.arch, net, zoo_cfg, data_cfg, data, size)
        rows = scaling_rows(nets, base, data, aligner, cfg, out / "zoo")
        wm_barrier = weight_matching_barrier(base, data, cfg, wm)
        summary = {"weight_matching": wm_barrier} | {
            f"n{r['train_networks']}_s{r['mark']}": r["deep_align"] for r in rows
        }
        write_csv(
            plots / "aligner_scaling.csv", [r | {"weight_matching": wm_barrier} for r in rows]
        )
        plot_scaling(plots / "aligner_scaling.png", rows, wm_barrier, f"digits {cfg.arch}")
        log_metrics_file(metrics, summary)
        mlflow.log_artifact(str(plots / "aligner_scaling.png"))
    return summary


if __name__ == "__main__":
    cli(study)
