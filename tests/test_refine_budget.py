"""A refinement budget in the method name ('deep_align+sinkhorn@10'), and the evaluate stage's
gap closed and barrier-against-seconds curve."""

import csv
import importlib
import re
from dataclasses import replace

import pytest
import torch

import deepalign
from deepalign.core.chain import mlp_arch
from deepalign.errors import DeepAlignError
from deepalign.evaluation.experiment import AlignCfg, gap_closed, refine_budget
from deepalign.evaluation.report import render_html
from deepalign.methods import Method, MethodsCfg, Problem, align, align_all, check_methods
from deepalign.methods.activation_matching import ActivationMatchingCfg
from deepalign.methods.learned import DeepAlignCfg
from deepalign.methods.sinkhorn import SinkhornCfg
from deepalign.methods.ste import SteCfg
from deepalign.methods.weight_matching import WeightMatchingCfg
from deepalign.settings import load_settings
from deepalign.zoo.build import init_network
from tests.tiny import ROOT

SINKHORN = importlib.import_module("deepalign.methods.sinkhorn")  # the package's `sinkhorn`
# attribute is the projection function, not this module
STEPS = 4  # align.sinkhorn.steps of CFG
CFG = MethodsCfg(
    weight_matching=WeightMatchingCfg(max_iter=20, restarts=0, seed=0),
    activation_matching=ActivationMatchingCfg("correlation", 256, 0),
    ste=SteCfg("midpoint", steps=3, lr=1e-3, batch_size=64, wm_max_iter=20, seed=0),
    sinkhorn=SinkhornCfg(
        "l2", STEPS, 0.1, 1.0, iterations=10, init_scale=1.0, batch_size=64, seed=0, scores_lr=1.0
    ),
    deep_align=DeepAlignCfg(checkpoints=[]),
)


@pytest.fixture
def pair() -> Problem:
    arch = mlp_arch(16, [8, 6], 4, "relu")
    return Problem.of(init_network(arch, 0), init_network(arch, 1), arch)


@pytest.fixture
def counted(monkeypatch) -> list[int]:
    """Every Sinkhorn re-basin step taken, one entry each."""
    step, calls = SINKHORN.sinkhorn_step, []

    def counting(*args, **kwargs):
        calls.append(1)
        return step(*args, **kwargs)

    monkeypatch.setattr(SINKHORN, "sinkhorn_step", counting)
    return calls


def test_a_step_count_after_at_replaces_that_steps_settings_only():
    method = Method.parse("sinkhorn@10")
    assert method.steps == ("sinkhorn",) and method.budgets == (10,)
    assert method.settings(CFG) == {"sinkhorn": replace(CFG.sinkhorn, steps=10)}
    assert Method.parse("sinkhorn").settings(CFG) == {"sinkhorn": CFG.sinkhorn}  # twin
    chain = Method.parse("deep_align+sinkhorn@10")
    assert chain.steps == ("deep_align", "sinkhorn") and chain.iterative
    assert chain.settings(CFG)["deep_align"] is CFG.deep_align
    assert chain.rest() == Method("sinkhorn@10", ("sinkhorn",), (10,))
    assert Method.parse("ste@7").settings(CFG)["ste"].steps == 7
    check_methods("methods", ["deep_align+sinkhorn@5", "weight_matching+ste@2"])


def test_the_projects_method_lists_still_load():
    align_cfg = load_settings(ROOT / "params.yaml").section("align", AlignCfg)
    assert "deep_align+sinkhorn@10" in align_cfg.methods


@pytest.mark.parametrize(
    "name, why",
    [
        ("deep_align@3", "deep_align takes no '@k'"),
        ("weight_matching@3+sinkhorn", "weight_matching takes no '@k'"),
        ("sinkhorn@0", "'@0' is not a step count"),
        ("sinkhorn@x", "'@x' is not a step count"),
        ("sinkhorn@", "'@' is not a step count"),
        ("sinkhorn@-2", "'@-2' is not a step count"),
        ("sinkhorn@07", "'@07' is not a step count"),
        ("deep_align+sinkhorn@1@2", "'@1@2' is not a step count"),
        ("sinkhorn@1000000", "'@1000000' is not a step count"),
    ],
)
def test_a_bad_step_count_is_one_line_naming_the_method_and_who_takes_one(name, why):
    with pytest.raises(DeepAlignError) as refused:
        Method.parse(name)
    line = str(refused.value)
    assert "\n" not in line and f"method '{name}'" in line and why in line
    assert "ste, sinkhorn" in line
    with pytest.raises(DeepAlignError, match=re.escape(f"methods: '{name}' is not allowed")):
        check_methods("methods", [name])  # a params list names its key


def test_an_unknown_aligner_with_a_step_count_is_still_unknown():
    with pytest.raises(DeepAlignError, match="unknown method 'sinkorn'"):
        Method.parse("sinkorn@5")


@pytest.mark.parametrize("method, steps", [("sinkhorn@2", 2), ("weight_matching+sinkhorn@3", 3)])
def test_sinkhorn_at_k_runs_exactly_k_steps(pair, counted, method, steps):
    align(method, pair, CFG)
    assert len(counted) == steps
    counted.clear()
    align("sinkhorn", pair, CFG)
    assert len(counted) == STEPS  # twin: without '@k', the settings' step count


def test_sinkhorn_at_its_configured_steps_is_plain_sinkhorn_bit_for_bit(pair):
    plain, budgeted = (align_all(m, [pair, pair], CFG) for m in ("sinkhorn", f"sinkhorn@{STEPS}"))
    for a, b in zip(plain, budgeted):
        assert all(torch.equal(a.perm[g], b.perm[g]) for g in a.perm)
        assert a.objective == b.objective


