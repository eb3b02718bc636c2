"""INRs: SIREN chains, their symmetries, signals, the regression task loss, and INR zoos."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import r2_score

from deepalign.core.chain import OMEGA_0, mlp_arch, sine_canonical
from deepalign.core.data import Split
from deepalign.core.lmc import evaluate_networks
from deepalign.core.permspec import apply_permutation, random_permutation
from deepalign.core.signals import SignalsCfg, digits_arrays, inr_dataset, sine_signals
from deepalign.core.task import example_losses, scores, task_loss
from deepalign.core.weightspace import stack
from deepalign.errors import DeepAlignError
from deepalign.methods import Problem, align_all
from deepalign.methods.deep_align.augment import check_rescalable, rescale_units
from deepalign.methods.deep_align.train import partners_of, views_of
from deepalign.zoo.build import init_network, train_batched, train_one, train_zoo
from deepalign.zoo.store import load_zoo
from tests.configs import net_cfg

SIREN = mlp_arch(2, [16, 12], 1, "sine")
RELU = mlp_arch(2, [16, 12], 1, "relu")


def sines(views=2, seed=0, points=32):
    return SignalsCfg("sine", points, [0.5, 10.0], views, seed)


def siren_net(**changes):
    recipe = {"n_train": 4, "n_val": 2, "n_test": 4, "epochs": 30, "batch_size": 32, "lr": 1e-3}
    return net_cfg("siren", hidden=[16, 12], **(recipe | changes))


def scaled_output(arch, x):
    """A network's outputs before and after scaling every hidden unit of group h0 by 2."""
    ws = stack([init_network(arch, 0)])
    scales = {"h0": torch.full((1, 16), 2.0), "h1": torch.ones(1, 12)}
    before = arch.forward_batched(ws, x)
    tensors = dict(ws.named)
    tensors["0.weight"], tensors["0.bias"] = 2 * tensors["0.weight"], 2 * tensors["0.bias"]
    tensors["2.weight"] = tensors["2.weight"] / 2
    return before, arch.forward_batched(ws.replace(tensors.values()), x), ws, scales


def test_a_siren_refuses_relu_rescaling_which_would_change_its_function():
    x = torch.rand(20, 2) * 2 - 1
    before, after, ws, scales = scaled_output(SIREN, x)
    assert (before - after).abs().max() > 1e-2  # the rescaling is no symmetry of a SIREN
    with pytest.raises(DeepAlignError, match=r"augment.rescale: .*sine.* set it to 0"):
        check_rescalable(SIREN)
    with pytest.raises(DeepAlignError, match="augment.rescale"):
        rescale_units(ws, SIREN, scales)
    # twin: a ReLU network keeps its function and is let through
    before, after, ws, scales = scaled_output(RELU, x)
    torch.testing.assert_close(before, after)
    check_rescalable(RELU)
    rescale_units(ws, RELU, scales)


def test_siren_initialisation_bounds_and_sine_activation():
    ws = init_network(SIREN, 3)
    w0, w1, w2 = (ws.named[f"{i}.weight"] for i in (0, 2, 4))
    assert w0.abs().max() <= 1 / 2 and w0.abs().max() > 0.4  # U(-1/in, 1/in), in = 2
    bound = math.sqrt(6 / 16) / OMEGA_0
    assert w1.abs().max() <= bound and w1.abs().max() > 0.8 * bound
    assert w2.abs().max() <= math.sqrt(6 / 12) / OMEGA_0
    model = SIREN.build()
    model.load_state_dict(SIREN.state_dict(ws))
    x = torch.rand(5, 2)
    expected = F.linear(torch.sin(OMEGA_0 * F.linear(x, w0, ws.named["0.bias"])), w1, None)
    hidden = model[:3](x) - ws.named["2.bias"]
    torch.testing.assert_close(hidden, expected)
    assert SIREN.traced.spec.groups == ("h0", "h1")  # sin passes its units through


