"""Stage `ood` (study pipeline): the DEEP-ALIGN model trained on the default zoo, applied
unchanged to zoos of its architecture trained on rotated digits and with SGD, beside every
classical method."""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

import flows  # noqa: F401  (offline defaults first)
from deepalign.core.data import DataCfg, Dataset, load_dataset
from deepalign.evaluation import ood as study
from deepalign.evaluation.experiment import AlignCfg
from deepalign.zoo import build
from deepalign.zoo.store import Zoo
from flows.common import StageRun, cli, stage_run
from flows.stages import Paths, Plot, Stage
from flows.studies import ALIGN_KEYS, publish_scores, shifted_zoo

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
def score(run: StageRun, name: str, zoo: Zoo, data: Dataset, cfg: study.OodCfg, align) -> dict:
    """Every method on the shifted zoo: nested MLflow runs, the mean lines as CSV and PNG."""
    scored = study.score_methods(zoo, data, cfg, align, name)
    return publish_scores(run, STAGE.name, name, scored, f"{cfg.arch}, {name}")


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
            moves = study.data_shift(cfg, shift)
            zoo, moved, summary = shifted_zoo(
                io.out / name, name, net, cfg.seed, (data, data_cfg), moves
            )
            metrics[name] = {"zoo": summary, "methods": score(run, name, zoo, moved, cfg, align)}
        run.metrics["metrics"] = {"arch": cfg.arch, "zoos": metrics}
    return run.metrics


if __name__ == "__main__":
    cli(ood)
