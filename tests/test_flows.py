"""Stage flows on tiny configs, against a throwaway Prefect server and MLflow store."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import pytest
import torch
import yaml
from prefect.testing.utilities import prefect_test_harness

from deepalign.zoo.store import load_zoo
from tests.tiny import configs, tiny_params

pytestmark = pytest.mark.slow  # real Prefect server, MLflow and DVC: minutes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def prefect_server():
    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An MLflow store in tmp_path (flows get tiny configs built in code: tests.tiny)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_zoo_flow_writes_zoo_metrics_and_mlflow_run(workdir):
    from flows.zoo import STAGE, zoo

    paths = STAGE.paths(workdir)
    summary = zoo(paths, **configs(zoo))["metrics"]
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
    runs = mlflow.search_runs(experiment_names=["deepalign"]).set_index("tags.mlflow.runName")
    assert set(runs["tags.stage"]) == {"zoo"} and len(runs) == 3  # the stage, one per arch
    assert runs.loc["mlp", "metrics.test_acc_mean"] == pytest.approx(
        metrics["mlp"]["test_acc_mean"]
    )  # nested per architecture; the stage run carries the headline
    (stage,) = [name for name in runs.index if name.startswith("zoo @ ")]
    assert runs.loc[stage, "metrics.mlp/acc"] == round(metrics["mlp"]["test_acc_mean"], 4)

    again = zoo(paths, **configs(zoo))["metrics"]
    assert again["mlp"]["trained_this_run"] == 0 and again["cnn"]["trained_this_run"] == 0


def test_misspelt_param_exits_with_one_line(workdir):
    params = tiny_params()
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


def _run_chain(workdir: Path) -> tuple[dict, dict]:
    """zoo -> train_aligner -> align -> evaluate on the tiny config: (trained, summary)."""
    from flows import align, evaluate, train_aligner, zoo

    summary = {}
    for stage in (zoo, train_aligner, align, evaluate):  # the pipeline's paths, under workdir
        flow = getattr(stage, stage.STAGE.name)
        summary[stage.STAGE.name] = flow(stage.STAGE.paths(workdir), **configs(flow))
    return summary["train_aligner"]["metrics"], summary["evaluate"]["metrics"]


def test_train_align_evaluate_flows_chain(workdir):
    trained, summary = _run_chain(workdir)
    assert set(trained) == {"mlp", "cnn"} and (workdir / "aligner" / "cnn.pt").is_file()
    for arch in ("mlp", "cnn"):
        assert set(summary[arch]) == {"naive", "weight_matching", "deep_align+weight_matching"}
        assert summary[arch]["weight_matching"]["planted_recovery_mean"] == 1.0
        assert (
            workdir / "figures" / "evaluate" / f"interpolation_{arch}.png"
        ).stat().st_size > 10_000
    assert len((workdir / "plots" / "pairs.csv").read_text().splitlines()) == 1 + 2 * 3 * 2
    stages = set(mlflow.search_runs(experiment_names=["deepalign"])["tags.stage"].dropna())
    assert {"zoo", "train_aligner", "align", "evaluate"} <= stages
    query = "tags.stage = 'align' and tags.method = 'weight_matching'"
    found = mlflow.search_runs(experiment_names=["deepalign"], filter_string=query)
    assert sorted(found["tags.arch"]) == ["cnn", "mlp"]  # one run per architecture
    query = "tags.stage = 'train_aligner' and tags.arch = 'mlp'"
    (trained_run,) = mlflow.search_runs(experiment_names=["deepalign"], filter_string=query)[
        "run_id"
    ]
    history = mlflow.MlflowClient().get_metric_history(trained_run, "lmc")
    assert [m.step for m in history] == [0, 1]  # per epoch, from the task's process
    chained = "tags.stage = 'evaluate' and tags.method = 'deep_align+weight_matching'"
    found = mlflow.search_runs(experiment_names=["deepalign"], filter_string=chained)
    assert len(found) == 2 and (found["metrics.loss_barrier_mean"] >= 0).all()
    columns = mlflow.search_runs(experiment_names=["deepalign"]).columns
    assert not [c for c in columns if "_mean_mean" in c or "-weight_matching" in c]


def test_process_and_dask_runners_give_the_same_zoo_and_alignment(workdir):
    from deepalign.threads import ALLOCATOR_ENV
    from flows import align as align_stage
    from flows import zoo as zoo_stage
    from flows.align import align
    from flows.common import RunnerCfg, restored_environ, task_runner
    from flows.zoo import zoo

    params = tiny_params()
    params["align"].update(archs=["mlp"], methods=["naive", "weight_matching"])
    results = {}
    # the thread runner (one thread: torch calls from two threads at once share its pool and
    # can split reductions differently) against one worker process of a process pool and of
    # a local Dask cluster with the same number of torch threads: the same float arithmetic
    before = dict(os.environ)
    with restored_environ():
        for kind, workers in (("threads", 1), ("processes", 1), ("dask", 1)):
            cfg = RunnerCfg(kind=kind, workers=workers, address="", threads=0, pair_threads=1)
            runner = task_runner(cfg, torch.get_num_threads())
            out = workdir / kind
            metrics = zoo.with_options(task_runner=runner)(
                zoo_stage.STAGE.paths(out), **configs(zoo, params)
            )["metrics"]
            align.with_options(task_runner=task_runner(cfg, torch.get_num_threads()))(
                align_stage.STAGE.paths(out), **configs(align, params)
            )
            run = torch.load(out / "aligned" / "mlp" / "weight_matching.pt", weights_only=True)
            results[kind] = (metrics, run["perms"], run["objective"])
        # Dask's nannies wrote the workers' settings into this process's environment
        assert os.environ["MALLOC_TRIM_THRESHOLD_"] == ALLOCATOR_ENV["MALLOC_TRIM_THRESHOLD_"]
    assert dict(os.environ) == before  # and the block took them back out
    m_threads, p_threads, o_threads = results.pop("threads")
    for m_other, p_other, o_other in results.values():
        for arch in ("mlp", "cnn"):
            assert m_other[arch]["test_acc_mean"] == pytest.approx(
                m_threads[arch]["test_acc_mean"], abs=1e-6
            )
        assert all(torch.equal(p_threads[g], p_other[g]) for g in p_threads)
        assert torch.allclose(o_threads, o_other)


def test_killed_zoo_stage_resumes_without_losing_work(workdir):
    params = tiny_params()
    params["zoo"]["archs"]["mlp"].update(n_train=8, epochs=40)
    params["zoo"]["chunk_size"] = 2
    del params["zoo"]["archs"]["cnn"]
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [
        sys.executable,
        "-m",
        "flows.zoo",
        "--params",
        "params.yaml",
        "--out",
        "zoo",
        "--metrics",
        "zoo.json",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        cmd, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while len(list((workdir / "zoo" / "mlp").glob("net-*.pt"))) < 2 and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = sorted((workdir / "zoo" / "mlp").glob("net-*.pt"))
    assert 2 <= len(kept) < 12 and not list((workdir / "zoo" / "mlp").glob(".*.tmp"))
    done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((workdir / "zoo.json").read_text())["mlp"]
    assert metrics["n_networks"] == 12 and metrics["trained_this_run"] == 12 - len(kept)


def _fetched_urls(page: str) -> list[str]:
    """What a browser would load from elsewhere: src/href and CSS url() not inline or local."""
    links = re.findall(r"""(?:src|href)\s*=\s*["']?([^"' >]+)""", page)
    links += re.findall(r"""url\(\s*["']?([^"')]+)""", page)
    return [u for u in links if not u.startswith(("data:", "#"))]


def test_report_renders_self_contained_html(workdir):
    from flows.report import STAGE, report

    _run_chain(workdir)
    paths = STAGE.paths(workdir)
    headline = report(paths)["headline"]
    assert set(headline) == {"mlp", "cnn"} and 0 < headline["mlp"]["acc"] <= 1
    page_path = paths.out
    page = page_path.read_text()
    assert page.count("data:image/png;base64,") == 2
    assert _fetched_urls(page) == []
    assert _fetched_urls('<img src="https://x.org/a.png"><p style="background:url(b.png)">') == [
        "https://x.org/a.png",
        "b.png",
    ]  # twin: the check sees what a browser would fetch
    assert "weight_matching" in page and "Model zoo" in page
    assert page.count("Lowest loss barrier: <b>") == 2  # the winner, per architecture
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no headless Chromium here (CI installs it)")
    shot = workdir / "report.png"
    _chromium(chromium, workdir, f"--screenshot={shot}", "--window-size=1200,2000", page_path)
    pixels = plt.imread(shot)
    assert pixels.shape[0] == 2000 and pixels.std() > 0.05  # something was drawn
    assert _overflow(chromium, workdir, page) <= 0  # fits a 1366-pixel laptop screen
    assert _overflow(chromium, workdir, page, 390) <= 0  # and a phone: tables scroll inside
    wide = page.replace("</body>", "<div style='min-width:3000px'>x</div></body>")
    assert _overflow(chromium, workdir, wide) > 0  # twin: a wide block would scroll
    bare = page.replace('<div class="scroll">', "<div>").replace('name="viewport"', "")
    assert _overflow(chromium, workdir, bare, 390) > 0  # twin: without them a phone scrolls


def test_resnets_flow_resumes_and_its_results_join_the_report(workdir):
    from flows import report, resnets, resnets_learned

    paths = resnets.STAGE.paths(workdir)
    metrics = resnets.resnets(paths, **configs(resnets.resnets))["metrics"]
    assert metrics["zoo"]["trained_this_run"] == 9  # 4 train, 2 val, 3 test
    assert set(metrics["bn_reset"]) == {"naive", "weight_matching", "activation_matching"}
    assert set(metrics["bn_kept"]) == set(metrics["bn_reset"])
    assert set(metrics["loss_barrier_over_naive"]) == {"weight_matching", "activation_matching"}
    assert set(metrics["curves"]) == {"naive", "weight_matching"}
    assert (workdir / "figures" / "resnets" / "interpolation_resnet.png").is_file()
    assert (workdir / "plots" / "resnets" / "curves" / "curves_resnet.csv").is_file()
    nested = mlflow.search_runs(experiment_names=["deepalign"], filter_string="tags.arch='resnet'")
    assert len(nested) == 3
    again = resnets.resnets(paths, **configs(resnets.resnets))["metrics"]
    assert again["zoo"]["trained_this_run"] == 0  # resumed: the zoo is reused
    for method, found in again["bn_reset"].items():  # same networks, same alignments
        assert found["loss_barrier_mean"] == metrics["bn_reset"][method]["loss_barrier_mean"]

    # DEEP-ALIGN trained on the zoo's train networks, scored on its test pairs
    learned_paths = resnets_learned.STAGE.paths(workdir)
    run = resnets_learned.resnets_learned
    learned = run(learned_paths, **configs(run))["metrics"]
    assert set(learned["lines"]) == set(tiny_params()["resnets_learned"]["methods"])
    assert "deep_align - weight_matching" in learned["compare"]
    assert (
        torch.load(workdir / "resnets_aligner" / "aligner.pt", weights_only=True)["encoder"]
        == "spec"
    )
    assert 0.0 <= learned["aligner"]["test_planted_recovery_augmented"] <= 1.0

    _run_chain(workdir)
    report.report(report.STAGE.paths(workdir))
    page = report.STAGE.paths(workdir).out.read_text()
    assert "ResNets with BatchNorm" in page and page.count("data:image/png;base64,") == 5
    assert "DEEP-ALIGN on the ResNets" in page


def test_ood_and_merge_flows_score_shifted_zoos_and_join_the_report(workdir):
    from flows import merge, ood, report

    _run_chain(workdir)  # the default zoo's aligner, which the ood stage applies unchanged
    found = ood.ood(ood.STAGE.paths(workdir), **configs(ood.ood))["metrics"]
    assert found["arch"] == "mlp" and set(found["zoos"]) == {"rotated", "sgd"}
    for name, zoo in found["zoos"].items():
        assert zoo["zoo"]["trained_this_run"] == 3
        assert set(zoo["methods"]) == {"naive", "deep_align"}
        assert (workdir / "plots" / "ood" / f"interpolation_{name}.csv").is_file()
    rotated = load_zoo(workdir / "ood" / "rotated")
    plain = load_zoo(workdir / "ood" / "sgd")
    assert not torch.equal(rotated.nets.flatten(), plain.nets.flatten())
    again = ood.ood(ood.STAGE.paths(workdir), **configs(ood.ood))["metrics"]
    assert again["zoos"]["sgd"]["zoo"]["trained_this_run"] == 0  # resumed
    nested = mlflow.search_runs(experiment_names=["deepalign"], filter_string="tags.stage='ood'")
    assert {"rotated", "sgd"} <= set(nested["tags.arch"].dropna())

    merged = merge.merge(merge.STAGE.paths(workdir), **configs(merge.merge))["metrics"]
    assert set(merged) == {"mlp", "resnet"}
    for arch, found in merged.items():
        sides = found["sides"]
        assert sides["a"]["n_networks"] == sides["b"]["n_networks"] == 2
        assert sides["a"]["train_images"] < 0.6 * len(load_dataset_of(workdir).train.y)
        assert load_zoo(workdir / "merge" / arch / "a").arch.has_batchnorm == (arch == "resnet")
        for values in found["methods"].values():
            assert 0 <= values["merged_acc"] <= 1 and 0 <= values["best_lambda"] <= 1
            ends = max(values["a_acc"], values["b_acc"])  # the line's ends, without BatchNorm
            assert arch == "resnet" or values["best_line_acc"] >= ends - 1e-6
        assert (workdir / "plots" / "merge" / f"interpolation_{arch}.csv").is_file()

    report.report(report.STAGE.paths(workdir))
    page = report.STAGE.paths(workdir).out.read_text()
    assert "Out of distribution" in page and "Merging networks trained on disjoint" in page
    assert "ResNets with BatchNorm, statistics recomputed" in page
    assert "paper, rotated CIFAR10 CNNs" in page  # the paper's reading beside the table


def test_inr_flow_fits_siren_zoos_trains_their_aligners_and_joins_the_report(workdir):
    from deepalign.evaluation.report import render_html
    from flows import inr

    found = inr.inr(inr.STAGE.paths(workdir), **configs(inr.inr))["metrics"]
    assert set(found) == {"sine", "digits"}
    for name, kind in found.items():
        assert kind["zoo"]["trained_this_run"] == 10 and kind["zoo"]["test_acc_mean"] <= 1
        assert set(kind["methods"]) == {
            "naive",
            "weight_matching",
            "deep_align",
            "deep_align+sinkhorn",
        }
        assert set(kind["converge"]) == {
            "target_loss_barrier",
            "identity",
            "weight_matching",
            "deep_align",
        }
        assert (workdir / "inr" / name / "aligner.pt").is_file()
        assert (workdir / "plots" / "inr" / "converge" / f"converge_{name}.csv").is_file()
        assert (workdir / "figures" / "inr" / f"interpolation_{name}.png").is_file()
        zoo = load_zoo(workdir / "inr" / name)
        assert zoo.pairs("test", 2) == [(6, 7), (8, 9)]
    again = inr.inr(inr.STAGE.paths(workdir), **configs(inr.inr))["metrics"]
    assert again["sine"]["zoo"]["trained_this_run"] == 0  # resumed
    nested = mlflow.search_runs(experiment_names=["deepalign"], filter_string="tags.stage='inr'")
    assert {"sine", "digits"} <= set(nested["tags.arch"].dropna())
    page = render_html({"inr": found}, workdir / "figures")  # the report's INR section
    assert "Implicit neural representations" in page and 'alt="converge_sine.png"' in page


def load_dataset_of(workdir: Path):
    from deepalign.config import build
    from deepalign.core.data import DataCfg, load_dataset

    return load_dataset(build(DataCfg, tiny_params()["data"], "data"))


def _chromium(chromium: str, workdir: Path, *args) -> str:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    done = subprocess.run(
        [
            chromium,
            *flags,
            "--no-first-run",
            f"--user-data-dir={workdir / 'chrome'}",
            *map(str, args),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.stdout


def _overflow(chromium: str, workdir: Path, page: str, width: int = 1366) -> int:
    """How many pixels the page is wider than a `width`-pixel window (its horizontal scroll)."""
    probe = "<script>document.title = document.documentElement.scrollWidth - innerWidth</script>"
    path = workdir / "probe.html"
    path.write_text(page.replace("</body>", probe + "</body>"))
    dom = _chromium(chromium, workdir, "--dump-dom", f"--window-size={width},800", path.as_uri())
    return int(re.search(r"<title>(-?\d+)</title>", dom).group(1))


def test_quality_flows_train_and_score_each_variant_and_width(workdir):
    from flows import coupling, report, semi_amortised, widths, widths_wide

    _run_chain(workdir)  # the default zoo, whose aligner recipe the experiments vary
    found = coupling.coupling(coupling.STAGE.paths(workdir), **configs(coupling.coupling))
    scores = found["metrics"]
    assert set(scores) == {"default", "coupling"} and set(scores["coupling"]) == {"0"}
    one = scores["coupling"]["0"]
    assert set(one["methods"]) == {"weight_matching", "deep_align", "deep_align+sinkhorn@1"}
    assert one["methods"]["weight_matching"]["loss_barrier_over_weight_matching"] == 1.0
    interval = one["compare"]["deep_align - weight_matching"]
    assert interval["ci_low"] <= interval["mean_diff"] <= interval["ci_high"]
    saved = torch.load(workdir / "quality" / "coupling" / "coupling-seed0.pt", weights_only=True)
    assert saved["model"]["coupling"] == 2 and "mixing" in saved["state_dict"]
    default = torch.load(workdir / "quality" / "coupling" / "default-seed0.pt", weights_only=True)
    assert default["model"]["coupling"] == 0 and "mixing" not in default["state_dict"]

    semi = semi_amortised.semi_amortised(
        semi_amortised.STAGE.paths(workdir), **configs(semi_amortised.semi_amortised)
    )["metrics"]
    assert set(semi) == {"semi_amortised"}
    assert semi["semi_amortised"]["0"]["aligner"]["best_epoch"] == 0  # its own epochs: 1

    wide = widths.widths(widths.STAGE.paths(workdir), **configs(widths.widths))["metrics"]
    assert set(wide) == {"w6"} and wide["w6"]["zoo"]["trained_this_run"] == 6
    assert load_zoo(workdir / "quality" / "widths" / "w6").arch.spec.sizes["h0"] == 6
    assert set(wide["w6"]["variants"]) == {"short"}
    widest = widths_wide.widths_wide(
        widths_wide.STAGE.paths(workdir), **configs(widths_wide.widths_wide)
    )["metrics"]
    assert set(widest) == {"w7"} and (workdir / "quality" / "widths_wide" / "w7").is_dir()
    query = "tags.stage='widths' and tags.arch='w6-short-seed0'"
    nested = mlflow.search_runs(experiment_names=["deepalign"], filter_string=query)
    assert len(nested) == 3  # one per method of the one aligner

    report.report(report.STAGE.paths(workdir))  # the experiments' table joins the report
    page = report.STAGE.paths(workdir).out.read_text()
    assert "DEEP-ALIGN&#x27;s one pass" in page or "DEEP-ALIGN's one pass" in page
    for row in ("default seed 0", "coupling seed 0", "semi_amortised seed 0", "short w6 seed 0"):
        assert f"<th>{row}</th>" in page
