"""Stage `train_aligner`: train DEEP-ALIGN per zoo architecture; resumes an interrupted run."""

from __future__ import annotations

from pathlib import Path

import mlflow
import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

import flows  # noqa: F401  (offline defaults first)
from deepalign.config import load_section
from deepalign.core.data import DataCfg, Dataset, load_dataset
from deepalign.methods.deep_align.checkpoint import save_aligner
from deepalign.methods.deep_align.train import AlignerCfg, augmented_recovery, fingerprint, train
from deepalign.zoo.build import resolve_device
from deepalign.zoo.store import load_zoo
from flows.common import cli, log_metrics_file, stage_run


@task(cache_policy=NO_CACHE)
def train_one_arch(
    arch: str, zoo_dir: Path, out: Path, data: Dataset, cfg: AlignerCfg, parent: str
) -> dict:
    """Train (or resume) the aligner of one architecture; log its losses per epoch."""
    zoo = load_zoo(zoo_dir / arch)
    device = resolve_device(cfg.device)
    fp = fingerprint(cfg, zoo.arch, zoo_dir / arch / "manifest.json", data)
    with mlflow.start_run(run_name=f"train_aligner/{arch}", nested=True, parent_run_id=parent):
        mlflow.log_params({"arch": arch, "device": str(device)})
        model, run = train(
            zoo,
            data,
            cfg,
            device,
            out / f"{arch}.state.pt",
            fp,
            on_epoch=lambda epoch, m, _: mlflow.log_metrics(m, step=epoch),
        )
        test = zoo.nets[torch.tensor(zoo.indices("test"))].to(device)
        run["test_planted_recovery_augmented"] = augmented_recovery(
            model, test, cfg.augment, seed=1
        )
        path = out / f"{arch}.pt"
        meta = {"fingerprint": fp, "device": str(device)} | run
        save_aligner(path, model, zoo.arch, meta)
        mlflow.log_artifact(str(path))
    return {k: float(v) for k, v in run.items() if k != "epoch"} | {
        "device_cuda": float(device.type == "cuda")
    }


@flow(name="train_aligner")
def train_aligner(
    params: Path = Path("params.yaml"),
    zoo: Path = Path("zoo"),
    out: Path = Path("aligner"),
    metrics: Path = Path("metrics/train_aligner.json"),
) -> dict:
    """Train DEEP-ALIGN for every configured architecture and record it in MLflow."""
    data_cfg = load_section("data", DataCfg, params)
    cfg = load_section("aligner", AlignerCfg, params)
    data = load_dataset(data_cfg)
    with stage_run("train_aligner", data_cfg, cfg) as run:
        summary = {
            arch: train_one_arch(arch, zoo, out, data, cfg, run.info.run_id) for arch in cfg.archs
        }
        log_metrics_file(metrics, summary)
    return summary


if __name__ == "__main__":
    cli(train_aligner)
