"""DEEP-ALIGN: equivariance, swap symmetry, augmentations, training smoke test, registry."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from deepalign.core.arch import as_input
from deepalign.core.chain import cnn_arch, forward, mlp_arch
from deepalign.core.lmc import recovery
from deepalign.core.permspec import (
    apply_permutation,
    compose,
    invert,
    random_permutation,
)
from deepalign.core.weightspace import stack
from deepalign.errors import DeepAlignError
from deepalign.methods import MethodsCfg, Problem, align
from deepalign.methods.deep_align.augment import AugmentCfg, augment, rescale_units
from deepalign.methods.deep_align.checkpoint import (
    load_aligner,
    predict,
    save_aligner,
    spec_fit,
)
from deepalign.methods.deep_align.model import ModelCfg, aligner_for
from deepalign.methods.deep_align.train import AlignerCfg, LossCfg, train, validate
from deepalign.methods.learned import DeepAlignCfg
from deepalign.methods.sinkhorn import SinkhornCfg
from deepalign.zoo.build import init_network, make_arch, train_batched
from deepalign.zoo.store import Zoo
from tests.configs import net_cfg

MODEL = ModelCfg(16, 1, 2, 16, 10.0, 1, "auto", 0)
ARCHS = {
    "mlp": mlp_arch(64, [12, 10, 8], 10, "relu"),
    "cnn": cnn_arch((1, 8, 8), [4, 6, 5], [1, 2, 2], 10, "relu"),
}


def batch_of(arch, n=4, start=0):
    return stack([init_network(arch, s) for s in range(start, start + n)])


def model_for(arch):
    torch.manual_seed(0)
    return aligner_for(arch, MODEL, arch.shapes(), torch.ones(len(arch.keys())))


def gather_rows(feat, perm):  # feat (B, n, D), perm (B, n) -> feat[b, perm[b]]
    return torch.gather(feat, 1, perm.unsqueeze(-1).expand_as(feat))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_encoder_is_equivariant(kind):
    arch = ARCHS[kind]
    ws = batch_of(arch)
    model = model_for(arch)
    perm = random_permutation(arch.spec, torch.Generator().manual_seed(1), batch=4)
    feats, permuted = model.features(ws), model.features(apply_permutation(ws, perm, arch.spec))
    for g, f, fp in zip(model.groups, feats, permuted):
        assert torch.allclose(fp, gather_rows(f, perm[g]), atol=1e-5)
        assert not torch.allclose(fp, f, atol=1e-3)  # negative twin: features do move


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_aligner_is_equivariant_in_both_inputs_and_swap_symmetric(kind):
    arch = ARCHS[kind]
    ref, other = batch_of(arch, 3, 0), batch_of(arch, 3, 10)
    model = model_for(arch)
    gen = torch.Generator().manual_seed(2)
    g_ref, g_other = (random_permutation(arch.spec, gen, batch=3) for _ in range(2))
    base = predict(model, ref, other)
    moved_ref = predict(model, apply_permutation(ref, g_ref, arch.spec), other)
    moved_other = predict(model, ref, apply_permutation(other, g_other, arch.spec))
    for g in model.groups:
        assert torch.equal(moved_ref[g], compose(base, g_ref)[g])
        assert torch.equal(moved_other[g], compose(invert(g_other), base)[g])
    logits, swapped = model(ref, other), model(other, ref)
    assert all(torch.allclose(swapped[g], logits[g].mT) for g in model.groups)
    assert not torch.equal(moved_ref[model.groups[0]], base[model.groups[0]])


@pytest.mark.parametrize(
    ("kind", "activation"),
    [("mlp", "relu"), ("cnn", "relu"), ("mlp", "leaky_relu"), ("cnn", "leaky_relu")],
)
def test_positive_rescaling_preserves_function_where_the_activation_allows(kind, activation):
    arch = mlp_arch(64, [12, 10, 8], 10, activation)
    if kind == "cnn":
        arch = cnn_arch((1, 8, 8), [4, 6, 5], [1, 2, 2], 10, activation)
    ws = batch_of(arch, 2)
    gen = torch.Generator().manual_seed(3)
    scales = {g: 0.5 + torch.rand(2, n, generator=gen) for g, n in arch.spec.sizes.items()}
    scaled = rescale_units(ws, arch, scales)
    x = torch.randn(8, *arch.input_shape, generator=gen)
    for b in range(2):
        assert torch.allclose(forward(arch, scaled[b], x), forward(arch, ws[b], x), atol=1e-5)
    w = ws.named["0.weight"]  # negative twin: scale incoming weights only
    broken = ws.with_tensors({"0.weight": w * scales["h0"].view(2, -1, *[1] * (w.ndim - 2))})
    assert not torch.allclose(forward(arch, broken[0], x), forward(arch, ws[0], x), atol=1e-3)


@pytest.mark.parametrize("activation", ["tanh", "gelu", "silu", "sigmoid"])
def test_positive_rescaling_is_refused_where_it_changes_the_function(activation):
    arch = mlp_arch(64, [12, 10], 10, activation)
    ws = batch_of(arch, 2)
    scales = {g: torch.full((2, n), 1.5) for g, n in arch.spec.sizes.items()}
    with pytest.raises(DeepAlignError, match=rf"augment.rescale: .*\({activation}\).*set it to 0"):
        rescale_units(ws, arch, scales)
    # the refusal is right: done anyway, the rescaling changes what the network computes
    spec, x = arch.spec, torch.randn(8, 64)
    scaled = dict(ws.named)
    for g, s in scales.items():
        for key, axis, _, _ in spec.acting(g):
            shape = [2] + [1] * (scaled[key].ndim - 1)
            shape[axis + 1] = -1
            scaled[key] = scaled[key] * (s if axis == 0 else 1 / s).view(shape)
    changed = ws.replace(scaled.values())
    assert not torch.allclose(forward(arch, changed[0], x), forward(arch, ws[0], x), atol=1e-3)
    # with no rescaling asked for, augmenting such a network still works
    augment(ws, arch, AugmentCfg(0.01, 0.0, 0.0, 0.0), torch.Generator().manual_seed(0))


def test_augment_changes_weights_mildly():
    arch = ARCHS["mlp"]
    ws = batch_of(arch, 2)
    aug = augment(ws, arch, AugmentCfg(0.01, 0.05, 0.1, 0.1), torch.Generator().manual_seed(0))
    rel = (aug.flatten() - ws.flatten()).norm(dim=1) / ws.flatten().norm(dim=1)
    assert ((rel > 0.01) & (rel < 0.6)).all()


def small_cfg(epochs: int) -> AlignerCfg:
    return AlignerCfg(
        archs=["mlp"],
        device="cpu",
        seed=0,
        epochs=epochs,
        pairs_per_step=8,
        lr=3e-3,
        lr_schedule="cosine",
        ema=0.9,
        weight_decay=0.0,
        grad_clip=1.0,
        sinkhorn_iterations=10,
        tau=1.0,
        unroll_steps=0,
        unroll_lr=0.1,
        images_per_step=64,
        val_every=epochs,
        val_pairs=4,
        val_points=5,
        val_bn_images=64,
        model=MODEL,
        augment=AugmentCfg(0.01, 0.05, 0.1, 0.0),
        loss=LossCfg(1.0, 0.2, 1.0, [0.0, 1.0]),
    )


@pytest.fixture(scope="module")
def tiny_zoo(digits):
    net = net_cfg("mlp", hidden=[16, 16], n_train=16, n_val=4, n_test=4, epochs=5)
    arch = make_arch(net, digits)
    seeds = list(range(24))
    nets = train_batched(
        arch,
        stack([init_network(arch, s) for s in seeds]),
        digits.train,
        net,
        seeds,
        torch.device("cpu"),
        progress=False,
    )
    records = [{"split": "train"}] * 16 + [{"split": "val"}] * 4 + [{"split": "test"}] * 4
    return Zoo(arch, records, nets)


def test_tiny_training_recovers_planted_permutations(tmp_path, tiny_zoo, digits):
    torch.manual_seed(0)
    cfg = small_cfg(epochs=30)
    history = []
    model, run = train(
        tiny_zoo,
        digits,
        cfg,
        torch.device("cpu"),
        tmp_path / "state.pt",
        "fp",
        on_epoch=lambda e, m, _: history.append(m["supervised"]),
        progress=False,
    )
    assert history[-1] < 0.5 * history[0]
    metrics = validate(model, tiny_zoo, digits, cfg, torch.device("cpu"))
    assert metrics["val_planted_recovery"] >= 0.95  # chance is 1/16
    assert run["best_epoch"] == 29 and (tmp_path / "state.pt").is_file()

    epochs_run = []
    resumed, again = train(
        tiny_zoo,
        digits,
        cfg,
        torch.device("cpu"),
        tmp_path / "state.pt",
        "fp",
        on_epoch=lambda e, m, _: epochs_run.append(e),
        progress=False,
    )
    assert epochs_run == [] and again["best_val_loss_barrier"] == run["best_val_loss_barrier"]
    assert again["train_seconds"] == 0.0 < run["train_seconds"]  # nothing retrained this call

    path = tmp_path / "aligner.pt"
    save_aligner(path, model, tiny_zoo.arch, {"note": "test"})
    loaded, fit, meta = load_aligner(path)
    test = tiny_zoo.nets[torch.tensor([20, 21])]
    other = tiny_zoo.nets[torch.tensor([22, 23])]
    assert fit == spec_fit(tiny_zoo.arch) and meta == {"note": "test"}
    assert fit.description == tiny_zoo.arch.describe()
    first, second = predict(model, test, other), predict(loaded, test, other)
    assert all(torch.equal(first[g], second[g]) for g in first)

    methods = MethodsCfg(None, None, None, None, DeepAlignCfg([str(path)]))
    problem = Problem.of(tiny_zoo.nets[20], tiny_zoo.nets[22], tiny_zoo.arch)
    perm = align("deep_align", problem, methods).perm
    x = as_input(tiny_zoo.arch, digits.test.x)
    spec = tiny_zoo.arch.spec
    out = forward(tiny_zoo.arch, apply_permutation(tiny_zoo.nets[22], perm, spec), x)
    assert torch.allclose(out, forward(tiny_zoo.arch, tiny_zoo.nets[22], x), atol=1e-5)
    planted = random_permutation(spec, torch.Generator().manual_seed(5))
    copy = apply_permutation(tiny_zoo.nets[20], planted, spec)
    found = align("deep_align", Problem.of(tiny_zoo.nets[20], copy, tiny_zoo.arch), methods).perm
    assert recovery(found, invert(planted)) >= 0.95

    steps0 = SinkhornCfg("l2", 0, 0.1, 1.0, 20, 1.0, 64, 0, 0.1)  # no step: Hungarian on the scores
    refine = MethodsCfg(None, None, None, steps0, DeepAlignCfg([str(path)]))
    assert all(
        torch.equal(align("deep_align+sinkhorn", problem, refine).perm[g], perm[g]) for g in perm
    )
    refine = MethodsCfg(None, None, None, replace(steps0, steps=5), DeepAlignCfg([str(path)]))
    refined = align("deep_align+sinkhorn", problem, refine).perm
    out = forward(tiny_zoo.arch, apply_permutation(tiny_zoo.nets[22], refined, spec), x)
    assert torch.allclose(out, forward(tiny_zoo.arch, tiny_zoo.nets[22], x), atol=1e-5)

    other_arch = mlp_arch(64, [16, 12], 10, "relu")
    wrong = Problem.of(*[init_network(other_arch, s) for s in (0, 1)], other_arch)
    with pytest.raises(DeepAlignError) as refused:  # one line naming both architectures
        align("deep_align", wrong, methods)
    line = str(refused.value)
    assert "\n" not in line
    assert f"no aligner fits {other_arch.describe()}" in line
    assert f"(fits {tiny_zoo.arch.describe()})" in line

    # a folder stands for its aligners (training states skipped); a missing file is skipped
    # while another fits, and named when none does
    (tmp_path / "mlp.state.pt").write_bytes(b"not a checkpoint")
    for entries in ([str(tmp_path)], [str(tmp_path / "cnn.pt"), str(path)]):
        cfg = MethodsCfg(None, None, None, None, DeepAlignCfg(entries))
        assert all(torch.equal(align("deep_align", problem, cfg).perm[g], perm[g]) for g in perm)
    alone = MethodsCfg(None, None, None, None, DeepAlignCfg([str(tmp_path / "cnn.pt")]))
    with pytest.raises(DeepAlignError, match=r"cnn.pt \(missing\)"):
        align("deep_align", problem, alone)


def test_corrupt_aligner_checkpoint_is_named(tmp_path):
    bad = tmp_path / "aligner.pt"
    bad.write_text("nope")
    with pytest.raises(DeepAlignError, match="aligner.pt: not a readable aligner checkpoint"):
        load_aligner(bad)
    with pytest.raises(DeepAlignError, match="no such aligner checkpoint"):
        load_aligner(Path(tmp_path / "missing.pt"))


def sequential_mlp(seed: int) -> torch.nn.Sequential:
    """A module with ARCHS["mlp"]'s layers (64 -> 12 -> 10 -> 8 -> 10, ReLU)."""
    torch.manual_seed(seed)
    nn = torch.nn
    layers = [nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 8)]
    return nn.Sequential(*layers, nn.ReLU(), nn.Linear(8, 10))