def test_the_api_takes_a_step_count(counted):
    def net(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.ReLU(), torch.nn.Linear(8, 10))

    ref, other = net(0), net(1)
    aligned = deepalign.align(ref, other, method="weight_matching+sinkhorn@2", data="digits")
    x = torch.randn(3, 64)
    assert torch.allclose(aligned(x), other(x), atol=1e-5) and len(counted) == 2


def test_gap_closed_on_hand_made_barriers():
    barriers = {"naive": 2.0, "weight_matching": 0.2, "deep_align": 0.15, "da+s": 0.05}
    gaps = gap_closed({m: {"loss_barrier_mean": b} for m, b in barriers.items()})
    assert gaps == pytest.approx(
        {"naive": -12.0, "weight_matching": 0.0, "deep_align": 1 / 3, "da+s": 1.0}
    )


def test_gap_closed_is_undefined_where_weight_matching_is_best_or_missing():
    best = {"naive": {"loss_barrier_mean": 2.0}, "weight_matching": {"loss_barrier_mean": 0.1}}
    assert gap_closed(best) == {}
    assert gap_closed({"naive": {"loss_barrier_mean": 2.0}}) == {}
    tied = best | {"sinkhorn": {"loss_barrier_mean": 0.1}}
    assert gap_closed(tied) == {}  # no gap to close: not a division by zero


def test_the_budget_curve_holds_deep_align_and_its_sinkhorn_refinements():
    budgets = {
        m: refine_budget(m, CFG)
        for m in (
            "deep_align",
            "deep_align+sinkhorn@10",
            "deep_align+sinkhorn",
            "sinkhorn",
            "weight_matching+sinkhorn",
            "deep_align+weight_matching",
            "deep_align+sinkhorn+sinkhorn",
        )
    }
    assert budgets == {
        "deep_align": 0,
        "deep_align+sinkhorn@10": 10,
        "deep_align+sinkhorn": STEPS,
        "sinkhorn": None,
        "weight_matching+sinkhorn": None,
        "deep_align+weight_matching": None,
        "deep_align+sinkhorn+sinkhorn": None,
    }


def test_the_report_shows_gap_closed_beside_the_barriers(tmp_path):
    methods = {
        "weight_matching": {"loss_barrier_mean": 0.2, "gap_closed": 0.0},
        "deep_align": {"loss_barrier_mean": 0.15, "gap_closed": 1 / 3},
        "naive": {"loss_barrier_mean": 2.5},  # none: a blank cell
    }
    page = render_html({"evaluate": {"mlp": methods}}, tmp_path)
    assert "<th>gap closed</th>" in page and "<td>0.333</td></tr>" in page
    naive = page.split("<th>naive</th>")[1].split("</tr>")[0]
    assert naive.endswith("<td></td>") and "<td>2.500</td>" in naive  # undefined: left blank


def test_the_evaluate_stage_writes_the_budget_csv_and_its_figure(tmp_path):
    from flows.evaluate import STAGE, write_budget

    methods = ["naive", "deep_align", "deep_align+sinkhorn@2", "deep_align+sinkhorn"]
    cfg = AlignCfg(
        **vars(CFG),
        archs=["mlp", "cnn"],
        methods=methods,
        pairs=2,
        planted_pairs=1,
        planted_noise=0.01,
        seed=0,
    )
    summary = {
        arch: {
            m: {"loss_barrier_mean": b, "seconds_per_pair_mean": s}
            for m, b, s in zip(cfg.methods, [2.0, 0.2, 0.1, 0.05], [1e-5, 1e-3, 0.01, 0.1])
        }
        for arch in ("mlp", "cnn")
    }
    io = STAGE.paths(tmp_path)
    write_budget(io, summary, cfg)
    with io.budget.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["arch", "method", "k", "seconds_per_pair", "loss_barrier"]
    assert [(r["method"], r["k"]) for r in rows if r["arch"] == "cnn"] == [
        ("naive", ""),
        ("deep_align", "0"),
        ("deep_align+sinkhorn@2", "2"),
        ("deep_align+sinkhorn", str(STEPS)),
    ]
    assert io.tradeoff.read_bytes().startswith(b"\x89PNG")
    assert io.budget.parent == io.metrics.parent  # timings: beside the metrics, not in plots/


@pytest.mark.parametrize("start, expected", [("scores", 0.7), ("perm", 0.1), (None, 0.1)])
def test_a_start_from_scores_steps_at_scores_lr_and_any_other_at_lr(
    pair, monkeypatch, start, expected
):
    from deepalign.core.assignment import Answer

    step, rates = SINKHORN.sinkhorn_step, []

    def recording(logits, state, loss, lr, *args, **kwargs):
        rates.append(lr)
        return step(logits, state, loss, lr, *args, **kwargs)

    monkeypatch.setattr(SINKHORN, "sinkhorn_step", recording)
    cfg = replace(CFG.sinkhorn, lr=0.1, scores_lr=0.7)
    sizes = pair.arch.spec.sizes
    init = {
        "scores": Answer(scores={g: torch.randn(n, n) for g, n in sizes.items()}),
        "perm": Answer(hard={g: torch.randperm(n) for g, n in sizes.items()}),
        None: None,
    }[start]
    SINKHORN.sinkhorn_rebasin(pair, cfg, init)
    assert rates == [expected] * STEPS
