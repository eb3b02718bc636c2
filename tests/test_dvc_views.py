"""What DVC users see: one line per method in `dvc plots show`, a headline `dvc metrics show`."""

import csv
import json
import subprocess
import sys

from flows.imports import ROOT

FOLDERS = ("plots/evaluate", "plots/curves", "plots/converge")


def _specs(*args: str) -> dict[str, dict]:
    """`dvc plots show --json` of the committed plots: file -> its Vega-Lite spec."""
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "plots", "show", "--json", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)["data"]
    return {k: v[0]["content"] for k, v in found.items() if v[0]["type"] == "vega"}


def test_each_method_is_its_own_line():
    specs = _specs()
    csvs = [p for f in FOLDERS for p in sorted((ROOT / f).glob("*.csv"))]
    assert len(csvs) >= 6  # three stages, two architectures
    for path in csvs:
        spec = specs[str(path.relative_to(ROOT))]
        with path.open() as f:
            methods = {row["method"] for row in csv.DictReader(f)}
        plotted = {row["method"] for row in spec["data"]["values"]}
        assert len(methods) >= 3 and plotted == methods, path
        assert spec["encoding"]["color"]["field"] == "method", path  # one colour per method
        assert spec["encoding"]["y"]["aggregate"] == "mean", path  # one point per x and method
        assert spec["encoding"]["strokeDash"]["field"] == "rev", path  # dvc plots diff: a dash


def test_the_default_template_would_mix_the_methods():
    """Twin: DVC's own linear template colours by revision only, so the methods share a line."""
    target = "plots/evaluate/interpolation_mlp.csv"
    spec = _specs(target, "-t", "linear", "-x", "lambda", "-y", "test_loss")[target]
    assert "method" not in json.dumps(spec["encoding"])


def test_metrics_show_fits_a_terminal():
    """`dvc metrics show` prints the headline only: every line under 200 characters."""
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "metrics", "show"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("metrics/headline.json") for line in lines), done.stdout
    assert max(len(line) for line in lines) < 200, done.stdout
