"""DEEP-ALIGN's quality experiments: pair-aware coupling keeps the logits equivariant in both
networks and transposed under a swap on the five architectures of the spec-encoder battery (a
coupling that breaks the symmetry fails the same check) and starts as the encoder alone;
semi-amortised training's unrolled steps are Sinkhorn re-basin's Adam steps and pass gradients
back to the predicted logits; aligner files keep the coupling; the experiments' settings refuse
what they cannot score."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from deepalign.config import build
from deepalign.core.assignment import sinkhorn_groups
from deepalign.core.chain import mlp_arch
from deepalign.core.data import Split
from deepalign.core.permspec import apply_permutation, apply_soft_permutation, random_permutation
from deepalign.core.rebasin import adam_state, lerp_task_loss, sinkhorn_step
from deepalign.errors import DeepAlignError
from deepalign.evaluation.quality import QualityCfg, Variant
from deepalign.methods.deep_align import model as model_module
from deepalign.methods.deep_align.checkpoint import load_aligner, save_aligner
from deepalign.methods.deep_align.model import ModelCfg, aligner_for
from deepalign.methods.deep_align.train import Pair, unrolled
from tests.test_deep_align import batch_of as chain_batch
from tests.test_deep_align import small_cfg
from tests.test_spec_encoder import NETWORKS, batch_of

COUPLED = ModelCfg(8, 1, 2, 8, 10.0, 0, "auto", 2)


def coupled_model(arch, ws, mixing: float = 1.0):
    """A fresh aligner with two coupling rounds, its mixing weights set (0 at the start)."""
    torch.manual_seed(0)
    shapes = {k: tuple(t.shape[1:]) for k, t in ws.named.items()}
    model = aligner_for(arch, COUPLED, shapes, torch.ones(len(shapes)))
    with torch.no_grad():
        model.mixing.fill_(mixing)
    return model.eval()


def rows(logits, perm):  # logits (B, n, n), perm (B, n): row i becomes row perm[i]
    return torch.gather(logits, 1, perm.unsqueeze(-1).expand_as(logits))


def columns(logits, perm):  # column j becomes column perm[j]
    return torch.gather(logits, 2, perm.unsqueeze(1).expand_as(logits))


def coupled_logits_are_equivariant(name: str) -> bool:
    """Permuting ref permutes the logits' rows, permuting other their columns, and swapping
    the networks transposes them (within float tolerance)."""
    arch, ref = batch_of(name)
    _, other = batch_of(name, seeds=(2, 3))
    model = coupled_model(arch, ref)
    gen = torch.Generator().manual_seed(5)
    p, q = (random_permutation(arch.spec, gen, batch=2) for _ in range(2))
    with torch.no_grad():
        base = model(ref, other)
        moved_ref = model(apply_permutation(ref, p, arch.spec), other)
        moved_other = model(ref, apply_permutation(other, q, arch.spec))
        swapped = model(other, ref)
    close = lambda a, b: torch.allclose(a, b, atol=1e-4, rtol=1e-4)  # noqa: E731
    return all(
        close(moved_ref[g], rows(base[g], p[g]))
        and close(moved_other[g], columns(base[g], q[g]))
        and close(swapped[g], base[g].mT)
        for g in model.groups
    )


@pytest.mark.parametrize("name", list(NETWORKS))
def test_coupled_logits_move_with_either_network_and_transpose_under_a_swap(name):
    assert coupled_logits_are_equivariant(name)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_a_coupling_that_favours_positions_breaks_it(monkeypatch, name):
    """The twin: a score that grows with the column index is no longer equivariant."""
    standardised = model_module._standardised
    monkeypatch.setattr(
        model_module,
        "_standardised",
        lambda s: standardised(s) + torch.arange(s.shape[-1], dtype=torch.float32),
    )
    assert not coupled_logits_are_equivariant(name)


def test_coupling_starts_as_the_encoder_alone_and_moves_the_logits_once_mixed():
    arch, ref = batch_of("resnet_bn")
    _, other = batch_of("resnet_bn", seeds=(2, 3))
    shapes = {k: tuple(t.shape[1:]) for k, t in ref.named.items()}
    torch.manual_seed(0)
    plain = aligner_for(
        arch, dataclasses.replace(COUPLED, coupling=0), shapes, torch.ones(len(shapes))
    )
    coupled = coupled_model(arch, ref, mixing=0.0)
    with torch.no_grad():
        before, at_start = plain(ref, other), coupled(ref, other)
        coupled.mixing.fill_(1.0)
        mixed = coupled(ref, other)
    assert all(torch.equal(before[g], at_start[g]) for g in plain.groups)
    assert not any(torch.allclose(before[g], mixed[g], atol=1e-3) for g in plain.groups)


def test_an_aligner_file_keeps_its_coupling(tmp_path):
    arch, ref = batch_of("mlp")
    _, other = batch_of("mlp", seeds=(2, 3))
    model = coupled_model(arch, ref, mixing=0.7)
    save_aligner(tmp_path / "a.pt", model, arch, {})
    loaded, _, _ = load_aligner(tmp_path / "a.pt")
    assert loaded.cfg.coupling == 2
    with torch.no_grad():
        a, b = model(ref, other), loaded(ref, other)
    assert all(torch.equal(a[g], b[g]) for g in model.groups)


def pair_of(digits):
    arch = mlp_arch(64, [12, 10], 10, "relu")
    return arch, Pair(arch, chain_batch(arch, 3, 0), chain_batch(arch, 3, 10), digits.train)


def test_unrolled_steps_are_sinkhorn_rebasins_and_pass_gradients_back(digits):
    arch, pair = pair_of(digits)
    cfg = dataclasses.replace(small_cfg(1), unroll_steps=3, unroll_lr=0.1, images_per_step=32)
    logits = {g: torch.randn(3, n, n, requires_grad=True) for g, n in arch.spec.sizes.items()}
    refined = unrolled(logits, pair, cfg, torch.Generator().manual_seed(0))

    # the same steps without a graph: Adam on the random-lambda task loss through Sinkhorn
    gen, groups = torch.Generator().manual_seed(0), list(logits)
    values = [lg.detach() for lg in logits.values()]
    state = adam_state(values)
    for _ in range(3):
        lam = torch.rand(3, generator=gen)
        idx = torch.randint(pair.data.size, (32,), generator=gen)
        batch = Split(*pair.data.examples(idx))

        def loss(soft, part, batch=batch, lam=lam):
            aligned = apply_soft_permutation(pair.other, dict(zip(groups, soft)), arch.spec)
            return lerp_task_loss(arch, pair.ref, aligned, batch, lam)

        values, state = sinkhorn_step(values, state, loss, 0.1, cfg.sinkhorn_iterations, cfg.tau)
    for g, v in zip(groups, values):
        assert torch.allclose(refined[g], v, atol=1e-5)
        assert not torch.allclose(refined[g], logits[g], atol=1e-2)  # the steps moved them

    soft = sinkhorn_groups(refined, cfg.sinkhorn_iterations, cfg.tau)
    aligned = apply_soft_permutation(pair.other, soft, arch.spec)
    lerp_task_loss(
        arch, pair.ref, aligned, Split(*pair.data.examples(slice(0, 64))), 0.5
    ).backward()
    grads = [logits[g].grad for g in groups]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_no_unrolled_steps_leave_the_logits_as_they_are(digits):
    arch, pair = pair_of(digits)
    logits = {g: torch.randn(3, n, n) for g, n in arch.spec.sizes.items()}
    cfg = small_cfg(1)
    assert cfg.unroll_steps == 0
    out = unrolled(logits, pair, cfg, torch.Generator().manual_seed(0))
    assert all(out[g] is logits[g] for g in logits)


def quality_section(**changes) -> dict:
    section = {
        "arch": "mlp",
        "seeds": [0, 1],
        "variants": {"default": {"coupling": 0, "unroll_steps": 0, "epochs": 0}},
        "stages": {"coupling": ["default"]},
        "widths": {"coupling": [64]},
        "width_seed": 1,
        "methods": ["weight_matching", "deep_align"],
        "pairs": 4,
        "points": 5,
        "bootstrap": 10,
    }
    return section | changes


def test_the_experiments_settings_refuse_what_they_cannot_score():
    build(QualityCfg, quality_section(), "quality")
    with pytest.raises(DeepAlignError, match=r"quality\.methods: .*deep_align"):
        build(QualityCfg, quality_section(methods=["weight_matching"]), "quality")
    with pytest.raises(DeepAlignError, match=r"quality\.stages\.coupling: .*coupling\?"):
        build(QualityCfg, quality_section(stages={"coupling": ["coupling"]}), "quality")
    with pytest.raises(DeepAlignError, match=r"quality\.widths\.wide: .*a stage of"):
        build(QualityCfg, quality_section(widths={"wide": [64]}), "quality")
    with pytest.raises(DeepAlignError, match=r"quality\.variants\.default: missing key"):
        variants = {"default": {"coupling": 0, "epochs": 0}}
        build(QualityCfg, quality_section(variants=variants), "quality")


def test_a_variant_changes_only_what_it_names():
    recipe = small_cfg(7)
    kept = Variant(coupling=0, unroll_steps=0, epochs=0).applied(recipe, seed=3)
    assert kept == dataclasses.replace(recipe, seed=3)
    changed = Variant(coupling=2, unroll_steps=5, epochs=30).applied(recipe, seed=1)
    assert (changed.model.coupling, changed.unroll_steps, changed.epochs) == (2, 5, 30)
    assert changed.model.dim == recipe.model.dim and changed.lr == recipe.lr
