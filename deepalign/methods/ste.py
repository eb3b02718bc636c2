"""Straight-through estimator (Git Re-Basin, Alg. 2).

Learn free weights W~ whose nearest permutation of `other` (by weight matching) is the answer;
the forward pass uses that permuted `other`, gradients flow to W~ straight through. The task
loss on the line is `deepalign.core.rebasin.lerp_task_loss`, the one Sinkhorn re-basin uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor

from deepalign.config import Iterations, Positive, PositiveFloat, Seed, Steps, one_of
from deepalign.core.arch import passes, per_pass
from deepalign.core.assignment import Answer
from deepalign.core.data import Split
from deepalign.core.permspec import Perm, apply_permutation
from deepalign.core.rebasin import lerp_task_loss
from deepalign.core.weightspace import WeightSpace, stack
from deepalign.errors import DeepAlignError
from deepalign.methods.problem import Problem
from deepalign.methods.weight_matching import WeightMatchingCfg, weight_matching
from deepalign.threads import per_pair

LAMBDAS = ("midpoint", "random")


@dataclass(frozen=True)
class SteCfg:
    lam: Annotated[str, one_of(*LAMBDAS)]  # where on the line the task loss is taken
    steps: Steps
    lr: PositiveFloat
    batch_size: Positive
    wm_max_iter: Iterations  # sweeps of the weight-matching projection per step
    seed: Seed


def ste_batch(
    problems: Sequence[Problem], cfg: SteCfg, inits: Sequence[Answer | None]
) -> list[Answer]:
    """Every pair's weight-matching projection of its learned weights after the last step.

    The pairs train together: batched forward passes (as many pairs per pass as `per_pass`
    allows; all pairs see the image batches and lambdas each would draw alone), one
    weight-matching projection per pair (on `per_pair` threads).
    """
    if cfg.lam not in LAMBDAS:
        raise DeepAlignError(f"unknown ste lam '{cfg.lam}' (known: {', '.join(LAMBDAS)})")
    pairs = Problem.stack(problems)
    arch, data = pairs.needs_data("ste")
    gen = torch.Generator().manual_seed(cfg.seed)
    wm = WeightMatchingCfg(max_iter=cfg.wm_max_iter, restarts=0, seed=cfg.seed)
    perms = [init.perm if init else None for init in inits]
    starts = [
        apply_permutation(p.other, perm, p.spec) if perm else p.ref
        for p, perm in zip(problems, perms)
    ]
    free = [t.detach().clone().requires_grad_() for t in stack(starts).tensors()]  # (K, ...)
    opt = torch.optim.Adam(free, lr=cfg.lr)
    step = per_pass(arch, cfg.batch_size)
    for _ in range(cfg.steps):
        perms = _project(problems, free, wm, perms)
        stacked = {g: torch.stack([perm[g] for perm in perms]) for g in pairs.spec.groups}
        hard = apply_permutation(pairs.other, stacked, pairs.spec)
        idx = torch.randint(data.size, (cfg.batch_size,), generator=gen)
        lam = 0.5 if cfg.lam == "midpoint" else float(torch.rand((), generator=gen))
        opt.zero_grad(set_to_none=True)
        for part in passes(len(problems), step):  # pairs are independent: a pass at a time
            projected = hard[part].replace(
                [f[part] + (h[part] - f[part]).detach() for f, h in zip(free, hard.tensors())]
            )
            batch = Split(*data.of_networks(part).examples(idx), data.task)
            lerp_task_loss(arch, pairs.ref[part], projected, batch, lam).backward()
        opt.step()
    return [Answer(hard=perm) for perm in _project(problems, free, wm, perms)]


def ste(problem: Problem, cfg: SteCfg, init: Answer | None = None) -> Answer:
    """One pair: `ste_batch` of one."""
    return ste_batch([problem], cfg, [init])[0]


def _row(like: WeightSpace, free: list[Tensor], k: int) -> WeightSpace:
    """Pair k's free weights (detached) as a network laid out like `like`."""
    return like.replace(f[k].detach() for f in free)


def _project(
    problems: Sequence[Problem],
    free: list[Tensor],
    wm: WeightMatchingCfg,
    starts: list[Perm | None],
) -> list[Perm]:
    """Per pair, the permutation of `other` closest in weights to its free weights."""
    with per_pair():
        return [
            weight_matching(Problem(p.spec, _row(p.other, free, k), p.other, p.arch), wm, start)
            for k, (p, start) in enumerate(zip(problems, starts))
        ]
