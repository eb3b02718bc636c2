"""Permutation invariance of the weight-space core, each check with a negative twin."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepalign.core.arch import forward_batched
from deepalign.core.chain import cnn_arch, forward, mlp_arch
from deepalign.core.permspec import (
    apply_permutation,
    apply_soft_permutation,
    compose,
    identity,
    invert,
    perm_to_matrix,
    random_permutation,
)
from deepalign.core.weightspace import WeightSpace, check_same_shapes, lerp, stack
from deepalign.errors import DeepAlignError
from deepalign.zoo.build import init_network


def inputs(arch, n=16, seed=0):
    return torch.randn(n, *arch.input_shape, generator=torch.Generator().manual_seed(seed))


def same_tensors(a: WeightSpace, b: WeightSpace) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors(), strict=True))


@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_random_permutation_preserves_function(net, request, gen):
    arch, ws = request.getfixturevalue(net)
    perm = random_permutation(arch.spec, gen)
    permuted = apply_permutation(ws, perm, arch.spec)
    x = inputs(arch)
    assert (forward(arch, permuted, x) - forward(arch, ws, x)).abs().max() <= 1e-5
    assert not same_tensors(permuted, ws)


@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_permuting_one_side_only_changes_function(net, request, gen):
    """Negative twin: rows of layer 1 permuted, columns of layer 2 left alone."""
    arch, ws = request.getfixturevalue(net)
    perm = random_permutation(arch.spec, gen)["h1"]
    w, b = (f"{arch.param_indices[1]}.{n}" for n in ("weight", "bias"))
    broken = ws.with_tensors({w: ws.named[w][perm], b: ws.named[b][perm]})
    x = inputs(arch)
    assert (forward(arch, broken, x) - forward(arch, ws, x)).abs().max() > 1e-3


def test_conv_to_linear_step_moves_whole_blocks(cnn, gen):
    """The Linear after Flatten must move h*w features per channel; per-feature is wrong."""
    arch, ws = cnn
    spec = arch.spec
    assert ("7.weight", 1, 4, 0) in list(spec.acting("h2"))  # 5 channels x (2 x 2) map
    perm = random_permutation(spec, gen)
    right = apply_permutation(ws, perm, spec)
    wrong = ws.named["7.weight"][:, perm["h2"].repeat(4)[:20]]  # plausible but wrong expansion
    broken = right.with_tensors({"7.weight": wrong})
    x = inputs(arch)
    assert (forward(arch, right, x) - forward(arch, ws, x)).abs().max() <= 1e-5
    assert (forward(arch, broken, x) - forward(arch, ws, x)).abs().max() > 1e-3


@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_invert_round_trip_is_exact(net, request, gen):
    arch, ws = request.getfixturevalue(net)
    spec = arch.spec
    perm = random_permutation(spec, gen)
    back = apply_permutation(apply_permutation(ws, perm, spec), invert(perm), spec)
    assert same_tensors(back, ws)
    assert same_tensors(apply_permutation(ws, identity(spec), spec), ws)


def test_compose_matches_sequential_application(mlp, gen):
    arch, ws = mlp
    spec = arch.spec
    p, q = random_permutation(spec, gen), random_permutation(spec, gen)
    twice = apply_permutation(apply_permutation(ws, p, spec), q, spec)
    assert same_tensors(twice, apply_permutation(ws, compose(p, q), spec))
    assert not same_tensors(twice, apply_permutation(ws, compose(q, p), spec))


@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_state_dict_round_trip_is_exact(net, request):
    arch, ws = request.getfixturevalue(net)
    model = arch.build()
    state = model.state_dict()
    back = arch.state_dict(arch.weightspace(state))
    assert list(back) == list(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_functional_forward_matches_module(net, request):
    arch, ws = request.getfixturevalue(net)
    model = arch.build()
    model.load_state_dict(arch.state_dict(ws))
    x = inputs(arch)
    assert torch.allclose(model(x), forward(arch, ws, x), atol=1e-6)


@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_batched_forms_match_per_network(net, request, gen):
    arch, _ = request.getfixturevalue(net)
    nets = [init_network(arch, s) for s in range(3)]
    batch = stack(nets)
    spec = arch.spec
    perms = random_permutation(spec, gen, batch=3)
    permuted = apply_permutation(batch, perms, spec)
    x = inputs(arch)
    out = forward_batched(arch, batch, x)  # (3, N, 10)
    for b, ws in enumerate(nets):
        one = {g: p[b] for g, p in perms.items()}
        assert same_tensors(permuted[b], apply_permutation(ws, one, spec))
        assert torch.allclose(out[b], forward(arch, ws, x), atol=1e-6)
    per_net = torch.stack([x * (b + 1) for b in range(3)])  # (3, N, ...): each its own inputs
    out = forward_batched(arch, batch, per_net)
    for b, ws in enumerate(nets):
        assert torch.allclose(out[b], forward(arch, ws, per_net[b]), atol=1e-5)
    assert torch.allclose(
        forward_batched(arch, batch[:1], x)[0], forward(arch, nets[0], x), atol=1e-6
    )


@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_soft_permutation_with_hard_matrices_matches_index_form(net, request, gen):
    arch, ws = request.getfixturevalue(net)
    perm = random_permutation(arch.spec, gen)
    soft = apply_soft_permutation(ws, perm_to_matrix(perm), arch.spec)
    hard = apply_permutation(ws, perm, arch.spec)
    assert all(torch.allclose(a, b) for a, b in zip(soft.tensors(), hard.tensors(), strict=True))


def test_lerp_endpoints_and_shape_check(mlp):
    arch, ws = mlp
    other = init_network(arch, 1)
    assert same_tensors(lerp(ws, other, 0.0), ws)
    assert all(
        torch.allclose(a, b) for a, b in zip(lerp(ws, other, 1.0).tensors(), other.tensors())
    )
    wider = init_network(mlp_arch(64, [12, 11, 8], 10, "relu"), 0)
    with pytest.raises(DeepAlignError, match=r"'2.weight': a \(10, 12\) vs b \(11, 12\)"):
        check_same_shapes(ws, wider)


@settings(max_examples=25, deadline=None)
@given(
    widths=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_mlp_permutation_invariance_any_shape(widths, seed):
    arch = mlp_arch(5, widths, 3, "tanh")
    ws = init_network(arch, seed)
    gen = torch.Generator().manual_seed(seed)
    perm = random_permutation(arch.spec, gen)
    permuted = apply_permutation(ws, perm, arch.spec)
    x = torch.randn(8, 5, generator=gen)
    assert (forward(arch, permuted, x) - forward(arch, ws, x)).abs().max() <= 1e-5
    assert same_tensors(apply_permutation(permuted, invert(perm), arch.spec), ws)


@settings(max_examples=15, deadline=None)
@given(
    channels=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    strides=st.lists(st.sampled_from([1, 2]), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_cnn_permutation_invariance_any_shape(channels, strides, seed):
    arch = cnn_arch((2, 8, 8), channels, strides[: len(channels)], 4, "relu")
    ws = init_network(arch, seed)
    gen = torch.Generator().manual_seed(seed)
    perm = random_permutation(arch.spec, gen)
    x = torch.randn(4, 2, 8, 8, generator=gen)
    out = forward(arch, apply_permutation(ws, perm, arch.spec), x)
    assert (out - forward(arch, ws, x)).abs().max() <= 1e-5
