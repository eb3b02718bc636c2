"""Sinkhorn re-basin from three starts: trajectories, the summary, the rows of a tiny zoo."""

from dataclasses import replace

import pytest
import torch

from deepalign.core.assignment import Answer
from deepalign.core.chain import mlp_arch
from deepalign.core.lmc import barriers, interpolate
from deepalign.core.permspec import apply_permutation, random_permutation
from deepalign.core.weightspace import stack
from deepalign.errors import DeepAlignError
from deepalign.evaluation.convergence import (
    ConvergeCfg,
    refine_rows,
    summarize_convergence,
    summarize_layers,
)
from deepalign.methods import MethodsCfg, Problem
from deepalign.methods.activation_matching import ActivationMatchingCfg
from deepalign.methods.deep_align.checkpoint import predict, save_aligner
from deepalign.methods.deep_align.model import ModelCfg, aligner_for
from deepalign.methods.learned import DeepAlignCfg, deep_align_batch
from deepalign.methods.sinkhorn import SinkhornCfg, sinkhorn_rebasin, sinkhorn_trajectory
from deepalign.methods.ste import SteCfg
from deepalign.methods.weight_matching import WeightMatchingCfg
from deepalign.zoo.build import init_network, train_batched
from deepalign.zoo.store import Zoo
from tests.configs import net_cfg

ARCH = mlp_arch(64, [12, 10], 10, "relu")
SINKHORN = SinkhornCfg("l2", 12, 0.1, 1.0, 20, 1.0, 64, 0, 0.1)


def test_trajectory_ends_where_sinkhorn_rebasin_ends():
    ref, other = init_network(ARCH, 0), init_network(ARCH, 1)
    problem = Problem.of(ref, other, ARCH)
    marks = sinkhorn_trajectory([problem], SINKHORN, [None], [0, 3, 12])
    assert [k for k, _, _ in marks] == [0, 3, 12]
    final = sinkhorn_rebasin(problem, SINKHORN).perm
    assert all(torch.equal(marks[-1][1][0][g], final[g]) for g in final)
    short = sinkhorn_rebasin(problem, replace(SINKHORN, steps=3)).perm
    assert all(torch.equal(marks[1][1][0][g], short[g]) for g in short)
    # step 0 is the start itself: zero logits harden to the identity, a permutation to itself
    assert all(torch.equal(p, torch.arange(len(p))) for p in marks[0][1][0].values())
    perm = random_permutation(ARCH.spec, torch.Generator().manual_seed(3))
    started = sinkhorn_trajectory([problem], SINKHORN, [Answer(hard=perm)], [0])[0][1][0]
    assert all(torch.equal(started[g], perm[g]) for g in perm)
    assert not all(torch.equal(started[g], marks[0][1][0][g]) for g in perm)  # twin


def _row(start: str, steps: int, barrier: float, seconds: float) -> dict:
    return {"method": start, "steps": steps, "loss_barrier": barrier, "seconds": seconds}


def test_summary_counts_steps_and_seconds_to_the_identity_starts_final_barrier():
    rows = [
        *(_row("identity", k, b, s) for k, b, s in [(0, 2.0, 0), (10, 0.5, 1), (100, 0.2, 9)]),
        *(
            _row("weight_matching", k, b, s)
            for k, b, s in [(0, 0.3, 1), (10, 0.6, 2), (100, 0.3, 8)]
        ),
        *(
            _row("deep_align", k, b, s)
            for k, b, s in [(0, 0.25, 0.1), (10, 0.19, 1.1), (100, 0.1, 9)]
        ),
    ]
    summary = summarize_convergence(rows, [0, 10, 100], 100)
    assert summary["target_loss_barrier"]["value"] == 0.2
    assert summary["identity"]["steps_to_target"] == 100 and summary["identity"]["reached"]
    assert summary["deep_align"]["steps_to_target"] == 10
    assert summary["deep_align"]["seconds_to_target"] == 1.1
    assert not summary["weight_matching"]["reached"]  # never at or below 0.2
    with pytest.raises(DeepAlignError, match="align.sinkhorn.steps"):
        summarize_convergence(rows, [0, 10, 100], 50)


