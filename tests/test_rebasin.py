"""Sinkhorn re-basin's math in core: its losses at permutation matrices, the functional Adam
step (torch.optim.Adam's numbers exactly), and K unrolled steps differentiated through."""

import pytest
import torch
import torch.nn.functional as F

from deepalign.core.arch import as_input
from deepalign.core.assignment import sinkhorn
from deepalign.core.chain import mlp_arch
from deepalign.core.data import Split
from deepalign.core.permspec import apply_permutation, perm_to_matrix, random_permutation
from deepalign.core.rebasin import (
    adam_state,
    adam_update,
    interpolation_loss,
    l2_loss,
    sinkhorn_step,
)
from deepalign.core.weightspace import lerp, stack
from deepalign.zoo.build import init_network

ARCH = mlp_arch(64, [8, 6], 10, "relu")


@pytest.fixture(scope="module")
def pairs():
    """Two pairs, batched (2, ...) each side, and one permutation per pair."""
    nets = [init_network(ARCH, s) for s in range(4)]
    gen = torch.Generator().manual_seed(0)
    perms = [random_permutation(ARCH.spec, gen) for _ in range(2)]
    return stack(nets[:2]), stack(nets[2:]), perms


def _matrices(perms):
    return {g: torch.stack([perm_to_matrix(p)[g] for p in perms]) for g in ARCH.spec.groups}


def test_losses_at_permutation_matrices_are_the_hard_ones(pairs, digits):
    ref, other, perms = pairs
    mats = _matrices(perms)
    hard = apply_permutation(
        other, {g: torch.stack([p[g] for p in perms]) for g in mats}, ARCH.spec
    )
    distance = sum(((x - y) ** 2).sum() for x, y in zip(ref.tensors(), hard.tensors()))
    assert torch.allclose(l2_loss(ARCH.spec, ref, other, mats), distance)
    batch = Split(digits.train.x[:50], digits.train.y[:50])
    out = ARCH.forward_batched(lerp(ref, hard, 0.3), as_input(ARCH, batch.x))  # (2, 50, 10)
    by_hand = sum(F.cross_entropy(o, batch.y) for o in out)  # each pair's mean, summed
    found = interpolation_loss(ARCH, ref, other, mats, batch, 0.3)
    assert torch.allclose(found, by_hand, atol=1e-5)
    # twins: another point on the line, another permutation
    assert not torch.allclose(interpolation_loss(ARCH, ref, other, mats, batch, 0.7), by_hand)
    swapped = _matrices(perms[::-1])
    assert not torch.allclose(l2_loss(ARCH.spec, ref, other, swapped), distance)


def test_functional_adam_gives_torch_adams_numbers_exactly():
    gen = torch.Generator().manual_seed(1)
    start = [torch.randn(3, 5, 5, generator=gen), torch.randn(3, 4, 4, generator=gen)]
    grads = [[torch.randn(t.shape, generator=gen) for t in start] for _ in range(6)]
    leaves = [t.clone().requires_grad_() for t in start]
    opt = torch.optim.Adam(leaves, lr=0.1)
    params, state = start, adam_state(start)
    for step in grads:
        for leaf, g in zip(leaves, step):
            leaf.grad = g.clone()
        opt.step()
        params, state = adam_update(params, step, state, lr=0.1)
    assert all(torch.equal(p, leaf.detach()) for p, leaf in zip(params, leaves))
    assert all(p is not t for p, t in zip(params, start))  # out of place: the start is kept
    forgetful = start  # twin: without its state carried, Adam is another optimiser
    for step in grads:
        forgetful, _ = adam_update(forgetful, step, adam_state(start), lr=0.1)
    assert not all(torch.equal(p, leaf.detach()) for p, leaf in zip(forgetful, leaves))


def _l2(ref, other):
    """The L2 loss of pairs `part` from soft matrices (pairs, groups, n, n) per group size."""
    sizes = {n: [g for g, m in ARCH.spec.sizes.items() if m == n] for n in (8, 6)}

    def loss(soft, part):
        mats = {g: s[:, k] for s, groups in zip(soft, sizes.values()) for k, g in enumerate(groups)}
        return l2_loss(ARCH.spec, ref[part], other[part], mats)

    return loss


def test_sinkhorn_steps_match_the_in_place_adam_loop(pairs):
    ref, other, _ = pairs
    gen = torch.Generator().manual_seed(2)
    start = [torch.randn(2, 1, n, n, generator=gen) for n in (8, 6)]  # (K, groups, n, n)
    loss = _l2(ref, other)
    leaves = [t.clone().requires_grad_() for t in start]
    opt = torch.optim.Adam(leaves, lr=0.1)
    for _ in range(5):  # the loop the re-basin method ran before
        opt.zero_grad(set_to_none=True)
        loss([sinkhorn(lg, 10, 1.0) for lg in leaves], slice(None)).backward()
        opt.step()
    for parts in ([slice(None)], [slice(0, 1), slice(1, 2)]):  # pairs together or apart
        logits, state = start, adam_state(start)
        for _ in range(5):
            logits, state = sinkhorn_step(logits, state, loss, 0.1, 10, 1.0, parts)
        assert all(torch.equal(x, leaf.detach()) for x, leaf in zip(logits, leaves))
        assert not any(x.requires_grad for x in logits)  # twin: no graph unless asked
    assert not all(torch.equal(x, s) for x, s in zip(logits, start))


def test_unrolled_steps_are_differentiated_through():
    arch = mlp_arch(3, [4], 2, "tanh")
    ref, other = (stack([init_network(arch, s).to(torch.float64)]) for s in (5, 6))

    def loss(soft, part):
        return l2_loss(arch.spec, ref[part], other[part], {"h0": soft[0][:, 0]})

    def refined(start):  # (1, 1, 4, 4) -> the loss after two unrolled steps
        logits, state = [start], adam_state([start])
        for _ in range(2):
            logits, state = sinkhorn_step(logits, state, loss, 0.05, 5, 1.0, create_graph=True)
        return loss([sinkhorn(logits[0], 5, 1.0)], slice(None))

    gen = torch.Generator().manual_seed(3)
    start = torch.randn(1, 1, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(refined, (start,))
    (through,) = torch.autograd.grad(refined(start), start)
    (first,) = torch.autograd.grad(loss([sinkhorn(start, 5, 1.0)], slice(None)), start)
    assert not torch.allclose(through, first, atol=1e-6)  # twin: the steps are in the gradient
