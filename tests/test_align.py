"""Aligners: planted permutations recovered, function preserved, cross-checks vs brute force."""

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import deepalign.methods as align_module
from deepalign.core.arch import as_input
from deepalign.core.assignment import LARGE, Answer, solve_large_lap
from deepalign.core.chain import forward, mlp_arch
from deepalign.core.data import Split
from deepalign.core.lmc import barriers, interpolate, planted_pair, recovery
from deepalign.core.permspec import apply_permutation, random_permutation
from deepalign.core.weightspace import stack
from deepalign.errors import DeepAlignError
from deepalign.methods import (
    ALIGNERS,
    MethodsCfg,
    Problem,
    align,
    sinkhorn,
    solve_lap,
)
from deepalign.methods.activation_matching import ActivationMatchingCfg
from deepalign.methods.learned import DeepAlignCfg
from deepalign.methods.sinkhorn import SinkhornCfg, _initial_logits
from deepalign.methods.ste import SteCfg
from deepalign.methods.weight_matching import WeightMatchingCfg, objective, weight_matching_trace
from deepalign.zoo.build import init_network, make_arch, train_batched
from tests.configs import net_cfg

CFG = MethodsCfg(
    weight_matching=WeightMatchingCfg(max_iter=100, restarts=0, seed=0),
    activation_matching=ActivationMatchingCfg("correlation", 256, 0),
    ste=SteCfg("midpoint", steps=5, lr=1e-3, batch_size=64, wm_max_iter=20, seed=0),
    sinkhorn=SinkhornCfg(
        "random_lambda",
        steps=5,
        lr=0.1,
        tau=1.0,
        iterations=10,
        init_scale=1.0,
        batch_size=64,
        seed=0,
        scores_lr=0.1,
    ),
    deep_align=DeepAlignCfg(checkpoints=[]),
)


@pytest.fixture(scope="module")
def trained(digits):
    """Two small trained MLPs and two CNNs on digits (a few epochs)."""
    out = {}
    shapes = {"mlp": {"hidden": [16, 12]}, "cnn": {"hidden": [4, 6], "strides": [1, 2]}}
    for kind, shape in shapes.items():
        net = net_cfg(kind, **shape, epochs=4)
        arch = make_arch(net, digits)
        ws = train_batched(
            arch,
            stack([init_network(arch, s) for s in (0, 1)]),
            digits.train,
            net,
            [0, 1],
            torch.device("cpu"),
            progress=False,
        )
        out[kind] = (arch, ws[0], ws[1])
    return out


def small_split(digits, n=256):
    return Split(digits.train.x[:n], digits.train.y[:n])


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_weight_matching_recovers_planted_permutation_exactly(trained, digits, kind):
    arch, ws, _ = trained[kind]
    copy, truth = planted_pair(ws, arch.spec, 0.0, torch.Generator().manual_seed(3))
    found = align("weight_matching", Problem.of(ws, copy, arch), CFG).perm
    assert recovery(found, truth) == 1.0
    aligned = apply_permutation(copy, found, arch.spec)
    assert all(torch.equal(a, b) for a, b in zip(aligned.tensors(), ws.tensors()))
    assert barriers(interpolate(arch, ws, aligned, digits.test, 5))["loss_barrier"] == 0.0


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_activation_matching_recovers_planted_permutation(trained, digits, kind):
    arch, ws, _ = trained[kind]
    copy, truth = planted_pair(ws, arch.spec, 0.0, torch.Generator().manual_seed(4))
    found = align("activation_matching", Problem.of(ws, copy, arch, small_split(digits)), CFG).perm
    assert recovery(found, truth) == 1.0


def test_weight_matching_objective_never_decreases(trained):
    arch, a, b = trained["mlp"]
    cfg = WeightMatchingCfg(max_iter=100, restarts=3, seed=1)
    perm, traces = weight_matching_trace(Problem.of(a, b, arch), cfg)
    for trace in traces:
        assert all(y >= x - 1e-9 for x, y in zip(trace, trace[1:]))
    best = objective(a, apply_permutation(b, perm, arch.spec))
    assert best == pytest.approx(max(t[-1] for t in traces))
    assert best > objective(a, b)  # better than no alignment