@pytest.fixture
def tiny(tmp_path, digits):
    net = net_cfg("mlp", hidden=[12, 10], n_train=0, n_test=6, epochs=3, batch_size=32)
    start = stack([init_network(ARCH, s) for s in range(6)])
    nets = train_batched(ARCH, start, digits.train, net, list(range(6)), torch.device("cpu"), False)
    records = [{"split": "test"}] * 6
    torch.manual_seed(0)
    model = aligner_for(
        ARCH, ModelCfg(8, 1, 2, 8, 10.0, 1, "auto", 0), ARCH.shapes(), torch.ones(len(ARCH.keys()))
    )
    save_aligner(tmp_path / "mlp.pt", model, ARCH, {})
    methods = MethodsCfg(
        WeightMatchingCfg(100, 0, 0),
        ActivationMatchingCfg("correlation", 256, 0),
        SteCfg("midpoint", 2, 1e-3, 64, 10, 0),
        replace(SINKHORN, loss="random_lambda"),
        DeepAlignCfg([str(tmp_path / "mlp.pt")]),
    )
    return Zoo(ARCH, records, nets), model, methods


def test_refine_rows_start_where_each_start_puts_them(tiny, digits):
    zoo, model, methods = tiny
    cfg = ConvergeCfg(["mlp"], 2, [0, 4], 5)
    rows, layers = refine_rows("mlp", zoo, digits, methods, cfg)
    assert len(rows) == 3 * 2 * 2
    at_zero = {(r["method"], r["pair"]): r["loss_barrier"] for r in rows if r["steps"] == 0}
    da = predict(model, zoo.nets[torch.tensor([0, 1])], zoo.nets[torch.tensor([1, 2])])
    for k, (i, j) in enumerate([(0, 1), (1, 2)]):
        naive = barriers(interpolate(ARCH, zoo.nets[i], zoo.nets[j], digits.test, 5))
        assert at_zero[("identity", k)] == pytest.approx(naive["loss_barrier"], abs=1e-6)
        aligned = apply_permutation(zoo.nets[j], {g: p[k] for g, p in da.items()}, ARCH.spec)
        learned = barriers(interpolate(ARCH, zoo.nets[i], aligned, digits.test, 5))
        assert at_zero[("deep_align", k)] == pytest.approx(learned["loss_barrier"], abs=1e-6)
    assert at_zero[("identity", 0)] > 0.1  # trained networks: unaligned, a real barrier
    # twin: the learned start is not the identity start (so the barrier check above has teeth)
    assert any(not torch.equal(p[0], torch.arange(p.shape[1])) for p in da.values())


def test_layer_rows_score_deep_aligns_permutation_with_one_group_refined(tiny, digits):
    zoo, _, methods = tiny
    cfg = ConvergeCfg(["mlp"], 2, [0, 4], 5)
    rows, layers = refine_rows("mlp", zoo, digits, methods, cfg)
    assert sorted((r["pair"], r["group"]) for r in layers) == [
        (k, g) for k in (0, 1) for g in ("h0", "h1")
    ]
    sinkhorn = replace(methods.sinkhorn, steps=4)
    for k, (i, j) in enumerate([(0, 1), (1, 2)]):
        scores = deep_align_batch(
            ARCH, zoo.nets[i : i + 1], zoo.nets[j : j + 1], methods.deep_align
        )
        problem = Problem.of(zoo.nets[i], zoo.nets[j], ARCH, digits.train)
        start = Answer(scores={g: s[0] for g, s in scores.items()})
        marks = sinkhorn_trajectory([problem], sinkhorn, [start], [0, 4])  # this pair alone
        own, refined = marks[0][1][0], marks[-1][1][0]
        for r in (r for r in layers if r["pair"] == k):
            g = r["group"]
            assert r["agreement"] == pytest.approx((own[g] == refined[g]).double().mean().item())
            mixed = apply_permutation(zoo.nets[j], own | {g: refined[g]}, ARCH.spec)
            expected = barriers(interpolate(ARCH, zoo.nets[i], mixed, digits.test, 5))
            assert r["loss_barrier_group_refined"] == pytest.approx(
                expected["loss_barrier"], abs=1e-6
            )
    summary = summarize_layers(layers)
    assert set(summary) == {"h0", "h1"}
    h0 = [r["agreement"] for r in layers if r["group"] == "h0"]
    assert summary["h0"]["agreement"] == pytest.approx(sum(h0) / 2)