def symmetric_copy(ws, seed):
    """`ws` (batched) with random sign flips and 2 pi / omega shifts of every sine unit."""
    gen = torch.Generator().manual_seed(seed)
    t = dict(ws.named)
    for i, after in ((0, 2), (2, 4)):
        n = t[f"{i}.bias"].shape[-1]
        sign = torch.where(torch.rand(1, n, generator=gen) < 0.5, -1.0, 1.0)
        shift = torch.randint(-3, 4, (1, n), generator=gen) * 2 * math.pi / OMEGA_0
        t[f"{i}.weight"] = t[f"{i}.weight"] * sign[..., None]
        t[f"{i}.bias"] = sign * (t[f"{i}.bias"] + shift)
        t[f"{after}.weight"] = t[f"{after}.weight"] * sign[:, None, :]
    return ws.replace(t.values())


def test_canonical_form_keeps_the_function_and_undoes_sign_and_phase_symmetries():
    ws = stack([init_network(SIREN, s) for s in range(3)])
    x = torch.rand(50, 2) * 2 - 1
    canon = sine_canonical(SIREN, ws)
    torch.testing.assert_close(SIREN.forward_batched(canon, x), SIREN.forward_batched(ws, x))
    for i in (0, 2):
        phase = OMEGA_0 * canon.named[f"{i}.bias"]
        assert phase.min() >= 0 and phase.max() <= math.pi + 1e-5
    moved = symmetric_copy(ws, seed=1)
    torch.testing.assert_close(
        SIREN.forward_batched(moved, x), SIREN.forward_batched(ws, x), atol=1e-4, rtol=1e-4
    )
    assert not torch.allclose(moved.flatten(), ws.flatten())
    torch.testing.assert_close(
        sine_canonical(SIREN, moved).flatten(), canon.flatten(), atol=1e-5, rtol=0
    )
    # twin: flipping a unit's incoming weights alone is no symmetry
    t = dict(ws.named)
    t["0.weight"] = t["0.weight"].clone()
    t["0.weight"][:, 0] *= -1
    broken = ws.replace(t.values())
    assert (SIREN.forward_batched(broken, x) - SIREN.forward_batched(ws, x)).abs().max() > 1e-3


def test_weight_matching_recovers_a_permutation_hidden_behind_sine_symmetries():
    ws = stack([init_network(SIREN, 7)])
    gen = torch.Generator().manual_seed(0)
    perm = random_permutation(SIREN.spec, gen)
    other = apply_permutation(symmetric_copy(ws, seed=2)[0], perm, SIREN.spec)
    methods = _methods()
    canon_ref, canon_other = sine_canonical(SIREN, ws)[0], sine_canonical(SIREN, stack([other]))[0]
    found = align_all("weight_matching", [Problem.of(canon_ref, canon_other, SIREN)], methods)[0]
    aligned = apply_permutation(canon_other, found.perm, SIREN.spec)
    torch.testing.assert_close(aligned.flatten(), canon_ref.flatten(), atol=1e-5, rtol=0)
    # twin: without the canonical form the same pair does not line up
    raw = align_all("weight_matching", [Problem.of(ws[0], other, SIREN)], methods)[0]
    unaligned = apply_permutation(other, raw.perm, SIREN.spec)
    assert not torch.allclose(unaligned.flatten(), ws[0].flatten(), atol=1e-3)


def _methods():
    from deepalign.config import load_section
    from deepalign.evaluation.experiment import AlignCfg

    return load_section("align", AlignCfg, allow_extra=True)


