"""What the study pipeline's stages share (ood, merge, inr, resnets): the `align` keys they
depend on, a zoo trained where it stopped and timed by the flow's clock, and each method's
scores published as nested MLflow runs with their mean lines as CSV and PNG."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from deepalign.core.data import Dataset
from deepalign.core.lmc import Curve
from deepalign.core.shifts import ShiftCfg, shifted
from deepalign.evaluation.figures import interpolation_rows, plot_curves
from deepalign.io import write_csv
from deepalign.methods import settings_keys
from deepalign.zoo import build
from deepalign.zoo.store import Zoo, load_zoo
from flows.common import StageRun, log_method_run

# every registered aligner's settings, and the planted pairs' keys of `align`
ALIGN_KEYS = (*settings_keys(), *(f"align.{k}" for k in ("planted_pairs", "planted_noise", "seed")))


def trained_zoo(
    folder: Path,
    name: str,
    net: build.NetCfg,
    seed: int,
    data: tuple[Dataset, Any],
    shift: ShiftCfg | None = None,
    views: int = 0,
) -> tuple[Dataset, dict]:
    """Train the networks of a zoo not yet trained with these settings (it resumes) on `data`
    (the data set and its config), moved by `shift` where given: the data they train on, and
    the zoo's summary with the seconds this run spent training, by the flow's clock."""
    dataset, config = data
    moved = shifted(dataset, shift) if shift else dataset
    start = time.perf_counter()
    records, trained = build.train_zoo(
        folder, name, net, seed, (moved, config), asdict(shift) if shift else None, views
    )
    return moved, build.summarize(records, trained, time.perf_counter() - start)


@task(cache_policy=NO_CACHE)
def shifted_zoo(
    folder: Path,
    name: str,
    net: build.NetCfg,
    seed: int,
    data: tuple[Dataset, Any],
    shift: ShiftCfg,
) -> tuple[Zoo, Dataset, dict]:
    """A zoo trained on shifted data (`trained_zoo`): the zoo, that data and its summary."""
    moved, summary = trained_zoo(folder, name, net, seed, data, shift)
    return load_zoo(folder, moved), moved, summary


def publish_scores(
    run: StageRun,
    stage: str,
    name: str,
    scored: tuple[dict[str, dict], dict[str, list[Curve]]],
    title: str,
) -> dict[str, dict]:
    """Each method's numbers (`scored`: with the lines behind them) as a nested MLflow run of
    `name`, the mean lines as `interpolation_<name>` CSV and PNG; the numbers."""
    summary, lines = scored
    for method, metrics in summary.items():
        log_method_run(run, stage, name, method, metrics)
    write_csv(run.io.interpolation / f"interpolation_{name}.csv", interpolation_rows(lines))
    plot_curves(run.io.figures / f"interpolation_{name}.png", lines, title)
    return summary
