"""Stage `zoo`: train the networks of every configured architecture, resuming where stopped."""

from __future__ import annotations

import time
from pathlib import Path

import mlflow
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

import flows  # noqa: F401  (offline defaults first)
from deepalign.core.data import DataCfg, Dataset, load_dataset
from deepalign.zoo import build
from deepalign.zoo.build import NetCfg, ZooCfg
from flows.common import cli, stage_run, track
from flows.stages import Paths, Stage

STAGE = Stage(
    "zoo",
    configs={"data_cfg": "data", "cfg": "zoo"},
    params=("runner", "data", "zoo"),
    persist={"out": "zoo"},
    metrics={"metrics": "metrics/zoo.json"},
    per_arch=("metrics",),
    notes={"out": "(`<arch>/net-NNNN.pt` + `manifest.json`)"},
    fan_out=True,  # groups of networks
)


@task(cache_policy=NO_CACHE)
def pending(folder: Path, net: NetCfg, data: Dataset, data_cfg: DataCfg, seed: int) -> list[int]:
    """Indices of networks not yet trained with these settings; drops stale checkpoints."""
    jobs, fps = build.planned(folder, net, seed, build.make_arch(net, data), data_cfg)
    planned = {j.path for j in jobs}
    for stale in folder.glob("net-*.pt"):
        if stale not in planned:
            stale.unlink()
    return [j.index for j in jobs if not build.is_done(j, fps[j.index])]


@task(cache_policy=NO_CACHE)
def train_group(
    folder: Path, net: NetCfg, data: Dataset, data_cfg: DataCfg, cfg: ZooCfg, indices: list[int]
) -> float:
    """Train one group of networks (one unit of work for the task runner); the seconds it took
    (for the metrics only: checkpoints hold no timings)."""
    arch = build.make_arch(net, data)
    jobs, fps = build.planned(folder, net, cfg.seed, arch, data_cfg)
    group = [jobs[i] for i in indices]
    device = build.resolve_device(cfg.device)  # the flow draws the bar: workers run side by side
    start = time.perf_counter()
    build.train_chunk(arch, group, data, net, fps, device, progress=False)
    return time.perf_counter() - start


@task(cache_policy=NO_CACHE)
def finish(folder: Path, net: NetCfg, data: Dataset, seed: int) -> list[dict]:
    """The manifest of one architecture's finished zoo, logged to MLflow."""
    records = build.read_records(build.plan(folder, net, seed))
    manifest = build.write_manifest(folder, folder.name, build.make_arch(net, data), records)
    mlflow.log_artifact(str(manifest), artifact_path=folder.name)
    return records


@flow(name="zoo", validate_parameters=False)
def zoo(io: Paths, data_cfg: DataCfg, cfg: ZooCfg) -> dict:
    """Build the model zoo and record it in MLflow."""
    data = load_dataset(data_cfg)
    with stage_run(STAGE, io, data_cfg=data_cfg, cfg=cfg) as run:
        summary = run.metrics.setdefault("metrics", {})
        for name, net in cfg.archs.items():
            folder = io.out / name
            todo = pending(folder, net, data, data_cfg, cfg.seed)
            chunks = [todo[i : i + cfg.chunk_size] for i in range(0, len(todo), cfg.chunk_size)]
            futures = {  # fan-out: one task per group of networks
                (name, f"{c[0]}-{c[-1]}"): train_group.submit(folder, net, data, data_cfg, cfg, c)
                for c in chunks
            }
            seconds = sum(track(futures, f"{STAGE.name} {name}", "group").values())
            records = finish(folder, net, data, cfg.seed)
            summary[name] = build.summarize(records, len(todo), seconds)
    return run.metrics


if __name__ == "__main__":
    cli(zoo)
