"""What every stage flow shares: MLflow runs, metrics files and the command-line entry."""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import subprocess
import sys
import typing
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import mlflow
import typer
from prefect import Flow, get_run_logger
from prefect import tags as prefect_tags
from prefect.artifacts import create_table_artifact
from prefect.exceptions import MissingContextError
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner
from tqdm import tqdm

from deepalign.config import Count, Positive, build, load_section, one_of, pick, read_params
from deepalign.console import run_app
from deepalign.core.data import DataCfg, data_paths
from deepalign.errors import DeepAlignError, UsageError, one_line
from deepalign.evaluation.summary import headline, shown
from deepalign.guard import check_io
from deepalign.io import clean_stale_temps, write_json
from deepalign.threads import ALLOCATOR_ENV, configure_process, threads_for
from flows.server import exit_with_parent, prefect_api, set_exit_code
from flows.stages import ROLES, Paths, Stage

EXPERIMENT = "deepalign"


def flat_params(section: Any, prefix: str) -> dict[str, Any]:
    """A config (dataclass) as params.yaml names two levels deep (`align.sinkhorn`,
    `data.name`); deeper settings are one compact JSON value, so that MLflow's table stays
    readable and each column is a key a user can find in params.yaml."""
    data = dataclasses.asdict(section) if dataclasses.is_dataclass(section) else section
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            value = json.dumps(value, separators=(",", ":"), default=str)
        out[f"{prefix}.{key}"] = value
    return out


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, check=True)
        return done.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def git_commit() -> str:
    return _git("rev-parse", "HEAD")


def git_dirty() -> str:
    """ "true" when tracked files differ from the commit (DVC's own outputs aside)."""
    changed = _git("status", "--porcelain", "--untracked-files=no")
    return "unknown" if changed == "unknown" else str(bool(changed)).lower()


def run_label(stage: str) -> str:
    """A run's name in Prefect and MLflow: the stage and the commit it ran from."""
    commit = git_commit()
    return f"{stage} @ {'no commit' if commit == 'unknown' else commit[:8]}"


def logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task (its lines reach the UI); a plain one
    outside."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("deepalign")


def runs_url(run_id: str = "") -> str:
    """The runs view of the experiment (or one run) in `mlflow ui` on its default port."""
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    base = f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}"
    return f"{base}/runs/{run_id}" if run_id else f"{base}/runs"


def run_tags(stage: Stage) -> dict[str, str]:
    """What links a stage's MLflow run to the rest: the git commit and whether the work tree
    was dirty, the DVC experiment (under `dvc exp run`), the Prefect flow run."""
    tags = {
        "stage": stage.name,
        "mlflow.source.git.commit": git_commit(),
        "git.dirty": git_dirty(),
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp"] = os.environ["DVC_EXP_NAME"]
    if flow_run.id:
        tags["prefect.flow_run"] = str(flow_run.id)
    return tags


@dataclass
class StageRun:
    """A stage's MLflow run while it runs: its id (parent of nested runs), its paths, and the
    metrics the stage puts in `metrics` (metrics option -> nested numbers)."""

    id: str
    io: Paths
    metrics: dict[str, dict] = field(default_factory=dict)


@contextmanager
def stage_run(stage: Stage, io: Paths, **configs: Any) -> Iterator[StageRun]:
    """One MLflow run per stage execution, its params named as in params.yaml (each config by
    the section its flow argument comes from), tagged with commit, DVC experiment and Prefect
    flow run.

    When the body succeeds, each metrics file the stage declares is written and logged: as an
    artifact, and as MLflow metrics (nested runs per architecture for `per_arch` files; the
    flow logs its `nested` files itself); the stage run carries the headline numbers it has.
    Its plots and uncached outputs are logged as artifacts; the Prefect log names each output
    and the MLflow run.
    """
    log = logger()
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=run_label(stage.name), tags=run_tags(stage)) as active:
        for arg, config in configs.items():
            mlflow.log_params(flat_params(config, stage.configs[arg]))
        run = StageRun(active.info.run_id, io)
        log.info("MLflow run %s: %s", run.id, runs_url(run.id))
        yield run
        missing = [k for k in stage.metrics if k not in run.metrics]
        if missing:
            raise DeepAlignError(f"stage {stage.name} produced no metrics for {missing}")
        for key in stage.metrics:
            write_json(io.at[key], run.metrics[key])
            mlflow.log_artifact(str(io.at[key]))
            if key in stage.per_arch:
                for arch, values in run.metrics[key].items():
                    log_arch_run(run, stage.name, arch, values)
            elif key not in stage.nested:
                log_metrics(run.metrics[key])
        found = headline_of(stage, run.metrics)
        log_metrics(found)
        for key in (*stage.plots, *stage.uncached):
            _log_artifact(io.at[key])
        for path in stage.written(io):
            log.info("wrote %s", path)
        log.info("done; MLflow run %s (%s)", run.id, runs_url())
        publish_headline(stage, found)


