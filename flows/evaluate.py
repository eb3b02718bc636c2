"""Stage `evaluate`: barriers, merged accuracy, timings and recovery of every method."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from tqdm import tqdm

import flows  # noqa: F401  (offline defaults first)
from deepalign.core.data import DataCfg, Dataset, load_dataset
from deepalign.errors import DeepAlignError
from deepalign.evaluation import experiment
from deepalign.evaluation.experiment import REFINED, AlignCfg, EvaluateCfg
from deepalign.evaluation.figures import (
    budget_rows,
    interpolation_rows,
    plot_curves,
    plot_refine_budget,
)
from deepalign.evaluation.pairs import MethodRun, saved_run
from deepalign.io import read_result, write_csv
from deepalign.zoo.store import load_zoo
from flows.common import StageRun, cli, log_method_run, stage_run, untimed
from flows.stages import Paths, Plot, Stage

STAGE = Stage(
    "evaluate",
    configs={"data_cfg": "data", "align_cfg": "align", "cfg": "evaluate"},
    params=("runner", "data", "align.archs", "align.methods", "align.sinkhorn.steps", "evaluate"),
    deps={"zoo": "zoo", "aligned": "aligned", "timings": "metrics/align.json"},
    plots={"plots": "plots/evaluate", "budget": "metrics/refine_budget.csv"},
    uncached={
        "figures": "figures/evaluate",
        "table": "plots/pairs.csv",
        "tradeoff": "metrics/refine_budget.png",
    },
    metrics={"metrics": "metrics/evaluate.json", "compare": "metrics/compare.json"},
    plot={
        "plots": Plot("lambda", "test_loss", "lambda", "test loss", "by_method_log"),
        "budget": Plot(
            "seconds_per_pair", "loss_barrier", "seconds per pair", "test loss barrier", "budget"
        ),
    },
    nested=("metrics", "compare"),
    notes={
        "plots": "(`interpolation_<arch>.csv`)",
        "figures": "(`interpolation_<arch>.png`)",
        "table": "(one row per pair; its seconds are in `metrics/align.json`)",
        "budget": f"(per method: loss barrier, seconds per pair, k of {REFINED}@k; timed)",
        "tradeoff": "(its figure, a panel per architecture)",
    },
)


def timed(result: MethodRun, arch: str, timings: dict, path: Path) -> MethodRun:
    """The saved run with the seconds per pair the align stage recorded for it in `path`."""
    seconds = timings.get(arch, {}).get(result.method, {}).get("seconds_per_pair")
    if not isinstance(seconds, list) or len(seconds) != len(result.pairs):
        raise DeepAlignError(
            f"{path}: no seconds for the {len(result.pairs)} pairs of {arch}/{result.method}; "
            "run the align stage"
        )
    return dataclasses.replace(result, seconds=torch.tensor(seconds, dtype=torch.float64))


@task(cache_policy=NO_CACHE)
def evaluate_arch(
    arch: str, methods: list[str], run: StageRun, data: Dataset, cfg: EvaluateCfg
) -> tuple[dict, list[dict]]:
    """Curves and metrics of every method on one architecture's pairs."""
    zoo = load_zoo(run.io.zoo / arch, data)
    timings = read_result(run.io.timings) or {}
    summary, rows, curves = {}, [], {}
    for method in tqdm(methods, desc=f"evaluate {arch}", unit="method", mininterval=1.0):
        result = timed(saved_run(run.io.aligned, arch, method), arch, timings, run.io.timings)
        curves[method] = experiment.pair_curves(result, zoo, data, cfg.points, cfg.bn_reset_images)
        summary[method], pair_rows = experiment.method_metrics(result, curves[method])
        names = [{"arch": arch, "method": method, "pair": f"{i}-{j}"} for i, j in result.pairs]
        rows += [name | r for name, r in zip(names, pair_rows)]
        log_method_run(run, STAGE.name, arch, method, summary[method])
    for method, ratio in experiment.over_weight_matching(summary).items():
        summary[method]["loss_barrier_over_weight_matching"] = ratio
    for method, share in experiment.gap_closed(summary).items():
        summary[method]["gap_closed"] = share
    write_csv(run.io.plots / f"interpolation_{arch}.csv", interpolation_rows(curves))
    plot_curves(run.io.figures / f"interpolation_{arch}.png", curves, f"digits {arch}")
    return summary, rows


def write_budget(io: Paths, summary: dict[str, dict], cfg: AlignCfg) -> None:
    """Loss barrier against seconds per pair of every method, the refinement budgets of
    `REFINED` on one curve: the CSV `dvc plots` draws and the figure."""
    budgets = {m: experiment.refine_budget(m, cfg) for m in cfg.methods}
    rows = budget_rows(summary, budgets)
    write_csv(io.budget, rows)
    plot_refine_budget(io.tradeoff, rows, "digits", f"{REFINED}@k")


@flow(name="evaluate", validate_parameters=False)
def evaluate(io: Paths, data_cfg: DataCfg, align_cfg: AlignCfg, cfg: EvaluateCfg) -> dict:
    """Score every aligned pair along the linear path and log the comparison."""
    data = load_dataset(data_cfg)
    summary, rows = {}, []
    with stage_run(STAGE, io, data_cfg=data_cfg, align_cfg=align_cfg, cfg=cfg) as run:
        futures = {
            arch: evaluate_arch.submit(arch, align_cfg.methods, run, data, cfg)
            for arch in align_cfg.archs
        }
        for arch, future in futures.items():  # fan-out: one task per architecture
            summary[arch], arch_rows = future.result()
            rows += arch_rows
        write_csv(io.table, untimed(rows))
        write_budget(io, summary, align_cfg)
        run.metrics = {"metrics": summary, "compare": experiment.paired_comparisons(rows, cfg)}
    return run.metrics


if __name__ == "__main__":
    cli(evaluate)
