"""The pipeline deployment: registered with its cron schedule, and one run to completion."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from deepalign.config import load_section
from tests.tiny import tiny_repo

pytestmark = pytest.mark.slow  # real Prefect server, MLflow and DVC: minutes

ROOT = Path(__file__).resolve().parents[1]


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
    repo = tiny_repo(tmp_path)
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
    assert set(coarse) >= {"test_acc", "wm_barrier"}
    for key in coarse:  # 5 lambdas include the 3 (0, 0.5, 1): barriers are a max over more points
        assert (
            fine[key] >= coarse[key] - 1e-4 if key.endswith("barrier") else fine[key] == coarse[key]
        )
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(EXPERIMENT)
    parent = client.search_runs([exp.experiment_id], "attributes.run_name = 'sweep'")[0]
    children = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(c.data.params["evaluate.points"] for c in children) == ["3", "5"]
    headline = {f"{arch}/{k}" for arch, keys in results[0]["metrics"].items() for k in keys}
    assert "mlp/wm_barrier" in headline
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