def headline_of(stage: Stage, metrics: dict[str, dict]) -> dict:
    """The report's headline numbers this stage's files hold ({arch: {name: value}})."""
    if "headline" in stage.metrics:
        return metrics["headline"]
    return headline({stage.name: metrics.get("metrics", {})})


def publish_headline(stage: Stage, found: dict[str, dict]) -> None:
    """The stage's headline ({arch: {name: value}}) as a Prefect table artifact (the flow
    run's Artifacts tab)."""
    if found and flow_run.id:
        rows = [{"architecture": arch, **values} for arch, values in found.items()]
        key = stage.name.replace("_", "-")
        create_table_artifact(rows, key=f"{key}-headline", description=f"{stage.name}: headline")


def track(
    futures: dict[Any, PrefectFuture],
    stage: str,
    unit: str,
    finished: Callable[[Any, Any], None] | None = None,
) -> dict[Any, Any]:
    """Wait for a stage's tasks: one progress bar drawn by the flow's process (so that worker
    processes never draw over each other) and a Prefect log line per finished task, then
    `finished(key, result)` where given (for each that succeeded); their results by key."""
    log, key_of = logger(), {f.task_run_id: k for k, f in futures.items()}
    with tqdm(total=len(futures), desc=stage, unit=unit, mininterval=1.0) as bar:
        for future in as_completed(list(futures.values())):
            key = key_of[future.task_run_id]
            name = "/".join(map(str, key)) if isinstance(key, tuple) else str(key)
            bar.set_postfix_str(name, refresh=False)
            bar.update()
            log.info("%s: %s done (%d/%d)", stage, name, bar.n, bar.total)
            if finished:
                try:
                    done = future.result()
                except Exception:  # raised below, once every task has ended
                    continue
                finished(key, done)
    return {k: f.result() for k, f in futures.items()}


def untimed(rows: list[dict]) -> list[dict]:
    """Rows for a CSV a stage writes beside its metrics: every column but the timings (those
    stay in the metrics files), so that the same results write the same bytes."""
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


def _log_artifact(path: Path) -> None:
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path=path.name)
    elif path.is_file():
        mlflow.log_artifact(str(path))


def log_arch_run(run: StageRun, stage: str, arch: str, metrics: dict) -> None:
    """One nested MLflow run per architecture (the numbers the report shows, under their
    file's names)."""
    tags = {"stage": stage, "arch": arch}
    with mlflow.start_run(run_name=arch, nested=True, parent_run_id=run.id, tags=tags):
        log_metrics(shown(stage, metrics))


def log_method_run(
    run: StageRun, stage: str, arch: str, method: str, metrics: dict[str, Any]
) -> None:
    """One nested MLflow run per architecture and method with the numbers the report shows,
    tagged so a query finds it (the method's name, `+` included, is a tag: MLflow's metric
    names cannot hold it)."""
    tags = {"stage": stage, "arch": arch, "method": method}
    name = f"{arch}/{method}"
    with mlflow.start_run(run_name=name, nested=True, parent_run_id=run.id, tags=tags):
        log_metrics(shown(stage, metrics))
    logger().info("%s: %s done", stage, name)


def log_metrics(metrics: dict) -> None:
    """Nested numbers as MLflow metrics named 'a/b/c'; a dict keyed by step numbers
    ({"0": x, "5": y}) is one metric with steps."""
    scalars, series = flat_metrics(metrics)
    mlflow.log_metrics(scalars)
    for name, points in series.items():
        for step, value in points.items():
            mlflow.log_metric(name, value, step=step)


def flat_metrics(metrics: dict, prefix: str = "") -> tuple[dict[str, float], dict[str, dict]]:
    """Nested metrics as (scalars 'a/b/c' -> value, series 'a/b' -> {step: value})."""
    scalars: dict[str, float] = {}
    series: dict[str, dict[int, float]] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
            series[name] = {int(k): float(v) for k, v in value.items()}
        elif isinstance(value, dict):
            inner, steps = flat_metrics(value, f"{name}/")
            scalars |= inner
            series |= steps
        elif isinstance(value, bool | int | float):
            scalars[name] = float(value)
    return scalars, series


