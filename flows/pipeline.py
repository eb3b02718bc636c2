"""The whole pipeline as one Prefect flow (DVC decides what is up to date), and sweeps.

`pipeline` runs `dvc repro` one stage at a time, each a task named after the stage whose log
is DVC's output, so a scheduled run and a shell run give the same outputs and the same
dvc.lock; each stage still runs its own flow (its own flow run in the Prefect UI).
`sweep` runs a grid of parameter overrides as DVC experiments and logs each to MLflow.
"""

from __future__ import annotations

import copy
import importlib
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow
import typer
from prefect import flow, get_run_logger, task

import flows  # noqa: F401  (offline defaults first)
from deepalign.config import build, parse_params, pick, read_params
from deepalign.errors import DeepAlignError, UsageError
from flows.common import (
    EXPERIMENT,
    RunnerCfg,
    flow_configs,
    git_commit,
    log_metrics,
    one_line_errors,
)
from flows.server import prefect_api


def run_dvc(args: list[str], workdir: str) -> str:
    """Run one dvc command in the project folder: its output, or an error naming it."""
    env = os.environ | {"DVC_NO_ANALYTICS": "1"}
    cmd = [sys.executable, "-m", "dvc", *args]  # this environment's dvc, whatever PATH says
    done = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise DeepAlignError(f"dvc {' '.join(args)} failed in {workdir}: {done.stderr[-1500:]}")
    return done.stdout


@task(retries=1, retry_delay_seconds=5)
def dvc(args: list[str], workdir: str) -> str:
    """One dvc command as a task; its output tail is the task's return value."""
    return run_dvc(args, workdir)[-3000:]


@task(task_run_name="{stage}", retries=1, retry_delay_seconds=5)
def repro_stage(stage: str, workdir: str, force: bool) -> str:
    """`dvc repro` of one stage (its inputs are up to date by then); its output is this task's
    log in the Prefect UI."""
    out = run_dvc(["repro", "--single-item", stage, *(["--force"] if force else [])], workdir)
    get_run_logger().info("%s", out.strip() or f"{stage}: nothing to do")
    return out[-3000:]


def stage_order(workdir: str, targets: list[str]) -> list[str]:
    """The default pipeline's stages (or the targets and what they need), inputs first."""
    dag = run_dvc(["dag", "--dot", *(targets or ["dvc.yaml"])], workdir)
    edges = re.findall(r'"([^"]+)" -> "([^"]+)"', dag)
    nodes = re.findall(r'^\s*"([^"]+)";', dag, re.MULTILINE)
    order: list[str] = []
    while len(order) < len(nodes):
        ready = [n for n in nodes if n not in order and all(a in order for a, b in edges if b == n)]
        order.append(ready[0])
    return order


@flow(name="pipeline", log_prints=True)
def pipeline(workdir: str = ".", targets: list[str] | None = None, force: bool = False) -> str:
    """`dvc repro` of the given stages (all by default) in `workdir`, one task per stage."""
    outputs = [repro_stage(s, workdir, force) for s in stage_order(workdir, targets or [])]
    return "".join(outputs)


def parse_grid(overrides: list[str]) -> dict[str, list]:
    """['align.pairs=20,50', 'align.methods=[naive,ste],[naive]'] -> {'align.pairs': [20, 50],
    'align.methods': [['naive', 'ste'], ['naive']]}: the values after '=' are read as one YAML
    flow list, so a value may itself be a list (numbers, booleans and strings as YAML reads
    them)."""
    grid: dict[str, list] = {}
    for item in overrides:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise UsageError(f"'{item}': write an override as key=value[,value...]")
        if key in grid:
            raise UsageError(f"'{key}' is given twice")
        try:
            grid[key] = parse_params(f"v: [{values}]")["v"]
        except DeepAlignError as e:
            raise UsageError(f"'{item}': the values are not a YAML list ({e})") from e
    return grid


def _set(tree: dict, key: str, value: Any, where: Path) -> None:
    """tree[a][b][c] = value for key 'a.b.c'; the key must exist already."""
    *parents, last = key.split(".")
    node = tree
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or last not in node:
        raise UsageError(f"{where}: no key '{key}' to sweep")
    node[last] = value


def check_grid(grid: dict[str, list], params: Path) -> None:
    """Every combination of the overrides applied to the params file and checked as the stages
    will check it, before any experiment runs: errors name the combination."""
    tree = read_params(params)
    for combo in _combinations(grid):
        changed = copy.deepcopy(tree)
        for key, value in combo.items():
            _set(changed, key, value, params)
        try:
            check_params(changed, params)
        except DeepAlignError as e:
            shown_combo = ", ".join(f"{k}={json.dumps(v)}" for k, v in combo.items())
            raise DeepAlignError(f"with {shown_combo}: {e}") from e


def check_params(tree: dict, where: Path) -> None:
    """Build every stage's configs (and the runner's) from `tree`; the first bad key raises."""
    from flows.dvcgen import discover

    for stage in discover():
        flow = getattr(importlib.import_module(f"flows.{stage.name}"), stage.name)
        flow_configs(flow, tree, where)
    build(RunnerCfg, pick(tree, "runner", where), f"{where}: runner")


def _combinations(grid: dict[str, list]) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*grid.values())]


@flow(name="sweep", log_prints=True)
def sweep(
    grid: dict[str, list], workdir: str = ".", metrics: str = "metrics/headline.json"
) -> list[dict]:
    """One DVC experiment per combination of overrides ({'align.pairs': [10, 20]}), in MLflow."""
    results = []
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(
        run_name="sweep", tags={"stage": "sweep", "mlflow.source.git.commit": git_commit()}
    ):
        for combo in _combinations(grid):
            sets = [arg for k, v in combo.items() for arg in ("-S", f"{k}={json.dumps(v)}")]
            dvc(["exp", "run", *sets], workdir)
            found = json.loads((Path(workdir) / metrics).read_text())
            with mlflow.start_run(run_name=str(combo), nested=True):
                mlflow.log_params(combo)
                log_metrics(found)
            results.append({"params": combo, "metrics": found})
    return results


def main(
    overrides: list[str] = typer.Argument(
        ..., help="params.yaml keys and values to try: align.pairs=20,50 aligner.epochs=50,100"
    ),
    workdir: Path = typer.Option(Path("."), help="The DVC project folder."),
    metrics: str = typer.Option(
        "metrics/headline.json",
        help="Metrics file logged per run (the headline: one line per arch).",
    ),
    debug: bool = typer.Option(False, help="Show tracebacks."),
) -> None:
    """Run every combination of the overrides as a DVC experiment, each logged to MLflow."""
    with one_line_errors(debug):
        grid = parse_grid(overrides)
        params = workdir / "params.yaml"
        if not (workdir / "dvc.yaml").is_file() or not params.is_file():
            raise UsageError(f"{workdir}: not a deepalign project (no dvc.yaml and params.yaml)")
        check_grid(grid, params)
        with prefect_api():
            for found in sweep(grid, str(workdir), metrics):
                print(json.dumps(found["params"]), "done")


if __name__ == "__main__":
    typer.run(main)
