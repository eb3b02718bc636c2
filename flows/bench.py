"""Stage `bench`: zoo training throughput (batched vs one-by-one) and weight matching vs width."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow

import flows  # noqa: F401  (offline defaults first)
from deepalign.config import Positive, Seed, load_section
from deepalign.core.data import DataCfg, load_dataset
from deepalign.evaluation.bench import benchmark_training, benchmark_weight_matching
from deepalign.methods.weight_matching import WeightMatchingCfg
from deepalign.zoo.build import ZooCfg, make_arch
from flows.common import cli, log_metrics_file, stage_run


@dataclass(frozen=True)
class BenchCfg:
    n_one_by_one: Positive  # networks per architecture trained one after another
    n_batched: Positive  # networks per architecture trained at once
    seed: Seed
    wm_widths: list[Positive]  # hidden widths of the 64-w-w-w-10 MLPs weight matching aligns
    wm_pairs: Positive  # pairs per width (median reported)
    weight_matching: WeightMatchingCfg


@flow(name="bench")
def bench(params: Path = Path("params.yaml"), metrics: Path = Path("metrics/bench.json")) -> dict:
    """Time both zoo training paths and weight matching across widths; record them."""
    data_cfg, zoo_cfg = load_section("data", DataCfg, params), load_section("zoo", ZooCfg, params)
    cfg = load_section("bench", BenchCfg, params)
    data = load_dataset(data_cfg)
    seeds = list(range(cfg.seed, cfg.seed + cfg.n_batched))
    with stage_run("bench", cfg, zoo_cfg):
        results = {
            f"train_{name}": benchmark_training(
                make_arch(net, data), data.train, net, seeds[: cfg.n_one_by_one], seeds
            )
            for name, net in zoo_cfg.archs.items()
        }
        results["weight_matching"] = benchmark_weight_matching(
            cfg.wm_widths, cfg.wm_pairs, cfg.weight_matching
        )
        log_metrics_file(metrics, results)
    return results


if __name__ == "__main__":
    cli(bench)
