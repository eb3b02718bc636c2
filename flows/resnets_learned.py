"""Stage `resnets_learned` (study pipeline): DEEP-ALIGN trained on the ResNet zoo's train
networks (the spec encoder reads residual streams and BatchNorm), then it, Sinkhorn re-basin
and weight matching on the ResNet study's test pairs, statistics reset, with paired intervals.
A stage of its own beside `resnets`, so that each stays within 15 minutes on 2 cores."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mlflow
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

import flows  # noqa: F401  (offline defaults first)
from deepalign.core.data import DataCfg, Dataset, load_dataset
from deepalign.evaluation import resnets as rs
from deepalign.evaluation.experiment import AlignCfg
from deepalign.methods.deep_align import train as trainer
from deepalign.methods.learned import DeepAlignCfg
from deepalign.zoo.store import Zoo, load_zoo, zoo_digest
from flows.common import cli, stage_run
from flows.stages import Paths, Plot, Stage
from flows.studies import ALIGN_KEYS, publish_scores

STAGE = Stage(
    "resnets_learned",
    configs={"data_cfg": "data", "cfg": "resnets_learned", "study": "resnets", "align": "align"},
    params=(
        "data",
        "resnets_learned",
        "resnets.pairs",
        "resnets.points",
        "resnets.bn_reset_images",
        *(k for k in ALIGN_KEYS if k != "align.deep_align"),
    ),
    partial=("align", "resnets"),  # method settings of `align`; pairs and grid of `resnets`
    deps={"zoo": "resnets"},
    persist={"out": "resnets_aligner"},
    plots={"interpolation": "plots/resnets/learned"},
    uncached={"figures": "figures/resnets_learned"},
    plot={"interpolation": Plot("lambda", "test_loss", "lambda", "test loss", "by_method_log")},
    metrics={"metrics": "metrics/resnets_learned.json"},
    nested=("metrics",),
    notes={"out": "(`aligner.pt`; `aligner.state.pt` to resume)", "metrics": "(~12 min)"},
    pipeline="study/dvc.yaml",
)


@task(cache_policy=NO_CACHE)
def train_aligner(io: Paths, zoo: Zoo, data: Dataset, cfg: trainer.AlignerCfg) -> dict:
    """DEEP-ALIGN on the zoo's train networks (resumes), saved as `aligner.pt`; its numbers."""
    fp = trainer.aligner_fingerprint(cfg, zoo.arch, zoo_digest(io.zoo), data)
    out = Path(io.out) / "aligner.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    numbers = trainer.train_and_save(zoo, data, cfg, out, fp, "test", {}, desc="aligner resnet")
    mlflow.log_artifact(str(out), artifact_path="resnets_learned")
    return numbers


@flow(name="resnets_learned", validate_parameters=False)
def resnets_learned(
    io: Paths,
    data_cfg: DataCfg,
    cfg: rs.ResNetLearnedCfg,
    study: rs.ResNetStudyCfg,
    align: AlignCfg,
) -> dict:
    """Train DEEP-ALIGN on the ResNet zoo, align and score its test pairs; logged to MLflow."""
    data = load_dataset(data_cfg)
    with stage_run(STAGE, io, data_cfg=data_cfg, cfg=cfg) as run:
        zoo = load_zoo(io.zoo, data)
        aligner = train_aligner(io, zoo, data, cfg.aligner)
        learned = DeepAlignCfg([str(Path(io.out) / "aligner.pt")])
        settings = dataclasses.replace(align, deep_align=learned)
        summary, lines, compared = rs.learned_scores(zoo, data, study, cfg, settings)
        publish_scores(run, STAGE.name, "resnet", (summary, lines), "digits resnet, DEEP-ALIGN")
        run.metrics["metrics"] = {"aligner": aligner, "lines": summary, "compare": compared}
    return run.metrics


if __name__ == "__main__":
    cli(resnets_learned)
