"""Stage `ood` (study pipeline): the DEEP-ALIGN model trained on the default zoo, applied
unchanged to zoos of its architecture trained on rotated digits and with SGD, beside every
classical method."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

import flows  # noqa: F401  (offline defaults first)
from deepalign.core.data import DataCfg, Dataset, load_dataset
from deepalign.core.shifts import shifted
from deepalign.evaluation import ood as study
from deepalign.evaluation.experiment import AlignCfg
from deepalign.evaluation.report import interpolation_rows, plot_curves
from deepalign.io import write_csv
from deepalign.zoo import build
from deepalign.zoo.store import Zoo, load_zoo
from flows.common import StageRun, cli, log_method_run, stage_run
from flows.stages import Paths, Plot, Stage

ALIGN_KEYS = tuple(
    f"align.{k}"
    for k in (
        "weight_matching",
        "activation_matching",
        "ste",
        "sinkhorn",
        "deep_align",
        "planted_pairs",
        "planted_noise",
        "seed",
    )
)

STAGE = Stage(
    "ood",
    configs={"data_cfg": "data", "zoo_cfg": "zoo", "cfg": "ood", "align": "align"},
    params=("data", "zoo.archs", "ood", *ALIGN_KEYS),
    partial=("zoo_cfg", "align"),  # the recipes of `zoo`; the method settings of `align`
    reads=("aligner",),
    persist={"out": "ood"},
    plots={"interpolation": "plots/ood"},
    uncached={"figures": "figures/ood"},
    plot={"interpolation": Plot("lambda", "test_loss", "lambda", "test loss", "by_method_log")},
    metrics={"metrics": "metrics/ood.json"},
    nested=("metrics",),
    notes={"out": "(a zoo per shift: `<shift>/net-NNNN.pt` + `manifest.json`)"},
    pipeline="study/dvc.yaml",
)


@task(cache_policy=NO_CACHE)
def shifted_zoo(
    folder: Path, data: Dataset, data_cfg: DataCfg, net: build.NetCfg, cfg: study.OodCfg, name: str
) -> tuple[Zoo, Dataset, dict]:
    """Train the shifted zoo's networks not yet trained (resumes); the zoo, its data, summary."""
    shift = study.data_shift(cfg, cfg.zoos[name])
    moved = shifted(data, shift)
    records, trained = build.train_zoo(
        folder, name, net, cfg.seed, (moved, data_cfg), asdict(shift)
    )
    return load_zoo(folder, moved), moved, build.summarize(records, trained)


@task(cache_policy=NO_CACHE)
def score(run: StageRun, name: str, zoo: Zoo, data: Dataset, cfg: study.OodCfg, align) -> dict:
    """Every method on the shifted zoo: nested MLflow runs, the mean lines as CSV and PNG."""
    summary, lines = study.score_methods(zoo, data, cfg, align, name)
    for method, metrics in summary.items():
        log_method_run(run, STAGE.name, name, method, metrics)
    write_csv(run.io.interpolation / f"interpolation_{name}.csv", interpolation_rows(lines))
    plot_curves(run.io.figures / f"interpolation_{name}.png", lines, f"{cfg.arch}, {name}")
    return summary


@flow(name="ood", validate_parameters=False)
def ood(
    io: Paths, data_cfg: DataCfg, zoo_cfg: build.ZooCfg, cfg: study.OodCfg, align: AlignCfg
) -> dict:
    """Train each shifted zoo, align and score it with every method; logged to MLflow."""
    data = load_dataset(data_cfg)
    base = build.recipe_of(zoo_cfg, cfg.arch, "ood.arch")
    with stage_run(STAGE, io, data_cfg=data_cfg, cfg=cfg) as run:
        metrics = {}
        for name, shift in cfg.zoos.items():
            net = study.recipe(base, cfg, shift)
            zoo, moved, summary = shifted_zoo(io.out / name, data, data_cfg, net, cfg, name)
            metrics[name] = {"zoo": summary, "methods": score(run, name, zoo, moved, cfg, align)}
        run.metrics["metrics"] = {"arch": cfg.arch, "zoos": metrics}
    return run.metrics


if __name__ == "__main__":
    cli(ood)
