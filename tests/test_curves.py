"""Mode-connectivity curves: the midpoint control is the straight line; endpoints stay; PAM."""

import pytest
import torch

from deepalign.core.data import Split
from deepalign.core.lmc import interpolate
from deepalign.core.permspec import apply_permutation, identity
from deepalign.core.weightspace import lerp, stack
from deepalign.evaluation.curves import (
    PROBE_POINTS,
    CurveFitCfg,
    PamCfg,
    evaluate,
    fit,
    midpoint,
    pam,
    point,
)
from deepalign.zoo.build import NetCfg, init_network, make_arch, train_batched


@pytest.fixture(scope="module")
def pairs(digits):
    net = NetCfg(
        "mlp",
        [16, 16],
        [],
        0,
        "relu",
        4,
        0,
        0,
        epochs=4,
        batch_size=64,
        lr=3e-3,
        weight_decay=0.0,
        optimizer="adam",
        momentum=0.0,
    )
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


def _objective(arch, a, theta, b, split):
    """PAM's objective: mean loss along each Bezier curve on its probe grid, (K,)."""
    return evaluate(arch, "bezier", a, theta, b, split, PROBE_POINTS).loss.mean(1)


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
    ev = evaluate(arch, kind, a, theta, b, digits.test, 5)
    linear = interpolate(arch, a[0], b[0], digits.test, 5)
    assert torch.allclose(ev.loss[0].double(), linear.loss.double(), atol=1e-5)
    off = point(kind, a, lerp(a, b, 0.9), b, torch.full((2,), 0.5))  # negative twin
    assert not torch.allclose(off.named["0.weight"], lerp(a, b, 0.5).named["0.weight"], atol=1e-3)


def test_training_keeps_endpoints_and_lowers_the_loss(pairs, digits):
    arch, a, b = pairs
    cfg = CurveFitCfg("bezier", epochs=3, batch_size=64, lr=0.01, seed=0)
    theta = fit(arch, a, b, digits.train, cfg)
    ends = [point("bezier", a, theta, b, torch.full((2,), t)) for t in (0.0, 1.0)]
    assert all(torch.equal(x, y) for x, y in zip(ends[0].tensors(), a.tensors()))
    assert all(torch.allclose(x, y) for x, y in zip(ends[1].tensors(), b.tensors()))
    before = _objective(arch, a, midpoint(a, b), b, digits.train)
    after = _objective(arch, a, theta, b, digits.train)
    assert (after < before).all()


def test_pam_never_ends_worse_than_its_start(pairs, digits):
    arch, a, b = pairs
    fit_cfg = CurveFitCfg("bezier", epochs=2, batch_size=64, lr=0.01, seed=0)
    start = identity(arch.spec, batch=2)
    perms, theta, history = pam(arch, a, b, start, digits.train, fit_cfg, PamCfg(3, 0.1, 400))
    assert all(y <= x + 1e-12 for x, y in zip(history, history[1:]))
    assert history[-1] < 0.9 * history[0]  # from the identity, the permutation step pays
    assert any(not torch.equal(p, torch.arange(p.shape[-1])) for p in perms.values())
    probe = Split(digits.train.x[:400], digits.train.y[:400])
    final = _objective(arch, a, theta, apply_permutation(b, perms, arch.spec), probe).mean()
    assert final.item() == pytest.approx(history[-1], rel=1e-5)
