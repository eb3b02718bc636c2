"""The pipeline deployment: registered with its cron schedule, and one run to completion of a
tiny project whose params list an architecture the defaults do not have (`wide`) and not the
default CNN, so the same run shows that dvc.yaml follows the architecture lists."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from deepalign.config import load_section
from tests.tiny import tiny_params, tiny_repo

pytestmark = pytest.mark.slow  # real Prefect server, MLflow and DVC: minutes

ROOT = Path(__file__).resolve().parents[1]
LISTS = ("aligner", "align", "curves", "converge")  # sections with an `archs` list


def _wide_params() -> dict:
    """Tiny params with a zoo architecture of their own (`wide`) in every list, no CNN."""
    params = tiny_params()
    wide = copy.deepcopy(params["zoo"]["archs"]["mlp"]) | {"hidden": [7, 5]}
    params["zoo"]["archs"] = {"mlp": params["zoo"]["archs"]["mlp"], "wide": wide}
    for section in LISTS:
        params[section]["archs"] = ["mlp", "wide"]
    return params


@pytest.fixture(scope="module", autouse=True)
def prefect_server():
    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="module")
def scheduled(tmp_path_factory):
    """The tiny project after one run of the deployment: (repo, env, cron, state, run id)."""
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    from flows.schedule import ScheduleCfg, deployment

    tmp_path = tmp_path_factory.mktemp("scheduled")
    cfg = load_section("schedule", ScheduleCfg, ROOT / "params.yaml")
    repo = tiny_repo(tmp_path, _wide_params())
    dep_id = deployment(cfg, repo).apply()

    async def read():
        async with get_client() as client:
            return await client.read_deployment(dep_id)

    import asyncio

    cron = asyncio.run(read()).schedules[0].schedule.cron
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.schedule",
            "--params",
            str(repo / "params.yaml"),
            "--workdir",
            str(repo),
        ],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        run = run_deployment(f"pipeline/{cfg.name}", timeout=600, poll_interval=2)
    finally:
        server.terminate()
        server.wait(30)
    return repo, env, cron, run.state, run.id


def test_deployment_runs_on_schedule_and_to_completion(scheduled):
    repo, env, cron, state, _ = scheduled
    assert cron == "0 3 * * *"
    assert state.is_completed(), state
    assert (repo / "metrics" / "evaluate.json").is_file() and (repo / "dvc.lock").is_file()
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status"], cwd=repo, capture_output=True, text=True, env=env
    )
    assert "up to date" in status.stdout


def test_dvc_repro_runs_whatever_architectures_params_list(scheduled):
    """`wide` in every list, the default CNN in none: the run trained, aligned and reported
    exactly those, with no dvc.yaml edit."""
    repo, *_, state, _ = scheduled
    assert state.is_completed(), state
    evaluate = json.loads((repo / "metrics" / "evaluate.json").read_text())
    written = [*(repo / "plots" / "evaluate").iterdir(), *(repo / "figures" / "evaluate").iterdir()]
    names = [f"interpolation_{a}.{e}" for a in ("mlp", "wide") for e in ("csv", "png")]
    assert set(evaluate) == {"mlp", "wide"} and sorted(p.name for p in written) == names
    aligners = [p.name for p in (repo / "aligner").glob("*.pt") if ".state." not in p.name]
    assert sorted(aligners) == ["mlp.pt", "wide.pt"]
    assert set(json.loads((repo / "metrics" / "zoo.json").read_text())) == {"mlp", "wide"}
    report = (repo / "report" / "index.html").read_text()
    assert "Linear interpolation: wide" in report and "Linear interpolation: cnn" not in report


def _pipeline_runs(env: dict, monkeypatch):
    """The MLflow runs of the deployment's one pipeline run (before the sweep adds its own)."""
    import mlflow

    from flows.common import EXPERIMENT

    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])  # this test only
    runs = mlflow.search_runs(experiment_names=[EXPERIMENT])
    return runs[runs["tags.stage"] != "sweep"].dropna(axis=1, how="all")


def test_one_pipeline_run_reads_in_mlflow_as_in_params_yaml(scheduled, monkeypatch):
    import mlflow

    repo, env, *_ = scheduled
    runs = _pipeline_runs(env, monkeypatch)
    params = [c.removeprefix("params.") for c in runs.columns if c.startswith("params.")]
    assert {"data.name", "zoo.archs", "align.sinkhorn", "aligner.epochs"} <= set(params)
    assert not [p for p in params if "Cfg" in p]  # no Python class names
    assert len(runs.columns) < 120, sorted(runs.columns)
    stage = runs[runs["tags.mlflow.parentRunId"].isna()].set_index("tags.stage")
    assert stage.loc["evaluate", "metrics.mlp/wm"] >= 0  # the stage run carries its headline
    assert stage.loc["zoo", "metrics.mlp/acc"] > 0
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    commit = head.stdout.strip() if head.returncode == 0 else "unknown"  # no commit yet: tiny
    assert stage.loc["evaluate", "tags.mlflow.source.git.commit"] == commit
    assert stage.loc["evaluate", "tags.git.dirty"] in ("true", "false")
    assert stage.loc["evaluate", "tags.mlflow.runName"].startswith("evaluate @ ")
    names = [c for c in runs.columns if c.startswith("metrics.")]
    assert not [n for n in names if "-" in n]  # method names are tags, never mangled

    steps = yaml.safe_load((repo / "params.yaml").read_text())["converge"]["steps"]
    query = "tags.stage = 'converge' and tags.method = 'deep_align' and tags.arch = 'mlp'"
    (run_id,) = mlflow.search_runs(experiment_names=["deepalign"], filter_string=query)["run_id"]
    history = mlflow.MlflowClient().get_metric_history(run_id, "loss_barrier")
    assert sorted(m.step for m in history) == steps  # one metric with steps, not one per step


