"""Weight-matching scores in core: the soft score equals the hard one at permutation matrices,
is batched over pairs, and is differentiable in the matrices and the weights."""

import pytest
import torch

from deepalign.core.chain import cnn_arch, mlp_arch
from deepalign.core.matching import group_score, soft_group_score
from deepalign.core.permspec import apply_permutation, perm_to_matrix, random_permutation
from deepalign.core.resnet import resnet_arch
from deepalign.core.weightspace import stack
from deepalign.errors import DeepAlignError
from deepalign.zoo.build import init_network

ARCHS = {
    "mlp": mlp_arch(5, [6, 4, 3], 2, "relu"),
    "cnn": cnn_arch((1, 8, 8), [4, 6, 5], [1, 2, 2], 10, "relu"),
    "resnet": resnet_arch((1, 8, 8), [4, 8], 1, 10),  # residual groups and BatchNorm buffers
}


def _pair(kind):
    arch = ARCHS[kind]
    ref, other = (init_network(arch, s).to(torch.float64) for s in (0, 1))
    return arch, ref, other


def _hard(arch, ref, other, perm, group):
    """group_score with every other group's permutation applied by index."""
    fixed = {**perm, group: torch.arange(arch.spec.sizes[group])}
    return group_score(arch.spec, ref, apply_permutation(other, fixed, arch.spec), group)


def _swap_two(p):
    q = p.clone()
    q[[0, 1]] = q[[1, 0]]
    return q


@pytest.mark.parametrize("kind", list(ARCHS))
def test_soft_score_of_permutation_matrices_is_the_hard_score(kind):
    arch, ref, other = _pair(kind)
    spec = arch.spec
    perm = random_permutation(spec, torch.Generator().manual_seed(0))
    mats = perm_to_matrix(perm)  # float32 one-hot: promoted to the weights' float64
    for g in spec.groups:
        hard = _hard(arch, ref, other, perm, g)
        soft = soft_group_score(spec, ref, other, g, mats)
        assert soft.dtype == torch.float64 and soft.shape == hard.shape
        assert (soft - hard).abs().max() <= 1e-10
        # twin: another permutation of the groups around g gives another score
        moved = {h: _swap_two(p) if h != g else p for h, p in perm.items()}
        assert (
            soft_group_score(spec, ref, other, g, perm_to_matrix(moved)) - hard
        ).abs().max() > 1e-6


def test_soft_score_leaves_the_group_itself_unpermuted():
    arch, ref, other = _pair("mlp")
    spec = arch.spec
    mats = perm_to_matrix(random_permutation(spec, torch.Generator().manual_seed(1)))
    base = soft_group_score(spec, ref, other, "h1", mats)
    own = {**mats, "h1": torch.full((4, 4), 0.25)}  # g's own matrix is not used
    assert torch.equal(soft_group_score(spec, ref, other, "h1", own), base)
    near = {**mats, "h0": torch.full((6, 6), 1 / 6)}  # twin: a neighbour's matrix is
    assert not torch.allclose(soft_group_score(spec, ref, other, "h1", near), base)
    with pytest.raises(DeepAlignError, match="no matrix for group h2"):
        soft_group_score(spec, ref, other, "h1", {"h0": mats["h0"]})


def test_soft_score_is_batched_over_pairs():
    arch, ref, other = _pair("cnn")
    spec = arch.spec
    gen = torch.Generator().manual_seed(2)
    perms = [random_permutation(spec, gen) for _ in range(3)]
    refs = stack([ref, other, ref])
    others = stack([other, ref, apply_permutation(other, perms[0], spec)])
    mats = {g: torch.stack([perm_to_matrix(p)[g] for p in perms]) for g in spec.groups}
    for g in spec.groups:
        batched = soft_group_score(spec, refs, others, g, mats)  # (3, n, n)
        for k in range(3):
            alone = _hard(arch, refs[k], others[k], perms[k], g)
            assert (batched[k] - alone).abs().max() <= 1e-10
    shared = perm_to_matrix(perms[1])  # (n, n) matrices serve every pair
    one = soft_group_score(spec, refs, others, "h1", shared)
    assert torch.equal(one[0], soft_group_score(spec, refs[0], others[0], "h1", shared))
    with pytest.raises(DeepAlignError, match="batched"):
        soft_group_score(spec, ref, other, "h1", mats)  # unbatched networks, batched matrices


def test_soft_score_gradients_match_finite_differences():
    arch = mlp_arch(3, [4, 3], 2, "tanh")
    spec = arch.spec
    ref, other = (init_network(arch, s).to(torch.float64) for s in (3, 4))
    soft = torch.rand(3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    weight = other.named["2.weight"].clone()  # (3, 4): the next layer reads h0

    def score(mat, w, r):
        return soft_group_score(
            spec,
            ref.with_tensors({"0.weight": r}),
            other.with_tensors({"2.weight": w}),
            "h0",
            {"h1": mat},
        )

    inputs = (
        soft.requires_grad_(),
        weight.requires_grad_(),
        ref.named["0.weight"].clone().requires_grad_(),
    )
    assert torch.autograd.gradcheck(score, inputs)
    (grad,) = torch.autograd.grad(score(*inputs).sum(), inputs[0])
    assert grad.abs().max() > 1e-3  # twin of "no effect": the matrix does move the score