def test_weight_matching_restarts_only_when_no_start_is_given(trained):
    arch, a, b = trained["mlp"]
    problem, start = Problem.of(a, b, arch), random_permutation(arch.spec, torch.Generator())
    one, many = (WeightMatchingCfg(max_iter=100, restarts=r, seed=1) for r in (0, 4))
    _, refined = weight_matching_trace(problem, many, start)
    assert len(refined) == 1  # a refinement keeps its start
    _, fresh = weight_matching_trace(problem, many)
    assert len(fresh) == 5  # twin: from scratch, 4 random starts beside the identity
    assert len(weight_matching_trace(problem, one)[1]) == 1


def test_weight_matching_is_exact_for_one_hidden_layer():
    """With one hidden group the LAP is the whole problem: compare with all 6! permutations."""
    arch = mlp_arch(4, [6], 3, "relu")
    a, b = init_network(arch, 0), init_network(arch, 1)
    spec = arch.spec
    found = align("weight_matching", Problem.of(a, b, arch), CFG).perm
    best = max(
        objective(a, apply_permutation(b, {"h0": torch.tensor(p)}, spec))
        for p in itertools.permutations(range(6))
    )
    assert objective(a, apply_permutation(b, found, spec)) == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("n", [2, 4, 6])
def test_lap_matches_brute_force(n):
    score = torch.randn(n, n, generator=torch.Generator().manual_seed(n))
    perm = solve_lap(score)
    brute = max(
        sum(score[i, p[i]].item() for i in range(n)) for p in itertools.permutations(range(n))
    )
    assert sum(score[i, perm[i]].item() for i in range(n)) == pytest.approx(brute)


@pytest.mark.parametrize("n", [2, 5, 7])
def test_large_lap_solver_matches_brute_force(n):
    """lapx's kernel (used from LARGE units) on row-reduced costs finds the best permutation,
    rows on wildly different scales included (reduction keeps float32's precision)."""
    gen = np.random.default_rng(n)
    score = gen.normal(size=(n, n)) * 10.0 ** gen.integers(-3, 4, size=(n, 1)) + 1e5
    cols = solve_large_lap(score)
    best = max(score[range(n), p].sum() for p in itertools.permutations(range(n)))
    assert sorted(cols) == list(range(n))
    assert score[range(n), cols].sum() == pytest.approx(best, rel=1e-12, abs=1e-9)


def test_large_assignments_agree_with_scipy_and_a_worse_one_does_not():
    """From LARGE units `solve_lap` gives scipy's optimum (a planted permutation in noise);
    swapping two of its columns loses objective, so the comparison can fail."""
    n = LARGE
    gen = torch.Generator().manual_seed(0)
    score = torch.randn(n, n, generator=gen, dtype=torch.float64) * 0.5
    score[torch.arange(n), torch.randperm(n, generator=gen)] += 1.0
    found = solve_lap(score).numpy()
    _, exact = linear_sum_assignment(score.numpy(), maximize=True)
    value = score.numpy()[range(n), found].sum()
    assert value == pytest.approx(score.numpy()[range(n), exact].sum(), rel=1e-12)
    worse = found.copy()
    worse[[0, 1]] = worse[[1, 0]]
    assert score.numpy()[range(n), worse].sum() < value


@pytest.mark.parametrize(
    "method",
    [
        *(m for m in ALIGNERS if m != "deep_align"),
        "weight_matching+sinkhorn",
        "weight_matching+ste",
    ],
)  # deep_align needs a trained checkpoint: tests/test_deep_align.py
def test_aligned_network_computes_the_same_function(trained, digits, method):
    arch, a, b = trained["mlp"]
    result = align(method, Problem.of(a, b, arch, small_split(digits)), CFG)
    aligned = apply_permutation(b, result.perm, arch.spec)
    x = as_input(arch, digits.test.x)
    assert (forward(arch, aligned, x) - forward(arch, b, x)).abs().max() <= 1e-5
    if method == "naive":
        assert all(torch.equal(p, torch.arange(len(p))) for p in result.perm.values())
        return
    moved = {g: p for g, p in result.perm.items() if not torch.equal(p, torch.arange(len(p)))}
    assert moved, f"{method} left every unit where it was"
    # twin: the same units moved in the first layer's rows but not in the next layer's columns
    g, p = next(iter(moved.items()))
    w, bias = (f"{arch.param_indices[int(g[1:])]}.{n}" for n in ("weight", "bias"))
    broken = b.with_tensors({w: b.named[w][p], bias: b.named[bias][p]})
    assert (forward(arch, broken, x) - forward(arch, b, x)).abs().max() > 1e-2