def test_the_api_aligns_with_the_aligner_it_is_given(tmp_path):
    """`deepalign.align(..., aligner=file or folder)` uses that aligner: the answer of the
    registered method with that checkpoint, other's function kept; an aligner of other
    weights answers otherwise (so the argument is not ignored)."""
    import deepalign

    arch = ARCHS["mlp"]
    for seed, name in ((0, "a.pt"), (5, "b.pt")):
        torch.manual_seed(seed)
        model = aligner_for(arch, MODEL, arch.shapes(), torch.ones(len(arch.keys())))
        save_aligner(tmp_path / name, model, arch, {})
    ref, other = sequential_mlp(0), sequential_mlp(1)
    x = torch.randn(5, 64)
    got = {}
    for n in "ab":
        got[n] = deepalign.align(ref, other, "deep_align", aligner=tmp_path / f"{n}.pt")
    a, b = (
        arch.weightspace({k: v.detach() for k, v in m.state_dict().items()}) for m in (ref, other)
    )
    problem = Problem.of(a, b, arch)
    cfg = MethodsCfg(None, None, None, None, DeepAlignCfg([str(tmp_path / "a.pt")]))
    want = apply_permutation(problem.other, align("deep_align", problem, cfg).perm, arch.spec)
    assert torch.equal(got["a"][0].weight, want.named[arch.keys()[0]])
    assert torch.allclose(got["a"](x), other(x), atol=1e-5)
    assert not torch.equal(got["a"][0].weight, got["b"][0].weight)
    (tmp_path / "folder").mkdir()
    (tmp_path / "a.pt").rename(tmp_path / "folder" / "a.pt")
    from_folder = deepalign.align(ref, other, "deep_align", aligner=tmp_path / "folder")
    assert torch.equal(from_folder[0].weight, got["a"][0].weight)


