"""Log-domain Sinkhorn, and Sinkhorn re-basin (Pena et al. 2023): learn soft permutations."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor

from deepalign.config import Count, Positive, PositiveFloat, Seed, one_of
from deepalign.core.arch import as_input, forward
from deepalign.core.assignment import Answer, sinkhorn
from deepalign.core.permspec import Perm, apply_soft_permutation
from deepalign.core.weightspace import lerp
from deepalign.errors import DeepAlignError
from deepalign.methods.problem import Problem, solve_lap

LOSSES = ("l2", "random_lambda", "midpoint")


@dataclass(frozen=True)
class SinkhornCfg:
    loss: Annotated[str, one_of(*LOSSES)]  # l2 | random_lambda | midpoint (task loss)
    steps: Count
    lr: PositiveFloat
    tau: PositiveFloat  # temperature of the Sinkhorn projection
    iterations: Positive  # Sinkhorn iterations per projection
    init_scale: PositiveFloat  # from a permutation: logits start at init_scale * one-hot
    batch_size: Positive  # training images per step for task losses
    seed: Seed


def l2_loss(problem: Problem, soft: dict[str, Tensor]) -> Tensor:
    aligned = apply_soft_permutation(problem.other, soft, problem.spec)
    return sum(((a - b) ** 2).sum() for a, b in zip(problem.ref.tensors(), aligned.tensors()))


def task_loss(
    problem: Problem, mats: dict[str, Tensor], lam: float, x: Tensor, y: Tensor
) -> Tensor:
    """Cross-entropy of (1 - lam) * ref + lam * P#other on a batch."""
    aligned = apply_soft_permutation(problem.other, mats, problem.spec)
    return F.cross_entropy(forward(problem.arch, lerp(problem.ref, aligned, lam), x), y)


def _loss(
    problem: Problem, cfg: SinkhornCfg, soft: dict[str, Tensor], gen: torch.Generator
) -> Tensor:
    if cfg.loss == "l2":
        return l2_loss(problem, soft)
    arch, data = problem.needs_data(f"sinkhorn ({cfg.loss})")
    idx = torch.randint(len(data.y), (cfg.batch_size,), generator=gen)
    lam = 0.5 if cfg.loss == "midpoint" else float(torch.rand((), generator=gen))
    return task_loss(problem, soft, lam, as_input(arch, data.x[idx]), data.y[idx])


def _start_logits(init: Answer | None, g: str, n: int, init_scale: float) -> Tensor:
    """(n, n) logits of group g: zeros without a start, scores as they are, a permutation as a
    scaled one-hot matrix."""
    if init is None:
        return torch.zeros(n, n)
    if init.scores is not None:
        return init.scores[g].detach().float().clone()
    return init_scale * F.one_hot(init.perm[g], n).float()


def _initial_logits(problem: Problem, cfg: SinkhornCfg, init: Answer | None) -> dict[int, Tensor]:
    """Logits stacked per group size, (groups, n, n), so one Sinkhorn call serves them all."""
    sizes = sorted(set(problem.spec.sizes.values()))
    return {
        n: torch.stack(
            [_start_logits(init, g, n, cfg.init_scale) for g in _groups_of(problem, n)]
        ).requires_grad_()
        for n in sizes
    }


def _groups_of(problem: Problem, n: int) -> list[str]:
    return [g for g, size in problem.spec.sizes.items() if size == n]


def _per_group(problem: Problem, stacked: dict[int, Tensor]) -> dict[str, Tensor]:
    return {g: stacked[n][k] for n in stacked for k, g in enumerate(_groups_of(problem, n))}


def _descend(
    problem: Problem, cfg: SinkhornCfg, init: Answer | None
) -> Iterator[tuple[int, dict[str, Tensor]]]:
    """Adam on per-group logits through Sinkhorn: yields (steps taken, logits per group)."""
    if cfg.loss not in LOSSES:
        raise DeepAlignError(f"unknown sinkhorn loss '{cfg.loss}' (known: {', '.join(LOSSES)})")
    gen = torch.Generator().manual_seed(cfg.seed)
    logits = _initial_logits(problem, cfg, init)
    opt = torch.optim.Adam(logits.values(), lr=cfg.lr)
    problem = Problem(
        problem.spec, problem.ref.detach(), problem.other.detach(), problem.arch, problem.data
    )
    yield 0, _per_group(problem, logits)
    for step in range(1, cfg.steps + 1):
        soft = {n: sinkhorn(lg, cfg.iterations, cfg.tau) for n, lg in logits.items()}
        loss = _loss(problem, cfg, _per_group(problem, soft), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        yield step, _per_group(problem, logits)


def sinkhorn_rebasin(problem: Problem, cfg: SinkhornCfg, init: Answer | None = None) -> Answer:
    """Adam on per-group logits through Sinkhorn; Hungarian on the final logits.

    A start given as scores (DEEP-ALIGN's, {g: (n, n)}) becomes the initial logits as it is;
    one given as a permutation becomes init_scale times its one-hot matrix.
    """
    *_, (_, final) = _descend(problem, cfg, init)
    return Answer(hard={g: solve_lap(lg) for g, lg in final.items()})


def sinkhorn_trajectory(
    problem: Problem, cfg: SinkhornCfg, init: Answer | None, at: list[int]
) -> list[tuple[int, Perm, float]]:
    """Hungarian-hardened permutations after each step count in `at` (<= cfg.steps), with the
    seconds spent descending until then (hardening excluded)."""
    marks, out = set(at), []
    start = time.perf_counter()
    for step, logits in _descend(problem, cfg, init):
        if step in marks:
            elapsed = time.perf_counter() - start
            out.append((step, {g: solve_lap(lg) for g, lg in logits.items()}, elapsed))
            start = time.perf_counter() - elapsed  # hardening does not count
    return out
