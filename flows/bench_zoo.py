"""Stage `bench_zoo`: zoo training throughput, batched vs one-by-one, on the same seeds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow

import flows  # noqa: F401  (offline defaults first)
from deepalign.config import load_section
from deepalign.data import DataCfg, load_dataset
from deepalign.zoo import ZooCfg, benchmark_training, make_arch
from flows.common import cli, log_metrics_file, stage_run


@dataclass(frozen=True)
class BenchZooCfg:
    n_one_by_one: int  # networks per architecture trained one after another
    n_batched: int  # networks per architecture trained at once
    seed: int


@flow(name="bench_zoo")
def bench_zoo(
    params: Path = Path("params.yaml"), metrics: Path = Path("metrics/bench_zoo.json")
) -> dict:
    """Time both training paths for every zoo architecture and record the ratio."""
    data_cfg, zoo_cfg = load_section("data", DataCfg, params), load_section("zoo", ZooCfg, params)
    cfg = load_section("bench_zoo", BenchZooCfg, params)
    data = load_dataset(data_cfg)
    seeds = list(range(cfg.seed, cfg.seed + cfg.n_batched))
    with stage_run("bench_zoo", cfg, zoo_cfg):
        results = {
            name: benchmark_training(
                make_arch(net, data), data.train, net, seeds[: cfg.n_one_by_one], seeds
            )
            for name, net in zoo_cfg.archs.items()
        }
        log_metrics_file(metrics, results)
    return results


if __name__ == "__main__":
    cli(bench_zoo)
