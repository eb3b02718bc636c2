"""dvc.yaml follows the architecture lists of params.yaml: `dvc repro` on a tiny project."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness

from tests.tiny import tiny_params, tiny_repo

pytestmark = pytest.mark.slow

LISTS = ("aligner", "align", "curves", "converge")  # sections with an `archs` list


def _repro(repo: Path, env: dict) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]


def _evaluated(repo: Path) -> tuple[set[str], list[str]]:
    evaluate = json.loads((repo / "metrics" / "evaluate.json").read_text())
    written = [*(repo / "plots" / "evaluate").iterdir(), *(repo / "figures" / "evaluate").iterdir()]
    return set(evaluate), sorted(p.name for p in written)


def test_dvc_repro_runs_whatever_architectures_params_list(tmp_path):
    """A zoo architecture the default params do not have (`wide`) in every list, the default
    CNN in none: `dvc repro` trains, aligns and reports exactly those, with no dvc.yaml edit."""
    params = tiny_params()
    wide = copy.deepcopy(params["zoo"]["archs"]["mlp"]) | {"hidden": [7, 5]}
    params["zoo"]["archs"] = {"mlp": params["zoo"]["archs"]["mlp"], "wide": wide}
    for section in LISTS:
        params[section]["archs"] = ["mlp", "wide"]
    repo = tiny_repo(tmp_path, params)
    with prefect_test_harness(server_startup_timeout=90):
        from prefect.settings import PREFECT_API_URL

        env = {
            **os.environ,
            "PREFECT_API_URL": PREFECT_API_URL.value(),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        }
        _repro(repo, env)
    names = [f"interpolation_{a}.{e}" for a in ("mlp", "wide") for e in ("csv", "png")]
    assert _evaluated(repo) == ({"mlp", "wide"}, names)
    aligners = [p.name for p in (repo / "aligner").glob("*.pt") if ".state." not in p.name]
    assert sorted(aligners) == ["mlp.pt", "wide.pt"]
    assert set(json.loads((repo / "metrics" / "zoo.json").read_text())) == {"mlp", "wide"}
    report = (repo / "report" / "index.html").read_text()
    assert "Linear interpolation: wide" in report and "Linear interpolation: cnn" not in report
