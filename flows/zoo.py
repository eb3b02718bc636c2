"""Stage `zoo`: train the networks of every configured architecture, resuming where stopped."""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

import flows  # noqa: F401  (offline defaults first)
from deepalign.config import load_section
from deepalign.core.data import DataCfg, Dataset, load_dataset
from deepalign.zoo.build import (
    NetCfg,
    ZooCfg,
    fingerprint,
    is_done,
    make_arch,
    plan,
    read_records,
    resolve_device,
    summarize,
    train_chunk,
    write_manifest,
)
from flows.common import cli, log_metrics_file, stage_run


@task(cache_policy=NO_CACHE)
def train_group(
    name: str,
    net: NetCfg,
    data: Dataset,
    data_cfg: DataCfg,
    cfg: ZooCfg,
    indices: list[int],
    out: Path,
) -> list[dict]:
    """Train one group of networks (one unit of work for the task runner)."""
    arch, jobs = make_arch(net, data), plan(out / name, net, cfg.seed)
    group = [jobs[i] for i in indices]
    fps = {j.index: fingerprint(arch, net, data_cfg, j.seed) for j in group}
    return train_chunk(arch, group, data, net, fps, resolve_device(cfg.device))


@task(cache_policy=NO_CACHE)
def pending(
    name: str, net: NetCfg, data: Dataset, data_cfg: DataCfg, cfg: ZooCfg, out: Path
) -> list[int]:
    """Indices of networks not yet trained with these settings; drops stale checkpoints."""
    arch, jobs = make_arch(net, data), plan(out / name, net, cfg.seed)
    planned = {j.path for j in jobs}
    for stale in (out / name).glob("net-*.pt"):
        if stale not in planned:
            stale.unlink()
    return [j.index for j in jobs if not is_done(j, fingerprint(arch, net, data_cfg, j.seed))]


@task(cache_policy=NO_CACHE)
def finish(name: str, net: NetCfg, data: Dataset, cfg: ZooCfg, out: Path) -> list[dict]:
    arch, jobs = make_arch(net, data), plan(out / name, net, cfg.seed)
    records = read_records(jobs)
    mlflow.log_artifact(str(write_manifest(out / name, name, arch, records)), artifact_path=name)
    return records


@flow(name="zoo")
def zoo(
    params: Path = Path("params.yaml"),
    out: Path = Path("zoo"),
    metrics: Path = Path("metrics/zoo.json"),
) -> dict:
    """Build the model zoo and record it in MLflow."""
    data_cfg, cfg = load_section("data", DataCfg, params), load_section("zoo", ZooCfg, params)
    data = load_dataset(data_cfg)
    summary = {}
    with stage_run("zoo", data_cfg, cfg):
        for name, net in cfg.archs.items():
            todo = pending(name, net, data, data_cfg, cfg, out)
            groups = [todo[i : i + cfg.chunk_size] for i in range(0, len(todo), cfg.chunk_size)]
            futures = [train_group.submit(name, net, data, data_cfg, cfg, g, out) for g in groups]
            [f.result() for f in futures]  # fan-out: one task per group of networks
            records = finish(name, net, data, cfg, out)
            summary[name] = summarize(records, len(todo))
        log_metrics_file(metrics, summary)
    return summary


if __name__ == "__main__":
    cli(zoo)
