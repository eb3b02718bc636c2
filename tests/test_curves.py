"""Mode-connectivity curves: the midpoint control is the straight line; the ends are the
endpoint networks; the loss is passed in; PAM's history is what its states score."""

import pytest
import torch
import torch.nn.functional as F

from deepalign.core.arch import as_input
from deepalign.core.curves import (
    CurveFitCfg,
    evaluate_curve,
    fit_curve,
    midpoint,
    point,
)
from deepalign.core.data import Split
from deepalign.core.lmc import interpolate
from deepalign.core.permspec import apply_permutation, identity
from deepalign.core.task import example_losses, mean_task_loss
from deepalign.core.weightspace import lerp, stack
from deepalign.errors import DeepAlignError
from deepalign.evaluation.curves import PROBE_POINTS, PamCfg, pam
from deepalign.zoo.build import init_network, make_arch, train_batched
from tests.configs import net_cfg

FIT = CurveFitCfg("bezier", epochs=3, batch_size=64, lr=0.01, seed=0)


@pytest.fixture(scope="module")
def pairs(digits):
    net = net_cfg("mlp", hidden=[16, 16], n_train=4, epochs=4)
    arch = make_arch(net, digits)
    nets = train_batched(
        arch,
        stack([init_network(arch, s) for s in range(4)]),
        digits.train,
        net,
        list(range(4)),
        torch.device("cpu"),
        progress=False,
    )
    return arch, nets[torch.tensor([0, 2])], nets[torch.tensor([1, 3])]


@pytest.fixture(scope="module")
def fitted(pairs, digits):
    arch, a, b = pairs
    return fit_curve(arch, a, b, digits.train, FIT)


def _objective(arch, a, theta, b, split):
    """PAM's objective: mean loss along each Bezier curve on its probe grid, (K,)."""
    return evaluate_curve(arch, "bezier", a, theta, b, split, PROBE_POINTS).loss.mean(1)


def _run_modules(arch, nets, split):
    """Each network run as its own nn.Module (state_dict loaded): mean cross-entropy and
    accuracy on the split, (K,) each, computed apart from the curve code."""
    losses, accs = [], []
    for ws in nets.unbind():
        module = arch.build().eval()
        module.load_state_dict(arch.state_dict(ws))
        with torch.no_grad():
            out = module(as_input(arch, split.x))  # (n, C)
        losses.append(F.cross_entropy(out, split.y))
        accs.append((out.argmax(-1) == split.y).double().mean())
    return torch.stack(losses), torch.stack(accs)


@pytest.mark.parametrize("kind", ["bezier", "polyline"])
def test_midpoint_control_reproduces_linear_interpolation(pairs, digits, kind):
    arch, a, b = pairs
    theta = midpoint(a, b)
    for t in (0.0, 0.25, 0.5, 0.8, 1.0):
        on_curve = point(kind, a, theta, b, torch.full((2,), t))
        line = lerp(a, b, t)
        assert all(
            torch.allclose(x, y, atol=1e-6) for x, y in zip(on_curve.tensors(), line.tensors())
        )
    ev = evaluate_curve(arch, kind, a, theta, b, digits.test, 5)
    linear = interpolate(arch, a[0], b[0], digits.test, 5)
    assert torch.allclose(ev.loss[0].double(), linear.loss.double(), atol=1e-5)
    off = point(kind, a, lerp(a, b, 0.9), b, torch.full((2,), 0.5))  # negative twin
    assert not torch.allclose(off.named["0.weight"], lerp(a, b, 0.5).named["0.weight"], atol=1e-3)


def test_fitting_lowers_the_loss_along_the_curve(pairs, digits, fitted):
    arch, a, b = pairs
    before = _objective(arch, a, midpoint(a, b), b, digits.train)
    after = _objective(arch, a, fitted, b, digits.train)
    assert (after < before).all()


def test_curve_ends_and_middle_are_the_networks_run_directly(pairs, digits, fitted):
    arch, a, b = pairs
    ev = evaluate_curve(arch, "bezier", a, fitted, b, digits.test, 5)  # t = 0, .25, .5, .75, 1
    middle = a.replace(  # phi(1/2) = A/4 + theta/2 + B/4, by hand
        [x / 4 + y / 2 + z / 4 for x, y, z in zip(a.tensors(), fitted.tensors(), b.tensors())]
    )
    for column, nets in ((0, a), (2, middle), (4, b)):
        loss, acc = _run_modules(arch, nets, digits.test)
        assert torch.allclose(ev.loss[:, column].double(), loss.double(), atol=1e-5)
        assert torch.allclose(ev.acc[:, column], acc, atol=1e-9)
    # twin: a wrong endpoint (B perturbed) no longer matches B run directly
    wrong = b.map(
        lambda t: t + 0.3 * torch.randn(t.shape, generator=torch.Generator().manual_seed(0))
    )
    moved = evaluate_curve(arch, "bezier", a, fitted, wrong, digits.test, 5)
    assert not torch.allclose(moved.loss[:, -1], _run_modules(arch, b, digits.test)[0], atol=1e-3)


