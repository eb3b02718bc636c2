"""Stage `train_aligner`: train DEEP-ALIGN per zoo architecture; resumes an interrupted run."""

from __future__ import annotations

import mlflow
import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

import flows  # noqa: F401  (offline defaults first)
from deepalign.core.data import DataCfg, Dataset, load_dataset
from deepalign.methods.deep_align import train as trainer
from deepalign.methods.deep_align.checkpoint import save_aligner
from deepalign.zoo.build import resolve_device
from deepalign.zoo.store import load_zoo
from flows.common import StageRun, cli, stage_run
from flows.stages import Paths, Stage

STAGE = Stage(
    "train_aligner",
    configs={"data_cfg": "data", "cfg": "aligner"},
    params=("data", "aligner"),
    deps={"zoo": "zoo"},
    persist={"out": "aligner"},
    metrics={"metrics": "metrics/train_aligner.json"},
    notes={"out": "(`<arch>.pt`; `<arch>.state.pt` to resume)"},
)


def _log_epoch(epoch: int, metrics: dict[str, float], _: object) -> None:
    mlflow.log_metrics(metrics, step=epoch)


@task(cache_policy=NO_CACHE)
def train_one_arch(arch: str, run: StageRun, data: Dataset, cfg: trainer.AlignerCfg) -> dict:
    """Train (or resume) the aligner of one architecture; log its losses per epoch."""
    zoo, out = load_zoo(run.io.zoo / arch), run.io.out
    device = resolve_device(cfg.device)
    fp = trainer.aligner_fingerprint(cfg, zoo.arch, run.io.zoo / arch / "manifest.json", data)
    tags = {"stage": STAGE.name, "arch": arch}
    with mlflow.start_run(run_name=arch, nested=True, parent_run_id=run.id, tags=tags):
        mlflow.log_params({"arch": arch, "device": str(device)})
        state = out / f"{arch}.state.pt"
        model, result = trainer.train(zoo, data, cfg, device, state, fp, on_epoch=_log_epoch)
        test = zoo.nets[torch.tensor(zoo.indices("test"))].to(device)
        recovered = trainer.augmented_recovery(model, test, cfg.augment, seed=1)
        result["test_planted_recovery_augmented"] = recovered
        meta = {"fingerprint": fp, "device": str(device)} | result
        save_aligner(out / f"{arch}.pt", model, zoo.arch, meta)
        mlflow.log_artifact(str(out / f"{arch}.pt"))
    numbers = {k: float(v) for k, v in result.items() if k != "epoch"}
    return numbers | {"device_cuda": float(device.type == "cuda")}


@flow(name="train_aligner", validate_parameters=False)
def train_aligner(io: Paths, data_cfg: DataCfg, cfg: trainer.AlignerCfg) -> dict:
    """Train DEEP-ALIGN for every configured architecture and record it in MLflow."""
    data = load_dataset(data_cfg)
    with stage_run(STAGE, io, data_cfg, cfg) as run:
        run.metrics["metrics"] = {a: train_one_arch(a, run, data, cfg) for a in cfg.archs}
    return run.metrics


if __name__ == "__main__":
    cli(train_aligner)
