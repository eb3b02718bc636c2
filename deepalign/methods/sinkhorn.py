"""Log-domain Sinkhorn, and Sinkhorn re-basin (Pena et al. 2023): learn soft permutations.

The losses and the (functional) Adam step through Sinkhorn are `deepalign.core.rebasin`'s.
Re-basin runs on many pairs at once: their logits are stacked, one batched forward pass
(`forward_batched`) scores every pair's interpolated network, and Adam (elementwise) updates
each pair as if alone. All pairs draw the same image batches and lambdas from one generator
seeded with `seed`, as each would alone, so a pair's answer does not depend on the pairs
beside it (up to float rounding).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor

from deepalign.config import Iterations, Positive, PositiveFloat, Seed, Steps, one_of
from deepalign.core.arch import passes, per_pass
from deepalign.core.assignment import Answer, sinkhorn  # noqa: F401  (re-exported)
from deepalign.core.data import Split
from deepalign.core.permspec import Perm
from deepalign.core.rebasin import (
    SoftLoss,
    adam_state,
    interpolation_loss,
    l2_loss,
    sinkhorn_step,
)
from deepalign.errors import DeepAlignError
from deepalign.methods.problem import Problem, solve_lap

LOSSES = ("l2", "random_lambda", "midpoint")


@dataclass(frozen=True)
class SinkhornCfg:
    loss: Annotated[str, one_of(*LOSSES)]  # l2 | random_lambda | midpoint (task loss)
    steps: Steps
    lr: PositiveFloat
    tau: PositiveFloat  # temperature of the Sinkhorn projection
    iterations: Iterations  # Sinkhorn iterations per projection
    init_scale: PositiveFloat  # from a permutation: logits start at init_scale * one-hot
    batch_size: Positive  # training images per step for task losses
    seed: Seed
    # Adam's learning rate from a learned aligner's scores: logits of the aligner's scale
    # (~16 on the default zoo), which steps of `lr` barely move in a few steps
    scores_lr: PositiveFloat

    def lr_from(self, inits: Sequence[Answer | None]) -> float:
        """`scores_lr` when every pair starts from scores, else `lr`."""
        from_scores = bool(inits) and all(i is not None and i.scores is not None for i in inits)
        return self.scores_lr if from_scores else self.lr


Batch = tuple[Tensor, float] | None  # one step's examples and lambda


def _draw(pairs: Problem, cfg: SinkhornCfg, gen: torch.Generator) -> Batch:
    """One step's training images and lambda, shared by every pair (None for the L2 loss)."""
    if cfg.loss == "l2":
        return None
    _, data = pairs.needs_data(f"sinkhorn ({cfg.loss})")
    idx = torch.randint(data.size, (cfg.batch_size,), generator=gen)
    lam = 0.5 if cfg.loss == "midpoint" else float(torch.rand((), generator=gen))
    return idx, lam


def _loss(pairs: Problem, soft: dict[str, Tensor], batch: Batch) -> Tensor:
    """The configured loss of stacked pairs (the sum of each pair's), soft {g: (K, n, n)}."""
    if batch is None:
        return l2_loss(pairs.spec, pairs.ref, pairs.other, soft)
    idx, lam = batch
    examples = Split(*pairs.data.examples(idx), pairs.data.task)
    return interpolation_loss(pairs.arch, pairs.ref, pairs.other, soft, examples, lam)


def _soft_loss(pairs: Problem, sizes: list[int], batch: Batch) -> SoftLoss:
    """The loss of pairs `part` from their soft matrices, one (k, groups, n, n) per size."""

    def loss(soft: list[Tensor], part: slice) -> Tensor:
        some = pairs.of_pairs(part)  # pairs are independent: each part's loss alone
        return _loss(some, _per_group(some, dict(zip(sizes, soft))), batch)

    return loss


def _parts(pairs: Problem, cfg: SinkhornCfg) -> list[slice]:
    """Slices of the pairs whose forward passes keep activations within budget (`per_pass`)."""
    count = pairs.ref.batch_size
    return passes(count, count if cfg.loss == "l2" else per_pass(pairs.arch, cfg.batch_size))