def test_fit_takes_its_loss_from_the_caller(pairs, digits):
    arch, a, b = pairs
    cfg = CurveFitCfg("bezier", epochs=1, batch_size=64, lr=0.01, seed=0)
    data = Split(digits.train.x[:320], digits.train.y[:320])
    default = fit_curve(arch, a, b, data, cfg)
    same = fit_curve(arch, a, b, data, cfg, loss=mean_task_loss("classify"))
    assert all(torch.equal(x, y) for x, y in zip(default.tensors(), same.tensors()))

    def per_example(out, y):  # (K, n): the same cross-entropy, reduced by the fit
        return example_losses(out, y, "classify")

    close = fit_curve(arch, a, b, data, cfg, loss=per_example)
    assert all(torch.allclose(x, y, atol=1e-4) for x, y in zip(default.tensors(), close.tensors()))

    def smoothed(out, y):  # twin: another loss fits another control point
        return F.cross_entropy(out.flatten(0, 1), y.repeat(len(out)), label_smoothing=0.5)

    other = fit_curve(arch, a, b, data, cfg, loss=smoothed)
    assert max((x - y).abs().max() for x, y in zip(default.tensors(), other.tensors())) > 1e-3


def test_curve_evaluation_takes_any_loss_form(pairs, digits, fitted):
    arch, a, b = pairs
    task = evaluate_curve(arch, "bezier", a, fitted, b, digits.test, 3)
    forms = {
        "example": lambda out, y: example_losses(out, y, "classify"),  # (K, n)
        "network": lambda out, y: example_losses(out, y, "classify").mean(1),  # (K,)
        "mean": mean_task_loss("classify"),  # ()
    }
    for loss in forms.values():
        ev = evaluate_curve(arch, "bezier", a, fitted, b, digits.test, 3, loss=loss)
        assert torch.allclose(ev.loss, task.loss, atol=1e-5)
        assert torch.equal(ev.acc, task.acc)  # the score stays the task's
    squared = evaluate_curve(  # twin: another loss gives other values
        arch, "bezier", a, fitted, b, digits.test, 3, loss=lambda out, y: (out**2).mean((1, 2))
    )
    assert not torch.allclose(squared.loss, task.loss, atol=1e-2)
    with pytest.raises(DeepAlignError, match=r"loss gave shape \(2, \d+, 10\)"):
        evaluate_curve(arch, "bezier", a, fitted, b, digits.test, 3, loss=lambda out, y: out)


def test_regression_curves_fit_the_mse(pairs, digits):
    arch, a, b = pairs
    onehot = F.one_hot(digits.train.y, 10).float()  # (N, 10) targets of a regression
    data = Split(digits.train.x, onehot, "regress")
    cfg = CurveFitCfg("polyline", epochs=2, batch_size=64, lr=0.01, seed=0)
    theta = fit_curve(arch, a, b, data, cfg)  # the split's task: MSE
    before = evaluate_curve(arch, "polyline", a, midpoint(a, b), b, data, 5)
    after = evaluate_curve(arch, "polyline", a, theta, b, data, 5)
    assert (after.loss[:, 2] < before.loss[:, 2]).all()  # the control point's t
    assert torch.allclose(after.loss[:, [0, -1]], before.loss[:, [0, -1]])  # same ends
    mse = ((arch.forward_batched(a, as_input(arch, data.x)) - onehot) ** 2).mean((1, 2))
    assert torch.allclose(after.loss[:, 0], mse, atol=1e-6)  # the loss is the MSE
    assert not torch.allclose(  # twin: the classifier's loss on the same ends is not
        evaluate_curve(arch, "polyline", a, theta, b, digits.train, 5).loss[:, 0], mse, atol=1e-2
    )


def test_pam_history_is_what_its_states_score(pairs, digits):
    arch, a, b = pairs
    fit_cfg = CurveFitCfg("bezier", epochs=2, batch_size=64, lr=0.01, seed=0)
    start = identity(arch.spec, batch=2)
    perms, theta, history = pam(arch, a, b, start, digits.train, fit_cfg, PamCfg(3, 0.1, 400))
    probe = Split(digits.train.x[:400], digits.train.y[:400])

    def rescored(state_perms, state_theta):  # (K,), from the stored state alone
        return _objective(arch, a, state_theta, apply_permutation(b, state_perms, arch.spec), probe)

    values = [rescored(s.perms, s.theta) for s in history]
    for state, value in zip(history, values):
        assert torch.allclose(value, state.objective, rtol=1e-5)
    assert all((y <= x + 1e-6).all() for x, y in zip(values, values[1:]))  # per pair
    assert values[-1].mean() < 0.9 * values[0].mean()  # from the identity, re-aligning pays
    assert torch.allclose(rescored(perms, theta), history[-1].objective, rtol=1e-5)
    assert any(not torch.equal(p, torch.arange(p.shape[-1])) for p in perms.values())
    # twin: a history whose states are mixed up (the start's permutations, the last curve)
    mixed = rescored(history[0].perms, history[-1].theta)
    assert not torch.allclose(mixed, history[-1].objective, rtol=1e-3)