RUNNERS = ("threads", "processes", "dask")


@dataclass(frozen=True)
class RunnerCfg:
    """Section `runner`: where the tasks of the fanning-out stages (zoo: groups of networks,
    align: methods) run."""

    kind: Annotated[str, one_of(*RUNNERS)]
    workers: Positive  # tasks side by side: worker processes (processes, local Dask)
    address: str  # a Dask scheduler (tcp://host:8786); "" starts a local cluster
    threads: Count  # intra-op threads per worker; 0: cores / workers
    pair_threads: Positive  # intra-op threads of per-pair loops inside a task


def stage_runner(stage: Stage, cfg: RunnerCfg) -> tuple[RunnerCfg, int]:
    """The runner of a stage and the torch threads of each of its tasks (`deepalign.threads`).

    A stage that does not fan out (its tasks are one per architecture: few and unequal) runs
    them one at a time in its own process on all the cores. A fanning-out stage uses the
    configured runner: the thread runner one task at a time on all the cores (two Python
    threads of small tensor ops contend for the GIL), worker processes (a process pool or
    Dask) each with its share of the cores.
    """
    if not stage.fan_out or cfg.kind == "threads":
        cfg = dataclasses.replace(cfg, kind="threads", workers=1, address="")
    return cfg, threads_for(cfg.workers, cfg.threads)


def start_worker(n_threads: int, pair_threads: int) -> None:
    """A process-pool worker: the thread and allocator policy, and no life after its stage."""
    exit_with_parent()
    configure_process(n_threads, pair_threads)


@contextmanager
def restored_environ() -> Iterator[None]:
    """Undo what a block does to this process's environment: a local Dask cluster's nannies
    write `distributed.nanny.pre-spawn-environ` (the workers' OMP_NUM_THREADS and allocator
    settings) into the parent's `os.environ` and leave it there."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def task_runner(cfg: RunnerCfg, threads: int = 1) -> TaskRunner:
    """Prefect's thread pool, its process pool, or a DaskTaskRunner on a given or a local
    127.0.0.1 cluster; worker processes get `threads` intra-op threads each."""
    if cfg.kind == "threads":
        return ThreadPoolTaskRunner(max_workers=cfg.workers)
    if cfg.kind == "processes":
        return ProcessPoolTaskRunner(
            max_workers=cfg.workers,
            initializer=start_worker,
            initargs=(threads, cfg.pair_threads),
        )
    if cfg.kind == "dask":
        import dask
        from prefect_dask import DaskTaskRunner

        if cfg.address:
            return DaskTaskRunner(address=cfg.address)
        # Dask sets these in a worker's environment before it starts: 1 BLAS thread and
        # MALLOC_TRIM_THRESHOLD_=65536 (a trim after every free; batched training ran at half
        # speed, `deepalign.threads`). Give them the thread policy's count and the allocator
        # setting of the stage processes instead; with one worker its arithmetic, hence its
        # networks, match the thread runner's.
        # Its workers also sample their task's stack every 10 ms for Dask's profiler: 200 MLPs
        # (2 tasks) trained in 29.5-34.9 s inside the tasks with it, 26.2-28.4 s without,
        # 23.6-25.5 s in the process pool; off here, as no one reads it without the dashboard.
        spawn_env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        dask.config.set(
            {
                "distributed.nanny.pre-spawn-environ": spawn_env | ALLOCATOR_ENV,
                "distributed.worker.profile.enabled": False,
            }
        )
        local = {
            "n_workers": cfg.workers,
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": None,
        }
        return DaskTaskRunner(cluster_kwargs=local)
    raise DeepAlignError(f"runner.kind '{cfg.kind}' is unknown (known: {', '.join(RUNNERS)})")


@contextmanager
def one_line_errors(debug: bool = False) -> Iterator[None]:
    """Bad input becomes one line on stderr (control characters escaped): exit 2 for a bad
    command line (UsageError), 1 for bad files or params and OS errors; --debug re-raises."""
    try:
        yield
    except (DeepAlignError, OSError, MemoryError) as e:
        if debug:
            raise
        if isinstance(e, OSError):
            message = f"{e.filename or 'a file'}: {e.strerror or type(e).__name__}"
        elif isinstance(e, MemoryError):
            message = "out of memory (lower the sizes in params.yaml)"
        else:
            message = str(e)
        print(f"error: {one_line(message)}", file=sys.stderr)
        raise typer.Exit(2 if isinstance(e, UsageError) else 1) from None


def stage_folders(stage: Stage, io: Paths) -> dict[str, Path]:
    """The folders a stage reads named files from (those files are among its `reads`)."""
    return {f"--{k}": io.at[k] for k, role in stage.roles().items() if role == "folders"}


def stage_reads(stage: Stage, io: Paths, params: Path) -> dict[str, Path]:
    """Every path a stage reads, by the option (or declaration) that names it: the files it
    reads inside its folders among them (`Stage.inputs`), the folders apart (`stage_folders`)."""
    reads = {f"--{k}": io.at[k] for k, role in stage.roles().items() if role == "deps"}
    return {"--params": params, **reads, **stage.inputs(io)}


def data_reads(configs: Any) -> dict[str, Path]:
    """The data files or folders a stage's data settings read."""
    found = [c for c in configs if isinstance(c, DataCfg)]
    return {f"data ({p})": p for cfg in found for p in data_paths(cfg)}


