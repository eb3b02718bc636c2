"""Straight-through estimator (Git Re-Basin, Alg. 2).

Learn free weights W~ whose nearest permutation of `other` (by weight matching) is the answer;
the forward pass uses that permuted `other`, gradients flow to W~ straight through.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F

from deepalign.config import Count, Positive, PositiveFloat, Seed, one_of
from deepalign.core.arch import as_input, forward
from deepalign.core.permspec import Perm, apply_permutation
from deepalign.core.weightspace import WeightSpace, lerp
from deepalign.errors import DeepAlignError
from deepalign.methods.problem import Problem
from deepalign.methods.weight_matching import WeightMatchingCfg, weight_matching

LAMBDAS = ("midpoint", "random")


@dataclass(frozen=True)
class SteCfg:
    lam: Annotated[str, one_of(*LAMBDAS)]  # where on the line the task loss is taken
    steps: Count
    lr: PositiveFloat
    batch_size: Positive
    wm_max_iter: Positive  # sweeps of the weight-matching projection per step
    seed: Seed


def ste(problem: Problem, cfg: SteCfg, init: Perm | None = None) -> Perm:
    """The weight-matching projection of the learned weights after the last step."""
    if cfg.lam not in LAMBDAS:
        raise DeepAlignError(f"unknown ste lam '{cfg.lam}' (known: {', '.join(LAMBDAS)})")
    arch, data = problem.needs_data("ste")
    gen = torch.Generator().manual_seed(cfg.seed)
    wm = WeightMatchingCfg(max_iter=cfg.wm_max_iter, restarts=0, seed=cfg.seed)
    start = apply_permutation(problem.other, init, problem.spec) if init else problem.ref
    free = [t.detach().clone().requires_grad_() for t in start.tensors()]
    opt = torch.optim.Adam(free, lr=cfg.lr)
    perm = init
    for _ in range(cfg.steps):
        perm = _project(problem, free, wm, perm)
        hard = apply_permutation(problem.other, perm, problem.spec)
        projected = WeightSpace.from_tensors(
            [f + (h - f).detach() for f, h in zip(free, hard.tensors())]
        )
        idx = torch.randint(len(data.y), (cfg.batch_size,), generator=gen)
        lam = 0.5 if cfg.lam == "midpoint" else float(torch.rand((), generator=gen))
        logits = forward(arch, lerp(problem.ref, projected, lam), as_input(arch, data.x[idx]))
        loss = F.cross_entropy(logits, data.y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return _project(problem, free, wm, perm)


def _project(problem: Problem, free: list, wm: WeightMatchingCfg, start: Perm | None) -> Perm:
    """The permutation of `other` closest in weights to the free weights."""
    target = WeightSpace.from_tensors([t.detach() for t in free])
    return weight_matching(Problem(problem.spec, target, problem.other), wm, start)
