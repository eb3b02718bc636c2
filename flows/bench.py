"""Stage `bench`: zoo training throughput (batched vs one-by-one) and weight matching vs width."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import flow

import flows  # noqa: F401  (offline defaults first)
from deepalign.config import Positive, Seed
from deepalign.core.data import DataCfg, load_dataset
from deepalign.evaluation.bench import benchmark_training, benchmark_weight_matching
from deepalign.methods.weight_matching import WeightMatchingCfg
from deepalign.zoo.build import ZooCfg, make_arch
from flows.common import cli, stage_run
from flows.stages import Paths, Stage


@dataclass(frozen=True)
class BenchCfg:
    n_one_by_one: Positive  # networks per architecture trained one after another
    n_batched: Positive  # networks per architecture trained at once
    seed: Seed
    wm_widths: list[Positive]  # hidden widths of the 64-w-w-w-10 MLPs weight matching aligns
    wm_pairs: Positive  # pairs per width (median reported)
    weight_matching: WeightMatchingCfg


STAGE = Stage(
    "bench",
    configs={"data_cfg": "data", "zoo_cfg": "zoo", "cfg": "bench"},
    params=("data", "zoo.archs", "bench"),
    metrics={"metrics": "metrics/bench.json"},
)


@flow(name="bench", validate_parameters=False)
def bench(io: Paths, data_cfg: DataCfg, zoo_cfg: ZooCfg, cfg: BenchCfg) -> dict:
    """Time both zoo training paths and weight matching across widths; record them."""
    data = load_dataset(data_cfg)
    seeds = list(range(cfg.seed, cfg.seed + cfg.n_batched))
    with stage_run(STAGE, io, cfg, zoo_cfg) as run:
        results = {
            f"train_{name}": benchmark_training(
                make_arch(net, data), data.train, net, seeds[: cfg.n_one_by_one], seeds
            )
            for name, net in zoo_cfg.archs.items()
        }
        results["weight_matching"] = benchmark_weight_matching(
            cfg.wm_widths, cfg.wm_pairs, cfg.weight_matching
        )
        run.metrics["metrics"] = results
    return run.metrics


if __name__ == "__main__":
    cli(bench)
