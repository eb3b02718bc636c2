"""Stage `align`: every configured method on the zoo's test pairs; resumes per method."""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

import flows  # noqa: F401  (offline defaults first)
from deepalign.config import load_section
from deepalign.core.data import DataCfg, Dataset, load_dataset
from deepalign.evaluation.experiment import AlignCfg, run_fingerprint, run_method
from deepalign.evaluation.pairs import load_run, save_run
from deepalign.zoo.store import load_zoo
from flows.common import cli, stage_run


@task(cache_policy=NO_CACHE)
def align_method(
    method: str,
    arch: str,
    zoo_dir: Path,
    out: Path,
    data: Dataset,
    data_cfg: DataCfg,
    cfg: AlignCfg,
    parent: str,
) -> None:
    """Align one architecture's pairs with one method, unless already done with these settings."""
    path = out / arch / f"{method}.pt"
    fp = run_fingerprint(method, cfg, data_cfg, zoo_dir / arch / "manifest.json")
    run = load_run(path, fp)
    if run is None:
        run = run_method(method, load_zoo(zoo_dir / arch), data, cfg)
        save_run(path, run, fp)
    with mlflow.start_run(run_name=f"{arch}/{method}", nested=True, parent_run_id=parent):
        mlflow.log_params({"arch": arch, "method": method, "pairs": len(run.pairs)})
        mlflow.log_metrics(
            {
                "seconds_per_pair": run.seconds.mean().item(),
                "planted_recovery": run.planted_recovery.mean().item(),
            }
        )


@flow(name="align")
def align(
    params: Path = Path("params.yaml"), zoo: Path = Path("zoo"), out: Path = Path("aligned")
) -> None:
    """Run every configured method on every configured architecture."""
    data_cfg, cfg = load_section("data", DataCfg, params), load_section("align", AlignCfg, params)
    data = load_dataset(data_cfg)
    with stage_run("align", data_cfg, cfg) as run:
        futures = [
            align_method.submit(method, arch, zoo, out, data, data_cfg, cfg, run.info.run_id)
            for arch in cfg.archs
            for method in cfg.methods
        ]
        [f.result() for f in futures]  # fan-out: one task per architecture and method


if __name__ == "__main__":
    cli(align)