@pytest.mark.parametrize("method", ["deep_align", "deep_align+sinkhorn"])
def test_a_learned_method_without_an_aligner_says_how_to_give_one(tmp_path, method):
    import deepalign

    ref, other = sequential_mlp(0), sequential_mlp(1)
    for aligner, looked in ((None, "none configured"), (tmp_path / "gone.pt", "gone.pt")):
        with pytest.raises(DeepAlignError, match="aligner='aligner.pt' in Python") as e:
            deepalign.merge(ref, other, method=method, aligner=aligner)
        assert looked in str(e.value) and "\n" not in str(e.value)
    deepalign.align(ref, other, "weight_matching", aligner=tmp_path / "gone.pt")  # unread


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_training_step_on_cuda_matches_the_cpu(tiny_zoo, digits):
    from deepalign.methods.deep_align.train import build_model, training_step

    cfg, losses = small_cfg(epochs=1), {}
    for name in ("cpu", "cuda"):
        device = torch.device(name)
        torch.manual_seed(0)
        model = build_model(tiny_zoo, cfg.model).to(device)
        nets = tiny_zoo.nets[torch.tensor(tiny_zoo.indices("train"))].to(device)
        data = (digits.train.to(device), 0)
        step = training_step(
            model, tiny_zoo.arch, nets, data, cfg, torch.Generator().manual_seed(0)
        )
        step["loss"].backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(g.device.type == name and g.isfinite().all() for g in grads)
        losses[name] = step["loss"].item()
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-3)
