"""The pipeline deployment: registered with its cron schedule, and one run to completion."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from deepalign.config import load_section
from tests.tiny import tiny_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def prefect_server():
    with prefect_test_harness(server_startup_timeout=90):
        yield


def tiny_repo(tmp_path: Path) -> Path:
    """A git + DVC project with this repo's stages and code, and tiny params."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("deepalign", "flows"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    for cmd in (
        ["git", "init", "-q"],
        [sys.executable, "-m", "dvc", "init", "-q"],
        [sys.executable, "-m", "dvc", "config", "core.analytics", "false"],
    ):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
    return repo


def test_deployment_runs_on_schedule_and_to_completion(tmp_path):
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    from flows.schedule import ScheduleCfg, deployment

    cfg = load_section("schedule", ScheduleCfg, ROOT / "params.yaml")
    repo = tiny_repo(tmp_path)
    dep_id = deployment(cfg, repo).apply()

    async def read():
        async with get_client() as client:
            return await client.read_deployment(dep_id)

    import asyncio

    registered = asyncio.run(read())
    assert registered.schedules[0].schedule.cron == cfg.cron == "0 3 * * *"

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
    assert run.state.is_completed(), run.state
    assert (repo / "metrics" / "evaluate.json").is_file() and (repo / "dvc.lock").is_file()
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status"], cwd=repo, capture_output=True, text=True, env=env
    )
    assert "up to date" in status.stdout
