"""Stage `bench`: zoo training throughput (batched vs one-by-one), weight matching vs width, and
each method's seconds per pair idle and beside a busy process (the thread policy's evidence)."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import flow

import flows  # noqa: F401  (offline defaults first)
from deepalign.config import Positive, Seed
from deepalign.core.data import DataCfg, load_dataset
from deepalign.evaluation.bench import (
    benchmark_busy,
    benchmark_training,
    benchmark_weight_matching,
)
from deepalign.methods import MethodsCfg, Problem, check_methods
from deepalign.methods.weight_matching import WeightMatchingCfg
from deepalign.threads import available_cores
from deepalign.zoo.build import ZooCfg, init_network, make_arch
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
    busy_methods: list[str]  # timed idle and beside a busy process, 1 thread and all cores
    busy_pairs: Positive  # independently initialised pairs of the zoo's MLP per method

    def __post_init__(self) -> None:
        check_methods("busy_methods", self.busy_methods)


STAGE = Stage(
    "bench",
    configs={"data_cfg": "data", "zoo_cfg": "zoo", "methods": "align", "cfg": "bench"},
    params=(
        "data",
        "zoo.archs",
        "align.weight_matching",
        "align.activation_matching",
        "align.ste",
        "align.sinkhorn",
        "bench",
    ),
    partial=("methods",),  # the method settings of `align`
    metrics={"metrics": "metrics/bench.json"},
    pipeline="study/dvc.yaml",  # ~4 min of timing, not part of the default run
)


@flow(name="bench", validate_parameters=False)
def bench(
    io: Paths, data_cfg: DataCfg, zoo_cfg: ZooCfg, methods: MethodsCfg, cfg: BenchCfg
) -> dict:
    """Time both zoo training paths, weight matching across widths, and each method idle and
    beside a busy process; record them."""
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
        arch = make_arch(next(iter(zoo_cfg.archs.values())), data)  # the first zoo architecture
        nets = [init_network(arch, cfg.seed + k) for k in range(2 * cfg.busy_pairs)]
        problems = [Problem.of(a, b, arch, data.train) for a, b in zip(nets[::2], nets[1::2])]
        counts = {"one_thread": 1, "all_cores": available_cores()}
        results["per_pair"] = benchmark_busy(cfg.busy_methods, problems, methods, counts)
        results["cores"] = available_cores()
        run.metrics["metrics"] = results
    return run.metrics


if __name__ == "__main__":
    cli(bench)
