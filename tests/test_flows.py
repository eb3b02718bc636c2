"""Stage flows on tiny configs, against a throwaway Prefect server and MLflow store."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def prefect_server():
    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A tiny params.yaml (both architectures) and an MLflow store in tmp_path."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for net in params["zoo"]["archs"].values():
        net.update(n_train=2, n_val=2, n_test=2, epochs=1)
        net["hidden"] = net["hidden"][:2]
        net["strides"] = net["strides"][:2]
    params["zoo"]["chunk_size"] = 3
    params["aligner"].update(epochs=2, val_every=1, val_pairs=2, pairs_per_step=2)
    params["aligner"]["model"].update(dim=8, head_dim=8, rounds=1)
    params["align"].update(
        pairs=2, planted_pairs=1, methods=["naive", "weight_matching", "deep_align+weight_matching"]
    )
    params["align"]["ste"]["steps"] = 2
    params["align"]["sinkhorn"]["steps"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_zoo_flow_writes_zoo_metrics_and_mlflow_run(workdir):
    from flows.zoo import zoo

    summary = zoo(
        params=workdir / "params.yaml",
        out=workdir / "zoo",
        metrics=workdir / "metrics" / "zoo.json",
    )
    manifest = json.loads((workdir / "zoo" / "mlp" / "manifest.json").read_text())
    assert [n["split"] for n in manifest["networks"]] == [
        "train",
        "train",
        "val",
        "val",
        "test",
        "test",
    ]
    assert len(list((workdir / "zoo" / "cnn").glob("net-*.pt"))) == 6
    metrics = json.loads((workdir / "metrics" / "zoo.json").read_text())
    assert metrics == json.loads(json.dumps(summary))
    assert metrics["mlp"]["trained_this_run"] == 6 and metrics["mlp"]["test_acc_mean"] > 0.1
    runs = mlflow.search_runs(experiment_names=["deepalign"])
    assert len(runs) == 1 and runs.loc[0, "tags.stage"] == "zoo"
    assert runs.loc[0, "metrics.mlp/test_acc_mean"] == pytest.approx(
        metrics["mlp"]["test_acc_mean"]
    )

    again = zoo(
        params=workdir / "params.yaml",
        out=workdir / "zoo",
        metrics=workdir / "metrics" / "zoo.json",
    )
    assert again["mlp"]["trained_this_run"] == 0 and again["cnn"]["trained_this_run"] == 0


def test_misspelt_param_exits_with_one_line(workdir):
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["zoo"]["chunk_sise"] = params["zoo"].pop("chunk_size")
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run(
        [sys.executable, "-m", "flows.zoo", "--params", "params.yaml", "--out", "zoo"],
        capture_output=True,
        text=True,
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: params.yaml: zoo.chunk_sise: unknown key (did you mean 'chunk_size'?)"
    ]
    assert not (workdir / "zoo").exists()


def test_train_align_evaluate_flows_chain(workdir):
    from flows.align import align
    from flows.evaluate import evaluate
    from flows.train_aligner import train_aligner
    from flows.zoo import zoo

    zoo(params=workdir / "params.yaml", out=workdir / "zoo", metrics=workdir / "zoo.json")
    trained = train_aligner(
        params=workdir / "params.yaml",
        zoo=workdir / "zoo",
        out=workdir / "aligner",
        metrics=workdir / "train_aligner.json",
    )
    assert set(trained) == {"mlp", "cnn"} and (workdir / "aligner" / "cnn.pt").is_file()
    align(params=workdir / "params.yaml", zoo=workdir / "zoo", out=workdir / "aligned")
    summary = evaluate(
        params=workdir / "params.yaml",
        zoo=workdir / "zoo",
        aligned=workdir / "aligned",
        plots=workdir / "plots",
        metrics=workdir / "evaluate.json",
    )
    for arch in ("mlp", "cnn"):
        assert set(summary[arch]) == {"naive", "weight_matching", "deep_align+weight_matching"}
        assert summary[arch]["weight_matching"]["planted_recovery_mean"] == 1.0
        assert (workdir / "plots" / f"interpolation_{arch}.png").stat().st_size > 10_000
    assert len((workdir / "plots" / "pairs.csv").read_text().splitlines()) == 1 + 2 * 3 * 2
    stages = set(mlflow.search_runs(experiment_names=["deepalign"])["tags.stage"].dropna())
    assert {"zoo", "train_aligner", "align", "evaluate"} <= stages