def test_each_stage_flow_run_logs_its_outputs_and_mlflow_run(scheduled, monkeypatch):
    """Read back through the Prefect API: a stage's flow run is named after it and its log
    names its outputs and its MLflow run, whose tags point back at the flow run."""
    import asyncio

    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterName,
        LogFilter,
        LogFilterFlowRunId,
    )

    repo, env, *_ = scheduled

    async def read():
        async with get_client() as client:
            named = FlowRunFilter(name=FlowRunFilterName(like_="evaluate @"))
            (run,) = await client.read_flow_runs(flow_run_filter=named)
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            artifacts = await client.read_artifacts()
            return run, [log.message for log in logs], artifacts

    run, messages, artifacts = asyncio.run(read())
    assert run.name.startswith("evaluate @ ") and "stage:evaluate" in run.tags
    text = "\n".join(messages)
    assert "wrote metrics/evaluate.json" in text and "wrote plots/evaluate" in text
    evaluated = _pipeline_runs(env, monkeypatch).set_index("tags.stage")
    evaluate_run = evaluated[evaluated["tags.mlflow.parentRunId"].isna()].loc["evaluate"]
    assert f"MLflow run {evaluate_run['run_id']}" in text
    assert evaluate_run["tags.prefect.flow_run"] == str(run.id)
    assert "evaluate: mlp/weight_matching done" in text  # progress per architecture and method
    assert any(a.key == "evaluate-headline" for a in artifacts)


def test_sweep_runs_each_override_as_an_experiment_in_mlflow(scheduled, monkeypatch):
    import mlflow

    from flows.common import EXPERIMENT
    from flows.pipeline import sweep

    repo, env, _, state, _ = scheduled
    assert state.is_completed(), state
    ident = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    for key, value in {**env, **ident, "GIT_COMMITTER_EMAIL": "t@t"}.items():
        monkeypatch.setenv(key, value)
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "tiny"]):  # experiments need HEAD
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)

    results = sweep({"evaluate.points": [3, 5]}, workdir=str(repo))

    assert [r["params"] for r in results] == [{"evaluate.points": 3}, {"evaluate.points": 5}]
    coarse, fine = (r["metrics"]["mlp"] for r in results)  # the headline: one line per arch
    assert set(coarse) >= {"acc", "wm"}
    for key in coarse:  # 5 lambdas include the 3 (0, 0.5, 1): barriers are a max over more points
        assert fine[key] == coarse[key] if key == "acc" else fine[key] >= coarse[key] - 1e-4
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(EXPERIMENT)
    parent = client.search_runs([exp.experiment_id], "attributes.run_name = 'sweep'")[0]
    children = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(c.data.params["evaluate.points"] for c in children) == ["3", "5"]
    headline = {f"{arch}/{k}" for arch, keys in results[0]["metrics"].items() for k in keys}
    assert "mlp/wm" in headline
    assert all(set(c.data.metrics) == headline for c in children)  # the headline, no more


def test_the_run_carries_each_stage_as_a_task_with_dvc_output_as_its_log(scheduled):
    """Read back through the Prefect API: task runs named after the stages, and their logs."""
    import asyncio

    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )

    *_, state, run_id = scheduled
    assert state.is_completed(), state

    async def read():
        async with get_client() as client:
            runs = FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
            tasks = await client.read_task_runs(flow_run_filter=runs)
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            return tasks, logs

    tasks, logs = asyncio.run(read())
    stages = ["zoo", "train_aligner", "align", "converge", "curves", "evaluate", "report"]
    assert sorted(t.name for t in tasks if t.name in stages) == sorted(stages)
    by_task = {t.id: t.name for t in tasks}
    texts: dict = {}
    for log in logs:  # every message of each task run, in order
        name = by_task.get(log.task_run_id)
        texts[name] = texts.get(name, "") + log.message + "\n"
    assert "Running stage 'evaluate'" in texts["evaluate"], texts.get("evaluate")
    assert "python -m flows.zoo" in texts["zoo"]


def test_a_dry_run_names_the_stages_an_override_reruns(scheduled):
    """`dvc repro --dry` in the workspace previews an edited param: it names align, runs nothing.

    (`dvc exp run --dry` runs in a temporary copy where DVC checks no data out, so stages whose
    data inputs are DVC outputs cannot be previewed that way; see the README.)"""
    repo, env, _, state, _ = scheduled
    assert state.is_completed(), state
    params = (repo / "params.yaml").read_text()
    before = (repo / "metrics" / "evaluate.json").read_text()
    edited = yaml.safe_load(params)
    edited["align"]["pairs"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(edited))
    try:
        dvc = [sys.executable, "-m", "dvc", "repro", "--dry"]
        done = subprocess.run(dvc, cwd=repo, capture_output=True, text=True, env=env)
    finally:
        (repo / "params.yaml").write_text(params)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Running stage 'align'" in done.stdout and "Running stage 'zoo'" not in done.stdout
    assert (repo / "metrics" / "evaluate.json").read_text() == before  # nothing ran