@pytest.mark.parametrize(
    "method", ["weight_matching", "activation_matching", "weight_matching+sinkhorn"]
)
def test_alignment_lowers_the_barrier(trained, digits, method):
    arch, a, b = trained["mlp"]
    problem = Problem.of(a, b, arch, small_split(digits))
    naive = barriers(interpolate(arch, a, b, digits.test))["loss_barrier"]
    perm = align(method, problem, CFG).perm
    found = barriers(interpolate(arch, a, apply_permutation(b, perm, arch.spec), digits.test))
    assert found["loss_barrier"] < 0.5 * naive


def test_sinkhorn_marginals_and_swap_symmetry():
    logits = torch.randn(3, 7, 7, generator=torch.Generator().manual_seed(0)) * 3
    p = sinkhorn(logits, iterations=300)
    assert torch.allclose(p.sum(-1), torch.ones(3, 7), atol=1e-4)
    assert torch.allclose(p.sum(-2), torch.ones(3, 7), atol=1e-4)
    assert torch.allclose(sinkhorn(logits.mT, 300), p.mT, atol=1e-6)
    one_sided = (logits - logits.logsumexp(-1, keepdim=True)).exp()  # rows only: negative twin
    assert not torch.allclose(one_sided.sum(-2), torch.ones(3, 7), atol=1e-2)


def test_sinkhorn_starts_from_scores_as_they_are():
    arch = mlp_arch(3, [5, 4], 2, "relu")
    spec = arch.spec
    problem = Problem(spec, None, None, arch)
    gen = torch.Generator().manual_seed(0)
    scores = {g: torch.randn(n, n, generator=gen) for g, n in spec.sizes.items()}
    perm = random_permutation(spec, gen)
    both = _initial_logits(problem, CFG.sinkhorn, [Answer(scores=scores), None])  # (K, G, n, n)
    from_perm = _initial_logits(problem, replace(CFG.sinkhorn, init_scale=3.0), [Answer(hard=perm)])
    assert torch.equal(both[5][0, 0], scores["h0"])
    assert torch.equal(both[4][0, 0], scores["h1"])
    assert torch.equal(from_perm[5][0, 0], 3.0 * torch.eye(5)[perm["h0"]])
    assert not from_perm[4][0, 0].equal(scores["h1"])  # twin: a permutation is not used as scores
    assert torch.equal(both[4][1, 0], torch.zeros(4, 4))  # the second pair: no start


def test_chain_passes_answers_and_hardens_scores_with_the_hungarian(trained, monkeypatch):
    arch, a, b = trained["mlp"]
    problem = Problem.of(a, b, arch)
    gen = torch.Generator().manual_seed(1)
    scores = {g: torch.randn(n, n, generator=gen) for g, n in problem.spec.sizes.items()}
    seen = {}

    def spy(name):
        def method(problem, cfg, init):
            seen[name] = init
            return init

        return method

    monkeypatch.setitem(ALIGNERS, "first_spy", align_module.Aligner(spy("first")))
    monkeypatch.setitem(
        ALIGNERS,
        "wm_spy",
        align_module.Aligner(
            align_module._from_permutation(lambda problem, cfg, init: seen.setdefault("wm", init))
        ),
    )
    result = align("first_spy+wm_spy", problem, CFG, init=Answer(scores=scores))
    assert all(seen["first"].scores[g] is scores[g] for g in scores)  # scores passed as they are
    assert all(torch.equal(seen["wm"][g], solve_lap(scores[g])) for g in scores)
    assert all(torch.equal(result.perm[g], solve_lap(scores[g])) for g in scores)
    with pytest.raises(DeepAlignError, match="either a permutation or scores"):
        Answer()  # twin: an answer must hold something


def test_different_architectures_name_the_tensor(trained):
    arch, a, _ = trained["mlp"]
    wider = init_network(mlp_arch(64, [16, 13], 10, "relu"), 0)
    with pytest.raises(
        DeepAlignError, match=r"'2.weight': reference \(12, 16\) vs other \(13, 16\)"
    ):
        Problem.of(a, wider, arch)


