"""Stage `report`: one self-contained HTML page of every stage's results, logged to MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from prefect import flow

import flows  # noqa: F401  (offline defaults first)
from deepalign.errors import DeepAlignError
from deepalign.evaluation.report import render_html
from deepalign.io import write_atomic
from flows.common import cli, git_commit, stage_run

STAGES = ("zoo", "train_aligner", "evaluate", "converge", "curves", "bench")


def read_metrics(folder: Path) -> dict[str, dict]:
    """Every stage's metrics file that exists; none at all is an error."""
    found = {
        s: json.loads((folder / f"{s}.json").read_text())
        for s in STAGES
        if (folder / f"{s}.json").is_file()
    }
    if not found:
        raise DeepAlignError(f"{folder}: no metrics files; run the pipeline first (dvc repro)")
    return found


@flow(name="report")
def report(
    params: Path = Path("params.yaml"),
    metrics: Path = Path("metrics"),
    plots: Path = Path("plots"),
    out: Path = Path("report/index.html"),
) -> Path:
    """Render the report and attach it to an MLflow run."""
    page = render_html(read_metrics(metrics), plots, f"deepalign report ({git_commit()[:8]})")
    write_atomic(out, lambda tmp: tmp.write_text(page))
    with stage_run("report"):
        mlflow.log_artifact(str(out))
    return out


if __name__ == "__main__":
    cli(report)
