"""Stage `bench`: zoo training throughput (batched vs one-by-one), weight matching vs width, and
each method's seconds per pair idle and beside a busy process (the thread policy's evidence)."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from prefect import flow

import flows  # noqa: F401  (offline defaults first)
from deepalign.config import Positive, Seed
from deepalign.core.data import DataCfg, Dataset, load_dataset
from deepalign.evaluation.bench import (
    benchmark_busy,
    benchmark_training,
    benchmark_weight_matching,
)
from deepalign.methods import MethodsCfg, Problem, check_methods
from deepalign.methods.weight_matching import WeightMatchingCfg
from deepalign.threads import available_cores, threads
from deepalign.zoo.build import NetCfg, ZooCfg, init_network, make_arch
from flows.common import (
    RUNNERS,
    RunnerCfg,
    cli,
    restored_environ,
    stage_run,
    stage_runner,
    task_runner,
)
from flows.stages import Paths, Stage
from flows.zoo import STAGE as ZOO
from flows.zoo import train_group


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
    runner_networks: Positive  # networks trained on the thread runner and on local Dask

    def __post_init__(self) -> None:
        check_methods("busy_methods", self.busy_methods)


STAGE = Stage(
    "bench",
    configs={
        "data_cfg": "data",
        "zoo_cfg": "zoo",
        "methods": "align",
        "runner": "runner",
        "cfg": "bench",
    },
    params=(
        "data",
        "zoo",
        "runner",
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


@flow(name="zoo-chunks", validate_parameters=False)
def zoo_chunks(folder: Path, net: NetCfg, data: Dataset, data_cfg: DataCfg, cfg: ZooCfg) -> float:
    """The zoo stage's fan-out alone (a group of networks per task), without MLflow; the
    seconds of training inside the tasks (summed over tasks)."""
    indices = list(range(net.n_train))
    chunks = [indices[i : i + cfg.chunk_size] for i in range(0, len(indices), cfg.chunk_size)]
    futures = [train_group.submit(folder, net, data, data_cfg, cfg, c) for c in chunks]
    return sum(f.result() for f in futures)


def time_runners(
    data: Dataset, data_cfg: DataCfg, zoo_cfg: ZooCfg, runner: RunnerCfg, n: int
) -> dict[str, float]:
    """Wall seconds of training n networks of the first architecture as the zoo stage does,
    on the thread runner, the process pool and a local Dask cluster (their start included),
    each as the zoo stage would use it, and the seconds of training inside the tasks (summed
    over tasks); and of one network, each runner's fixed cost (starting workers, imports)."""
    name, net = next(iter(zoo_cfg.archs.items()))
    out: dict[str, float] = {"networks": n}
    for kind in RUNNERS:
        cfg, n_threads = stage_runner(ZOO, dataclasses.replace(runner, kind=kind, address=""))
        out |= {f"{kind}_workers": cfg.workers, f"{kind}_threads": n_threads}
        for size, key in ((1, f"{kind}_one_network_s"), (n, f"{kind}_s")):
            sized = dataclasses.replace(net, n_train=size, n_val=0, n_test=0)
            with (
                tempfile.TemporaryDirectory(prefix="deepalign-runner-") as tmp,
                threads(n_threads),
                restored_environ(),
            ):
                start = time.perf_counter()
                inside = zoo_chunks.with_options(task_runner=task_runner(cfg, n_threads))(
                    Path(tmp) / name, sized, data, data_cfg, zoo_cfg
                )
                out[key] = time.perf_counter() - start
            out[f"{kind}_training_s"] = inside  # in the tasks
    out["dask_over_threads"] = out["dask_s"] / out["threads_s"]
    out["dask_over_processes"] = out["dask_s"] / out["processes_s"]
    return out


@flow(name="bench", validate_parameters=False)
def bench(
    io: Paths,
    data_cfg: DataCfg,
    zoo_cfg: ZooCfg,
    methods: MethodsCfg,
    runner: RunnerCfg,
    cfg: BenchCfg,
) -> dict:
    """Time both zoo training paths, weight matching across widths, and each method idle and
    beside a busy process; record them."""
    data = load_dataset(data_cfg)
    seeds = list(range(cfg.seed, cfg.seed + cfg.n_batched))
    cores = available_cores()
    with stage_run(STAGE, io, cfg=cfg, zoo_cfg=zoo_cfg) as run, threads(cores):
        results = {
            f"train_{name}": benchmark_training(
                make_arch(net, data), data.train, net, seeds[: cfg.n_one_by_one], seeds
            )
            for name, net in zoo_cfg.archs.items()
        }
        results["weight_matching"] = benchmark_weight_matching(
            cfg.wm_widths, cfg.wm_pairs, cfg.weight_matching
        )
        results["zoo_runners"] = time_runners(data, data_cfg, zoo_cfg, runner, cfg.runner_networks)
        arch = make_arch(next(iter(zoo_cfg.archs.values())), data)  # the first zoo architecture
        nets = [init_network(arch, cfg.seed + k) for k in range(2 * cfg.busy_pairs)]
        problems = [Problem.of(a, b, arch, data.train) for a, b in zip(nets[::2], nets[1::2])]
        counts = {"one_thread": 1, "all_cores": cores}
        results["per_pair"] = benchmark_busy(cfg.busy_methods, problems, methods, counts)
        results["cores"] = cores
        run.metrics["metrics"] = results
    return run.metrics


if __name__ == "__main__":
    cli(bench)