def test_sine_signals_and_digit_signals():
    coords, values = sine_signals(sines(points=9), 3)
    assert coords.shape == (9, 1) and values.shape == (3, 9, 1)
    x = math.pi * coords[:, 0]
    a = torch.asin(values[:, 5, 0]) / x[5]  # x[5] = pi / 4: within asin's branch for a < 2
    for s in range(3):
        freq = values[s, :, 0]
        best = min(
            (torch.sin(k * x) - freq).abs().max().item() for k in torch.linspace(0.5, 10, 9501)
        )
        assert best < 2e-3  # every signal is some sin(a x) with a in [0.5, 10]
    assert a.shape == (3,)
    data = inr_dataset(SignalsCfg("digits", 64, [0.5, 10.0], 2, 0), networks=6)
    images, _ = digits_arrays()
    y = data.train.y  # (6, 64, 1): networks 2s and 2s + 1 fit signal s
    assert y.shape == (6, 64, 1) and data.train.task == "regress" and data.n_classes == 1
    torch.testing.assert_close(y[0], y[1])
    assert not torch.equal(y[1], y[2])
    flat = torch.as_tensor(images.reshape(len(images), -1) / 16.0, dtype=torch.float32)
    assert (flat == y[0, :, 0]).all(1).any()  # a digit image, pixel for pixel
    coords = data.train.x
    assert coords.shape == (64, 2) and coords[1, 1] > coords[0, 1] and coords[8, 0] > coords[0, 0]
    with pytest.raises(DeepAlignError, match="views: 4 .* divisor of the zoo.s 6"):
        inr_dataset(sines(views=4), networks=6)
    with pytest.raises(DeepAlignError, match="views"):
        sines(views=1)


def test_task_losses_match_torch_and_sklearn():
    out, y = torch.randn(3, 10, 1), torch.randn(3, 10, 1)
    losses = example_losses(out, y, "regress")
    torch.testing.assert_close(losses.mean(1), ((out - y) ** 2).mean((1, 2)))
    torch.testing.assert_close(task_loss(out, y, "regress", "mean"), F.mse_loss(out, y))
    r2 = scores(Split(torch.zeros(10, 1), y, "regress"), losses.mean(1))
    for k in range(3):
        assert r2[k].item() == pytest.approx(r2_score(y[k, :, 0], out[k, :, 0]), abs=1e-5)
    logits, labels = torch.randn(2, 7, 4), torch.randint(4, (7,))
    torch.testing.assert_close(
        task_loss(logits, labels, "classify", "mean"),
        F.cross_entropy(logits.flatten(0, 1), labels.repeat(2)),
    )


def test_evaluating_networks_on_their_own_targets_equals_one_at_a_time():
    data = inr_dataset(sines(points=16), networks=4)
    arch = mlp_arch(1, [16, 12], 1, "sine")
    nets = stack([init_network(arch, s) for s in range(4)])
    loss, r2 = evaluate_networks(arch, nets, data.test, chunk=3)
    for k in range(4):
        one, one_r2 = evaluate_networks(arch, nets[k : k + 1], data.test.of_networks(k))
        assert loss[k].item() == pytest.approx(one.item(), rel=1e-5)
        assert r2[k].item() == pytest.approx(one_r2.item(), rel=1e-5)
    # twin: judged against another network's signal, the loss differs
    wrong, _ = evaluate_networks(arch, nets[:1], data.test.of_networks(2))
    assert wrong.item() != pytest.approx(loss[0].item(), rel=1e-3)


def test_batched_inr_fits_equal_fits_one_by_one():
    arch = mlp_arch(1, [16, 12], 1, "sine")
    data = inr_dataset(sines(points=16), networks=4).train
    net = siren_net(epochs=3, batch_size=8)
    seeds = [5, 6]
    ws = stack([init_network(arch, s) for s in seeds])
    batched = train_batched(
        arch, ws, data.of_networks([1, 2]), net, seeds, torch.device("cpu"), False
    )
    for b, (i, s) in enumerate(zip((1, 2), seeds)):
        alone = train_one(arch, ws[b], data.of_networks(i), net, s)
        torch.testing.assert_close(batched[b].flatten(), alone.flatten(), atol=1e-5, rtol=1e-4)


