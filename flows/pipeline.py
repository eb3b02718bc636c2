"""The whole pipeline as one Prefect flow (DVC decides what is up to date), and sweeps.

`pipeline` runs `dvc repro`, so a scheduled run and a shell run give the same outputs and
the same dvc.lock; each stage still runs its own flow (its own flow run in the Prefect UI).
`sweep` runs a grid of parameter overrides as DVC experiments and logs each to MLflow.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
from prefect import flow, task

import flows  # noqa: F401  (offline defaults first)
from deepalign.errors import DeepAlignError
from flows.common import EXPERIMENT, flat_metrics, git_commit


@task(retries=1, retry_delay_seconds=5)
def dvc(args: list[str], workdir: str) -> str:
    """Run one dvc command in the project folder; its output tail, or an error naming it."""
    env = os.environ | {"DVC_NO_ANALYTICS": "1"}
    cmd = [sys.executable, "-m", "dvc", *args]  # this environment's dvc, whatever PATH says
    done = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise DeepAlignError(f"dvc {' '.join(args)} failed in {workdir}: {done.stderr[-1500:]}")
    return done.stdout[-3000:]


@flow(name="pipeline", log_prints=True)
def pipeline(workdir: str = ".", targets: list[str] | None = None, force: bool = False) -> str:
    """`dvc repro` of the given stages (all by default) in `workdir`."""
    out = dvc(["repro", *(targets or []), *(["--force"] if force else [])], workdir)
    print(out)
    return out


def _combinations(grid: dict[str, list]) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*grid.values())]


@flow(name="sweep", log_prints=True)
def sweep(
    grid: dict[str, list], workdir: str = ".", metrics: str = "metrics/evaluate.json"
) -> list[dict]:
    """One DVC experiment per combination of overrides ({'align.pairs': [10, 20]}), in MLflow."""
    results = []
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name="sweep", tags={"stage": "sweep", "git_commit": git_commit()}):
        for combo in _combinations(grid):
            sets = [arg for k, v in combo.items() for arg in ("-S", f"{k}={json.dumps(v)}")]
            dvc(["exp", "run", *sets], workdir)
            found = json.loads((Path(workdir) / metrics).read_text())
            with mlflow.start_run(run_name=str(combo), nested=True):
                mlflow.log_params(combo)
                mlflow.log_metrics(flat_metrics(found))
            results.append({"params": combo, "metrics": found})
    return results
