"""Stage `report`: one self-contained HTML page of every stage's results, logged to MLflow."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow

import flows  # noqa: F401  (offline defaults first)
from deepalign.errors import DeepAlignError
from deepalign.evaluation.report import QUALITY, render_html
from deepalign.evaluation.summary import headline
from deepalign.io import write_atomic
from flows.common import cli, stage_run
from flows.stages import Paths, Stage

STAGES = ("zoo", "train_aligner", "evaluate", "compare", "converge", "curves")
# the study pipeline's committed results, shown where present (not deps: a dep on another
# pipeline's output would make the default `dvc repro` run that pipeline too)
STUDIES = ("resnets", "resnets_learned", "ood", "merge", "inr", *QUALITY)


def read_metrics(folder: Path) -> dict[str, dict]:
    """Every stage's metrics file that exists; none at all is an error."""
    found = {
        s: json.loads((folder / f"{s}.json").read_text())
        for s in STAGES
        if (folder / f"{s}.json").is_file()
    }
    if not found:
        raise DeepAlignError(f"{folder}: no metrics files; run the pipeline first (dvc repro)")
    studies = {s: folder / f"{s}.json" for s in STUDIES if (folder / f"{s}.json").is_file()}
    return found | {s: json.loads(path.read_text()) for s, path in studies.items()}


STAGE = Stage(
    "report",
    configs={},
    params=(),
    folders={"metrics": "metrics", "figures": "figures"},
    uncached={"out": "report/index.html"},
    metrics={"headline": "metrics/headline.json"},
    headline=("headline",),
    reads=(
        *(f"metrics/{s}.json" for s in STAGES),
        *(f"figures/{s}" for s in ("evaluate", "curves", "converge")),
    ),
    optional=tuple(f"metrics/{s}.json" for s in STUDIES),
    notes={"out": "(self-contained)", "headline": "(the only DVC metrics file)"},
)


@flow(name="report", validate_parameters=False)
def report(io: Paths) -> dict:
    """Render the report and the headline metrics; attach both to an MLflow run."""
    found = read_metrics(io.metrics)
    page = render_html(found, io.figures)
    write_atomic(io.out, lambda tmp: tmp.write_text(page))
    with stage_run(STAGE, io) as run:
        run.metrics["headline"] = headline(found)
    return run.metrics


if __name__ == "__main__":
    cli(report)