def stage_writes(stage: Stage, io: Paths) -> dict[str, Path]:
    """Every path a stage writes, by its option."""
    written = {role for role in ROLES if role not in ("folders", "deps")}
    return {f"--{k}": io.at[k] for k, role in stage.roles().items() if role in written}


def check_stage_io(stage: Stage, io: Paths, params: Path, configs: Iterable[Any] = ()) -> None:
    """Refuse, in one line, a stage run that would write a path it reads (the params file, an
    input, a file inside a folder it reads, the data of its `configs`) or write one path twice."""
    reads = stage_reads(stage, io, params) | data_reads(configs)
    check_io(reads, stage_writes(stage, io), stage=True, folders=stage_folders(stage, io))


def stage_of(flow: Flow) -> Stage:
    """The STAGE declared beside a stage's flow."""
    return sys.modules[flow.fn.__module__].STAGE


def flow_configs(
    flow: Flow, params: dict[str, Any], where: Path | str = "params.yaml"
) -> dict[str, Any]:
    """The typed configs a stage's flow takes, each built from the section its STAGE names."""
    stage = stage_of(flow)
    hints = typing.get_type_hints(flow.fn)
    return {
        arg: build(
            hints[arg], pick(params, section, where), f"{where}: {section}", arg in stage.partial
        )
        for arg, section in stage.configs.items()
    }


def cli(flow: Flow) -> None:
    """Run a stage's flow from the command line: its STAGE's paths become options.

    Before the flow runs, temp files an interrupted run left in its outputs are deleted; the
    flow talks to `PREFECT_API_URL`, or to a private server that dies with this process.
    """
    stage = stage_of(flow)

    def main(params: Path, debug: bool, **paths: Path) -> None:
        with one_line_errors(debug):
            io = stage.paths(**paths)
            check_stage_io(stage, io, params)
            configs = flow_configs(flow, read_params(params), params)
            check_stage_io(stage, io, params, configs.values())
            runner_cfg = load_section("runner", RunnerCfg, params)
            runner_cfg, threads = stage_runner(stage, runner_cfg)
            configure_process(threads_for(1, runner_cfg.threads), runner_cfg.pair_threads)
            runner = task_runner(runner_cfg, threads)
            for path in stage.written(io):
                clean_stale_temps(path)
            with prefect_api():
                tags = ["deepalign", f"stage:{stage.name}", f"pipeline:{stage.pipeline}"]
                named = flow.with_options(task_runner=runner, flow_run_name=run_label(stage.name))
                with prefect_tags(*tags):
                    named(io, **configs)

    def option(name: str, default: Any, help: str) -> inspect.Parameter:
        kind = inspect.Parameter.KEYWORD_ONLY
        if isinstance(default, bool):  # a plain flag: --debug, not --debug/--no-debug <bool>
            value = typer.Option(default, f"--{name}", help=help)
            return inspect.Parameter(name, kind, default=value, annotation=bool)
        value = typer.Option(default, help=help)
        return inspect.Parameter(name, kind, default=value, annotation=Path)

    sections = ", ".join(dict.fromkeys(stage.configs.values())) or "none"
    roles = stage.roles()
    main.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            option("params", Path("params.yaml"), f"The params file (sections: {sections})."),
            *(option(k, v, ROLES[roles[k]]) for k, v in stage.defaults().items()),
            option("debug", False, "Show tracebacks."),
        ]
    )
    main.__doc__ = flow.fn.__doc__
    app = typer.Typer(add_completion=False, rich_markup_mode=None)
    app.command()(main)
    try:
        run_app(app, sys.argv[1:])
    except SystemExit as done:
        set_exit_code(done.code)
        raise