def _start_logits(init: Answer | None, g: str, n: int, init_scale: float) -> Tensor:
    """(n, n) logits of group g: zeros without a start, scores as they are, a permutation as a
    scaled one-hot matrix."""
    if init is None:
        return torch.zeros(n, n)
    if init.scores is not None:
        return init.scores[g].detach().float().clone()
    return init_scale * F.one_hot(init.perm[g], n).float()


def _groups_of(problem: Problem, n: int) -> list[str]:
    return [g for g, size in problem.spec.sizes.items() if size == n]


def _initial_logits(
    problem: Problem, cfg: SinkhornCfg, inits: Sequence[Answer | None]
) -> dict[int, Tensor]:
    """Logits stacked per group size, (K, groups, n, n), so one Sinkhorn call serves them all."""
    return {
        n: torch.stack(
            [
                torch.stack(
                    [_start_logits(init, g, n, cfg.init_scale) for g in _groups_of(problem, n)]
                )
                for init in inits
            ]
        )
        for n in sorted(set(problem.spec.sizes.values()))
    }


def _per_group(problem: Problem, stacked: dict[int, Tensor]) -> dict[str, Tensor]:
    """{n: (K, groups, n, n)} -> {g: (K, n, n)}."""
    return {g: stacked[n][:, k] for n in stacked for k, g in enumerate(_groups_of(problem, n))}


def _descend(
    problems: Sequence[Problem], cfg: SinkhornCfg, inits: Sequence[Answer | None]
) -> Iterator[tuple[int, dict[str, Tensor]]]:
    """Adam on every pair's logits through Sinkhorn: yields (steps taken, {g: (K, n, n)})."""
    if cfg.loss not in LOSSES:
        raise DeepAlignError(f"unknown sinkhorn loss '{cfg.loss}' (known: {', '.join(LOSSES)})")
    pairs = Problem.stack(problems)
    gen = torch.Generator().manual_seed(cfg.seed)
    logits = _initial_logits(pairs, cfg, inits)  # {n: (K, groups, n, n)}
    state = adam_state(list(logits.values()))
    yield 0, _per_group(pairs, logits)
    parts, lr = _parts(pairs, cfg), cfg.lr_from(inits)
    for step in range(1, cfg.steps + 1):
        loss = _soft_loss(pairs, list(logits), _draw(pairs, cfg, gen))
        new, state = sinkhorn_step(
            list(logits.values()), state, loss, lr, cfg.iterations, cfg.tau, parts
        )
        logits = dict(zip(logits, new))
        yield step, _per_group(pairs, logits)


def _harden(logits: dict[str, Tensor]) -> list[Perm]:
    """Hungarian per pair and group: {g: (K, n, n)} -> K permutations."""
    count = next(iter(logits.values())).shape[0]
    return [{g: solve_lap(lg[k]) for g, lg in logits.items()} for k in range(count)]


def sinkhorn_rebasin_batch(
    problems: Sequence[Problem], cfg: SinkhornCfg, inits: Sequence[Answer | None]
) -> list[Answer]:
    """Adam on every pair's logits through Sinkhorn; Hungarian on each pair's final logits.

    A start given as scores (DEEP-ALIGN's, {g: (n, n)}) becomes the initial logits as it is,
    stepped at `scores_lr`; one given as a permutation becomes init_scale times its one-hot
    matrix, stepped at `lr` like a start from nothing.
    """
    *_, (_, final) = _descend(problems, cfg, inits)
    return [Answer(hard=perm) for perm in _harden(final)]


def sinkhorn_rebasin(problem: Problem, cfg: SinkhornCfg, init: Answer | None = None) -> Answer:
    """One pair: `sinkhorn_rebasin_batch` of one."""
    return sinkhorn_rebasin_batch([problem], cfg, [init])[0]


def sinkhorn_trajectory(
    problems: Sequence[Problem], cfg: SinkhornCfg, inits: Sequence[Answer | None], at: list[int]
) -> list[tuple[int, list[Perm], float]]:
    """Per step count in `at` (<= cfg.steps): each pair's Hungarian-hardened permutation, and
    the seconds per pair spent descending until then (all pairs at once; hardening excluded)."""
    marks, out = set(at), []
    start = time.perf_counter()
    for step, logits in _descend(problems, cfg, inits):
        if step in marks:
            elapsed = time.perf_counter() - start
            out.append((step, _harden(logits), elapsed / len(problems)))
            start = time.perf_counter() - elapsed  # hardening does not count
    return out