def test_method_parses_once_and_finds_each_steps_settings():
    chain = align_module.Method.parse("deep_align+sinkhorn")
    assert chain.steps == ("deep_align", "sinkhorn") and chain.rest().steps == ("sinkhorn",)
    assert chain.settings(CFG) == {"deep_align": CFG.deep_align, "sinkhorn": CFG.sinkhorn}
    assert align_module.Method.parse("naive").settings(CFG) == {"naive": None}
    assert align_module.Method.parse("sinkhorn").rest().steps == ("naive",)
    assert align_module.Method.parse("deep_align+sinkhorn").iterative  # slow: runs first
    assert not align_module.Method.parse("deep_align+weight_matching").iterative
    assert align_module.Method.parse(chain) is chain


def test_unknown_method_lists_known():
    with pytest.raises(DeepAlignError, match="unknown method 'wm'.*known: naive, weight_matching"):
        align_module.Method.parse("weight_matching+wm")


def test_data_methods_without_data_say_so(trained):
    arch, a, b = trained["mlp"]
    with pytest.raises(DeepAlignError, match="needs data"):
        align("activation_matching", Problem.of(a, b, arch), CFG)


def test_recovery_counts_units():
    spec = mlp_arch(3, [4, 4], 2, "relu").spec
    truth = random_permutation(spec, torch.Generator().manual_seed(0))
    assert recovery(truth, truth) == 1.0
    swapped = {g: p.clone() for g, p in truth.items()}
    swapped["h0"][[0, 1]] = swapped["h0"][[1, 0]]  # two of eight units wrong
    assert recovery(swapped, truth) == 0.75


@pytest.mark.parametrize("method", ["sinkhorn", "weight_matching+sinkhorn", "ste"])
def test_pairs_aligned_together_get_the_answers_they_get_alone(
    trained, digits, method, monkeypatch
):
    arch, a, b = trained["mlp"]
    data = small_split(digits)
    planted = apply_permutation(
        b, random_permutation(arch.spec, torch.Generator().manual_seed(2)), arch.spec
    )
    problems = [Problem.of(x, y, arch, data) for x, y in ((a, b), (b, a), (a, planted))]
    last = method.split("+")[-1]  # the batched step (how fast it runs: the bench stage's)
    batch, sizes = align_module.ALIGNERS[last].batch, []

    def counted(problems, cfg, inits):
        sizes.append(len(problems))
        return batch(problems, cfg, inits)

    monkeypatch.setitem(
        align_module.ALIGNERS, last, replace(align_module.ALIGNERS[last], batch=counted)
    )
    together = align_module.align_all(method, problems, CFG)
    assert sizes == [3]  # one run for every pair at once
    alone = [align(method, p, CFG) for p in problems]
    for t, s in zip(together, alone):
        assert all(torch.equal(t.perm[g], s.perm[g]) for g in s.perm)
    # twin: answers follow their problems, not their positions in the batch
    backwards = align_module.align_all(method, problems[::-1], CFG)
    assert all(
        torch.equal(x.perm[g], y.perm[g]) for x, y in zip(backwards, together[::-1]) for g in x.perm
    )
    assert not all(torch.equal(together[0].perm[g], together[2].perm[g]) for g in together[0].perm)


@pytest.mark.parametrize("method", ["sinkhorn", "ste"])
def test_pairs_split_into_passes_get_the_answers_of_one_pass(trained, digits, method, monkeypatch):
    import deepalign.core.arch as arch_module

    arch, a, b = trained["cnn"]
    problems = [Problem.of(x, y, arch, small_split(digits)) for x, y in ((a, b), (b, a))]
    one_pass = align_module.align_all(method, problems, CFG)
    monkeypatch.setattr(arch_module, "ACTIVATION_BUDGET", 1)  # one pair per forward pass
    assert arch_module.per_pass(arch, CFG.sinkhorn.batch_size) == 1
    passes = align_module.align_all(method, problems, CFG)
    for x, y in zip(one_pass, passes):
        assert all(torch.equal(x.perm[g], y.perm[g]) for g in x.perm)
