"""Sinkhorn re-basin (Pena et al. 2023) as functions: its losses of soft permutations, and one
Adam step on the logits through Sinkhorn, out of place, so that steps can be unrolled and
differentiated through (a learned aligner's logits refined by K steps, trained end to end).

Losses (batched networks: the sum over pairs of each pair's own value):
  l2_loss:            ||ref - P#other||^2 over the parameters (C_L2, no data)
  interpolation_loss: the mean task loss of (1 - lam) ref + lam P#other on a batch of
                      examples; lam = 1/2 is C_Mid, lam ~ U(0, 1) drawn per step C_Rnd
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from deepalign.core.arch import Arch, as_input
from deepalign.core.assignment import sinkhorn
from deepalign.core.data import Split
from deepalign.core.permspec import PermSpec, apply_soft_permutation
from deepalign.core.task import task_loss
from deepalign.core.weightspace import WeightSpace, lerp

BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults
EPS = 1e-8


def l2_loss(
    spec: PermSpec, ref: WeightSpace, other: WeightSpace, soft: Mapping[str, Tensor]
) -> Tensor:
    """||ref - P#other||^2 over the parameters, summed over pairs (soft {g: (K, n, n)} with
    batched networks, (n, n) without)."""
    aligned = apply_soft_permutation(other, dict(soft), spec).params()
    return sum(((t - aligned[k]) ** 2).sum() for k, t in ref.params().items())


def lerp_task_loss(
    arch: Arch, ref: WeightSpace, aligned: WeightSpace, batch: Split, lam: float | Tensor
) -> Tensor:
    """The mean task loss of (1 - lam) ref + lam aligned on `batch`, summed over pairs (batched
    networks; targets shared, or one set per pair). With BatchNorm the interpolated networks
    normalise with their own batch statistics, as evaluation recomputes theirs (their parents'
    running statistics describe neither; nor can a soft permutation differentiate through
    them)."""
    mixed, x = lerp(ref, aligned, lam), as_input(arch, batch.x)
    out = arch.forward_batched(mixed, x, train=arch.has_batchnorm)  # (K, n, C)
    if not ref.is_batched:
        out = out.unsqueeze(0)  # (1, n, C)
    return task_loss(out, batch.y, batch.task) / batch.size


def interpolation_loss(
    arch: Arch,
    ref: WeightSpace,
    other: WeightSpace,
    soft: Mapping[str, Tensor],
    batch: Split,
    lam: float | Tensor,
) -> Tensor:
    """`lerp_task_loss` of ref and P#other, P the soft permutations {g: (K, n, n)}."""
    aligned = apply_soft_permutation(other, dict(soft), arch.spec)
    return lerp_task_loss(arch, ref, aligned, batch, lam)


@dataclass(frozen=True)
class AdamState:
    """torch.optim.Adam's state as values: steps taken, and both moments per tensor."""

    steps: int
    exp_avg: tuple[Tensor, ...]
    exp_avg_sq: tuple[Tensor, ...]


def adam_state(params: Sequence[Tensor]) -> AdamState:
    """Adam before its first step: zero moments."""
    zeros = tuple(torch.zeros_like(p) for p in params)
    return AdamState(0, zeros, tuple(torch.zeros_like(p) for p in params))


def _root(v: Tensor) -> Tensor:
    """sqrt(v) with a zero gradient (not NaN) where v = 0; the same values as `v.sqrt()`."""
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), 0.0)


def adam_update(
    params: Sequence[Tensor], grads: Sequence[Tensor], state: AdamState, lr: float
) -> tuple[list[Tensor], AdamState]:
    """One step of torch.optim.Adam (default betas and eps, no weight decay), the arithmetic
    of its single-tensor CPU path op for op, out of place: differentiable in params and grads."""
    beta1, beta2 = BETAS
    steps = state.steps + 1
    step_size = lr / (1 - beta1**steps)
    correction = (1 - beta2**steps) ** 0.5
    new, avgs, squares = [], [], []
    for p, g, m, v in zip(params, grads, state.exp_avg, state.exp_avg_sq, strict=True):
        m = torch.lerp(m, g, 1 - beta1)
        v = torch.addcmul(v * beta2, g, g, value=1 - beta2)
        new.append(torch.addcdiv(p, m, _root(v) / correction + EPS, value=-step_size))
        avgs.append(m)
        squares.append(v)
    return new, AdamState(steps, tuple(avgs), tuple(squares))


# The loss of the soft permutations of pairs `part`: one (part, ..., n, n) tensor per logits
# tensor, in the order of the logits.
SoftLoss = Callable[[list[Tensor], slice], Tensor]


def sinkhorn_gradients(
    logits: Sequence[Tensor],
    loss: SoftLoss,
    iterations: int,
    tau: float,
    parts: Sequence[slice] = (slice(None),),
    create_graph: bool = False,
) -> list[Tensor]:
    """d loss / d logits through Sinkhorn, logits (K, ..., n, n) requiring grad; the pairs
    (leading axis) a part at a time, each part's graph freed before the next."""
    pieces = []
    for part in parts:
        some = [lg[part] for lg in logits]
        soft = [sinkhorn(s, iterations, tau) for s in some]
        value = loss(soft, part)
        pieces.append(
            torch.autograd.grad(value, some, create_graph=create_graph, materialize_grads=True)
        )
    return [torch.cat(gs) for gs in zip(*pieces)]


def sinkhorn_step(
    logits: Sequence[Tensor],
    state: AdamState,
    loss: SoftLoss,
    lr: float,
    iterations: int,
    tau: float,
    parts: Sequence[slice] = (slice(None),),
    create_graph: bool = False,
) -> tuple[list[Tensor], AdamState]:
    """One Adam step on logits (K, ..., n, n) through Sinkhorn: new logits and state, the old
    ones untouched. With `create_graph` the new logits stay differentiable in the old ones
    and in whatever `loss` reads, so K steps can be unrolled and backpropagated through."""
    if create_graph:
        tracked = [lg if lg.requires_grad else lg.detach().requires_grad_() for lg in logits]
    else:
        tracked = [lg.detach().requires_grad_() for lg in logits]
    grads = sinkhorn_gradients(tracked, loss, iterations, tau, parts, create_graph)
    base = tracked if create_graph else [lg.detach() for lg in logits]
    return adam_update(base, grads, state, lr)
