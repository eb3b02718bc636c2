"""What every stage flow shares: MLflow runs, metrics files and the command-line entry."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import mlflow
import torch
import typer
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from deepalign.config import Positive, load_section, one_of
from deepalign.errors import DeepAlignError
from deepalign.io import clean_stale_temps, digest, write_json
from flows.server import prefect_api

EXPERIMENT = "deepalign"


def flat_params(section: Any, prefix: str = "") -> dict[str, Any]:
    """A config dataclass (or dict) as flat 'a.b.c' keys for mlflow.log_params."""
    data = dataclasses.asdict(section) if dataclasses.is_dataclass(section) else section
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flat_params(value, f"{name}.")
        else:
            out[name] = value
    return out


def params_hash(*sections: Any) -> str:
    return digest([flat_params(s) for s in sections], length=12)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@contextmanager
def stage_run(stage: str, *sections: Any) -> Iterator[mlflow.ActiveRun]:
    """One MLflow run per stage execution, tagged with the commit and the params hash."""
    mlflow.set_experiment(EXPERIMENT)
    tags = {"stage": stage, "git_commit": git_commit(), "params_hash": params_hash(*sections)}
    with mlflow.start_run(run_name=stage, tags=tags) as run:
        for section in sections:
            mlflow.log_params(flat_params(section, f"{type(section).__name__}."))
        yield run


def flat_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Nested metrics as MLflow names 'a/b/c' ('+' in method names becomes '-')."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}".replace("+", "-")
        if isinstance(value, dict):
            out |= flat_metrics(value, f"{name}/")
        else:
            out[name] = float(value)
    return out


def log_metrics_file(path: Path, metrics: dict) -> None:
    """Write a DVC metrics file and log the same numbers to MLflow as 'group/metric'."""
    write_json(path, metrics)
    mlflow.log_metrics(flat_metrics(metrics))
    mlflow.log_artifact(str(path))


@dataclass(frozen=True)
class RunnerCfg:
    """Section `runner`: where the stages' tasks (groups of networks, methods) run."""

    kind: Annotated[str, one_of("threads", "dask")]
    workers: Positive  # threads, or local Dask worker processes
    address: str  # a Dask scheduler (tcp://host:8786); "" starts a local cluster


def task_runner(cfg: RunnerCfg) -> TaskRunner:
    """Prefect's thread pool, or a DaskTaskRunner on a given or a local 127.0.0.1 cluster."""
    if cfg.kind == "threads":
        return ThreadPoolTaskRunner(max_workers=cfg.workers)
    if cfg.kind == "dask":
        from prefect_dask import DaskTaskRunner

        if cfg.address:
            return DaskTaskRunner(address=cfg.address)
        threads = str(max(1, torch.get_num_threads() // cfg.workers))  # no oversubscription
        local = {
            "n_workers": cfg.workers,
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": None,
            # Dask pins workers to 1 BLAS thread; share this machine's cores instead (with one
            # worker its arithmetic, hence its networks, match the thread runner's exactly)
            "env": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
        }
        return DaskTaskRunner(cluster_kwargs=local)
    raise DeepAlignError(f"runner.kind '{cfg.kind}' is unknown (known: threads, dask)")


OUTPUT_PARAMS = ("out", "plots", "metrics")  # flow parameters that name what a stage writes


@contextmanager
def one_line_errors(debug: bool = False) -> Iterator[None]:
    """Bad input (DeepAlignError) becomes one line on stderr and exit 1; --debug re-raises."""
    try:
        yield
    except DeepAlignError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(1) from None


def cli(flow: Callable[..., Any]) -> None:
    """Run a flow from the command line: its parameters become options, plus --debug.

    Before the flow runs, temp files an interrupted run left in its outputs are deleted; the
    flow talks to `PREFECT_API_URL`, or to a private server that dies with this process.
    """

    def main(debug: bool = typer.Option(False, help="Show tracebacks."), **kwargs: Any) -> None:
        with one_line_errors(debug):
            params = kwargs.get("params", "params.yaml")
            runner = task_runner(load_section("runner", RunnerCfg, params))
            for name in OUTPUT_PARAMS:
                if isinstance(kwargs.get(name), Path):
                    clean_stale_temps(kwargs[name])
            with prefect_api():
                flow.with_options(task_runner=runner)(**kwargs)

    params = list(inspect.signature(flow.fn).parameters.values())
    debug = inspect.signature(main).parameters["debug"]
    main.__signature__ = inspect.Signature([*params, debug])  # type: ignore[attr-defined]
    typer.run(main)