def test_an_inr_zoo_pairs_two_fits_of_one_signal(tmp_path):
    signals = sines(points=32)
    net = siren_net(n_train=4, n_val=2, n_test=4, epochs=40)
    data = inr_dataset(signals, networks=10)
    records, trained = train_zoo(tmp_path, "sine", net, 0, (data, signals), views=2)
    assert trained == 10 and [r["signal"] for r in records] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    zoo = load_zoo(tmp_path, data)
    assert zoo.pairs("test", 5) == [(6, 7), (8, 9)]  # never a fit of another signal
    assert records[0]["test_loss"] < 0.5 * data.test.y[0].var().item()  # it fits its signal
    phase = OMEGA_0 * zoo.nets.named["0.bias"]
    assert phase.min() >= 0 and phase.max() <= math.pi + 1e-5  # stored in canonical form
    again, retrained = train_zoo(tmp_path, "sine", net, 0, (data, signals), views=2)
    assert retrained == 0


def test_deep_align_partners_are_fits_of_the_anchor_signal():
    gen = torch.Generator().manual_seed(0)
    anchors = torch.randint(12, (200,), generator=gen)
    partners = partners_of(anchors, 12, 3, gen)
    assert (partners != anchors).all() and (partners // 3 == anchors // 3).all()
    anyone = partners_of(anchors, 12, 0, gen)
    assert (anyone != anchors).all() and (anyone // 3 != anchors // 3).any()
    assert views_of(torch.tensor([0, 0, 1, 1])) == 2 and views_of(None) == 0
    with pytest.raises(DeepAlignError, match="consecutive views"):
        views_of(torch.tensor([0, 1, 0, 1]))


def test_inr_pairs_stack_their_own_signals_and_align_together_as_alone():
    arch = mlp_arch(1, [16, 12], 1, "sine")
    data = inr_dataset(sines(points=16), networks=4).train
    nets = stack([init_network(arch, s) for s in range(4)])
    problems = [Problem.of(nets[i], nets[i + 1], arch, data.of_networks(i)) for i in (0, 2)]
    stacked = Problem.stack(problems)
    assert stacked.data.y.shape == (2, 16, 1)
    torch.testing.assert_close(stacked.data.y[1], data.y[2])
    methods = _methods()
    methods = dataclasses.replace(methods, sinkhorn=dataclasses.replace(methods.sinkhorn, steps=3))
    together = align_all("sinkhorn", problems, methods)
    alone = [align_all("sinkhorn", [p], methods)[0] for p in problems]
    for t, a in zip(together, alone):
        assert all(torch.equal(t.perm[g], a.perm[g]) for g in a.perm)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p["aligner"]["augment"].update(rescale=0.1), "aligner.augment.rescale: 0.1"),
        (
            lambda p: p["zoos"]["sine"]["net"].update(kind="mlp", activation="relu"),
            "net.kind: 'mlp'",
        ),
        (lambda p: p["zoos"]["sine"]["net"].update(n_test=3), "net.n_test: 3 .* multiple of views"),
        (lambda p: p["zoos"]["digits"]["signals"].update(views=1), "views: 1 .* >= 2"),
        (
            lambda p: p["zoos"]["digits"]["net"].update(n_train=4000),
            r"net.n_train: 4000 .* 1797 digit images",
        ),
    ],
)
def test_bad_inr_settings_are_one_line_naming_the_key(change, message):
    from deepalign.config import build, read_params
    from deepalign.evaluation.inr import InrCfg

    params = read_params()["inr"]
    change(params)
    with pytest.raises(DeepAlignError, match=message) as found:
        build(InrCfg, params, "params.yaml: inr")
    assert "\n" not in str(found.value)


def test_a_digit_zoo_may_use_every_digit_image_but_no_more():
    from deepalign.config import build, read_params
    from deepalign.evaluation.inr import InrCfg

    params = read_params()["inr"]
    net = params["zoos"]["digits"]["net"]
    net.update(n_train=2 * 1797 - net["n_val"] - net["n_test"])  # every image, two views each
    assert build(InrCfg, params, "inr").zoos["digits"].networks == 2 * 1797
    net.update(n_train=net["n_train"] + 2)  # one signal more
    with pytest.raises(DeepAlignError, match="net.n_train"):
        build(InrCfg, params, "inr")
