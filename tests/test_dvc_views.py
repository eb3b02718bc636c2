"""What DVC users see: one line per method in `dvc plots show`, a headline `dvc metrics show`."""

import csv
import html
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.imports import ROOT

FOLDERS = ("plots/evaluate", "plots/curves", "plots/converge")  # CSVs; figures/ has the PNGs


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
    return {k: v[0]["content"] for k, v in found.items() if v and v[0]["type"] == "vega"}


@pytest.mark.slow  # starts a process
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


@pytest.mark.slow  # starts a process
def test_the_default_template_would_mix_the_methods():
    """Twin: DVC's own linear template colours by revision only, so the methods share a line."""
    target = "plots/evaluate/interpolation_mlp.csv"
    spec = _specs(target, "-t", "linear", "-x", "lambda", "-y", "test_loss")[target]
    assert "method" not in json.dumps(spec["encoding"])


@pytest.mark.slow  # starts a process
def test_metrics_show_fits_a_terminal():
    """`dvc metrics show` prints the headline only: every line under 200 characters."""
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "metrics", "show"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("metrics/headline.json") for line in lines), done.stdout
    assert max(len(line) for line in lines) < 200, done.stdout


def _rendered(page: Path, workdir: Path) -> tuple[int, list[str]]:
    """Headless Chromium with every request beyond 127.0.0.1 sent to a dead proxy: how many
    Vega plots drew their marks, and every resource the page asked for."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no headless Chromium here (CI installs it)")
    probe = (
        "<script>window.addEventListener('load', () => setTimeout(() => {document.title ="
        " JSON.stringify(performance.getEntriesByType('resource').map(e => e.name))}, 2000))"
        "</script>"
    )
    head, _, tail = page.read_text().rpartition("</body>")  # Vega's script holds the word too
    page.write_text(head + probe + "</body>" + tail)
    offline = ["--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>"]
    quiet = ["--disable-background-networking", "--disable-component-update", "--no-first-run"]
    done = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", *offline, *quiet,
         f"--user-data-dir={workdir / 'chrome'}", "--virtual-time-budget=15000", "--dump-dom",
         page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    title = re.search(r"<title>(.*?)</title>", done.stdout, re.DOTALL)
    requested = json.loads(html.unescape(title.group(1))) if title else ["(no probe result)"]
    return done.stdout.count('class="marks"'), requested


@pytest.mark.slow  # starts a process
def test_plots_show_draws_every_plot_with_the_network_off(tmp_path):
    out = tmp_path / "plots"
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "plots", "show", "-o", str(out)],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    specs = _specs()
    drawn, requested = _rendered(out / "index.html", tmp_path)
    assert drawn == len(specs) >= 6 and requested == []  # every plot, nothing fetched
    assert not list(out.rglob("*.png"))  # each figure once: the PNGs are not DVC plots

    # twin: DVC's own page takes Vega from a CDN, so offline it draws nothing
    from dvc_render.html import PAGE_HTML

    template = tmp_path / "cdn.html"
    template.write_text(PAGE_HTML)
    cdn = tmp_path / "cdn"
    subprocess.run(
        [sys.executable, "-m", "dvc", "plots", "show", "-o", str(cdn), "--html-template",
         str(template)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    drawn, requested = _rendered(cdn / "index.html", tmp_path)
    assert drawn == 0 and any("cdn.jsdelivr.net" in url for url in requested)


@pytest.mark.slow  # starts a process
def test_each_plot_has_titled_axes_and_the_aligned_methods_are_readable():
    """Axis titles from the stage declarations; loss curves on a log axis so that the aligned
    methods are not squashed under naive's barrier."""
    specs = _specs()
    for name, spec in specs.items():
        encoding = spec["spec"]["encoding"] if "facet" in spec else spec["encoding"]  # panels
        for axis in ("x", "y"):
            title = encoding[axis]["title"]
            assert title and not title.startswith("<DVC"), (name, axis)
    budget = specs["metrics/refine_budget.csv"]  # seconds and barriers span decades
    assert budget["facet"]["column"]["field"] == "arch"
    assert budget["spec"]["encoding"]["x"]["scale"]["type"] == "log"
    loss = specs["plots/evaluate/interpolation_mlp.csv"]["encoding"]["y"]
    assert loss["scale"]["type"] == "log" and loss["title"] == "test loss"
    study = specs["plots/aligner_scaling.csv"]["encoding"]
    assert study["color"]["field"] == "steps"  # one line per step count, not a zig-zag


def test_the_offline_page_is_current_and_dvc_uses_it():
    from flows.dvcgen import offline_plots_page

    assert (ROOT / ".dvc" / "plots" / "offline.html").read_text() == offline_plots_page()
    assert "html_template = plots/offline.html" in (ROOT / ".dvc" / "config").read_text()
    assert "/dvc_plots/" in (ROOT / ".gitignore").read_text().splitlines()  # output untracked


def test_the_report_names_the_method_with_the_lowest_barrier():
    from deepalign.evaluation.report import winner

    methods = {
        "naive": {"loss_barrier_mean": 1.3},
        "weight_matching": {"loss_barrier_mean": 0.2, "seconds_per_pair_mean": 0.01},
        "deep_align+sinkhorn": {"loss_barrier_mean": 0.07, "seconds_per_pair_mean": 0.24},
    }
    line = winner(methods)
    assert "<b>deep_align+sinkhorn</b> (0.070)" in line and "0.24" not in line  # no timings
    assert "weight_matching 0.200" in line and "naive 1.300" in line
    methods["weight_matching"]["loss_barrier_mean"] = 0.01  # twin: a new best is named
    assert "<b>weight_matching</b>" in winner(methods)


def test_the_report_leaves_timings_out_and_keeps_the_rest():
    from deepalign.evaluation.report import render_html

    metrics = {"zoo": {"mlp": {"test_acc_mean": 0.9612, "train_seconds": 12.3456}}}
    page = render_html(metrics, ROOT / "no-figures")
    assert "0.961" in page and "12.3" not in page  # twin: the accuracy is shown
    again = {"zoo": {"mlp": {"test_acc_mean": 0.9612, "train_seconds": 99.0}}}
    assert render_html(again, ROOT / "no-figures") == page  # another run's time: same bytes


@pytest.mark.slow  # starts a process
def test_exp_show_as_the_readme_gives_it_fits_160_columns():
    (line,) = [s for s in (ROOT / "README.md").read_text().splitlines() if "dvc exp show" in s]
    command = shlex.split(line.split("`")[1] if "`" in line else line)
    assert command[:3] == ["dvc", "exp", "show"]
    env = os.environ | {"COLUMNS": "160"}
    done = subprocess.run(
        [sys.executable, "-m", *command, "--no-pager"],
        cwd=ROOT, capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any("mlp.da_sinkhorn" in s for s in lines), done.stdout  # the headline is there
    assert max(len(s.rstrip()) for s in lines) <= 160 and "…" not in done.stdout, done.stdout
    everything = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "show", "--no-pager"],
        cwd=ROOT, capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert "…" in everything.stdout  # twin: every params key does not fit
