"""Stage `train_aligner`: train DEEP-ALIGN per zoo architecture; resumes an interrupted run."""

from __future__ import annotations

import mlflow
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

import flows  # noqa: F401  (offline defaults first)
from deepalign.core.data import DataCfg, Dataset, load_dataset
from deepalign.evaluation.summary import shown
from deepalign.methods.deep_align import train as trainer
from deepalign.zoo.build import resolve_device
from deepalign.zoo.store import load_zoo, zoo_digest
from flows.common import StageRun, cli, stage_run
from flows.stages import Paths, Stage

STAGE = Stage(
    "train_aligner",
    configs={"data_cfg": "data", "cfg": "aligner"},
    params=("runner", "data", "aligner"),
    deps={"zoo": "zoo"},
    persist={"out": "aligner"},
    metrics={"metrics": "metrics/train_aligner.json"},
    nested=("metrics",),  # per architecture, beside its losses per epoch
    notes={"out": "(`<arch>.pt`; `<arch>.state.pt` to resume)"},
    fan_out=True,  # one task per architecture
)


@task(cache_policy=NO_CACHE)
def train_one_arch(arch: str, line: int, io: Paths, data: Dataset, cfg: trainer.AlignerCfg) -> dict:
    """Train (or resume) the aligner of one architecture and save it; its numbers, its
    device and its losses per epoch (`history`, for MLflow)."""
    zoo = load_zoo(io.zoo / arch, data)
    fp = trainer.aligner_fingerprint(cfg, zoo.arch, zoo_digest(io.zoo / arch), data)
    history: list[tuple[int, dict[str, float]]] = []
    on_epoch = lambda e, m, _: history.append((e, dict(m)))  # noqa: E731
    device = str(resolve_device(cfg.device))
    numbers = trainer.train_and_save(
        zoo,
        data,
        cfg,
        io.out / f"{arch}.pt",
        fp,
        held_out="test",
        meta={"device": device},
        on_epoch=on_epoch,
        desc=f"train_aligner {arch}",
        line=line,
    )
    return {"numbers": numbers, "device": device, "history": history}


def log_arch_run(run: StageRun, arch: str, trained: dict) -> None:
    """One nested MLflow run per architecture: its device, losses per epoch, checkpoint."""
    tags = {"stage": STAGE.name, "arch": arch}
    with mlflow.start_run(run_name=arch, nested=True, parent_run_id=run.id, tags=tags):
        mlflow.set_tag("device", trained["device"])
        for epoch, metrics in trained["history"]:
            mlflow.log_metrics(metrics, step=epoch)
        mlflow.log_metrics(shown(STAGE.name, trained["numbers"]))
        mlflow.log_artifact(str(run.io.out / f"{arch}.pt"))


@flow(name="train_aligner", validate_parameters=False)
def train_aligner(io: Paths, data_cfg: DataCfg, cfg: trainer.AlignerCfg) -> dict:
    """Train DEEP-ALIGN for every configured architecture and record it in MLflow."""
    data = load_dataset(data_cfg)
    with stage_run(STAGE, io, data_cfg=data_cfg, cfg=cfg) as run:
        # fan-out: one task per architecture (worker processes train them side by side);
        # MLflow written from here alone
        futures = {
            arch: train_one_arch.submit(arch, k, io, data, cfg) for k, arch in enumerate(cfg.archs)
        }  # one progress bar per task, each on its own line
        run.metrics["metrics"] = {}
        for arch, future in futures.items():
            trained = future.result()
            log_arch_run(run, arch, trained)
            run.metrics["metrics"][arch] = trained["numbers"]
    return run.metrics


if __name__ == "__main__":
    cli(train_aligner)
