"""Weight matching (Git Re-Basin, Alg. 1): coordinate descent over the groups, one LAP each."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepalign.config import Iterations, Seed, Steps
from deepalign.core.matching import group_score
from deepalign.core.permspec import Perm, apply_permutation, identity, random_permutation
from deepalign.core.weightspace import WeightSpace
from deepalign.methods.problem import Problem, solve_lap


@dataclass(frozen=True)
class WeightMatchingCfg:
    max_iter: Iterations  # sweeps over all groups at most
    restarts: Steps  # extra random starts when no start is given; the best objective wins
    seed: Seed  # order of the groups in each sweep, and restart starts


def objective(ref: WeightSpace, aligned: WeightSpace) -> float:
    """<ref, aligned> over all parameters (maximising it minimises their L2 distance)."""
    other = aligned.params()
    return float(sum((t.double() * other[k].double()).sum() for k, t in ref.params().items()))


def _sweeps(
    problem: Problem, perm: Perm, cfg: WeightMatchingCfg, gen: torch.Generator, history: list[float]
) -> Perm:
    spec = problem.spec
    perm = {g: p.clone() for g, p in perm.items()}
    for _ in range(cfg.max_iter):
        improved = False
        for k in torch.randperm(len(spec.groups), generator=gen).tolist():
            g = spec.groups[k]
            fixed = apply_permutation(problem.other, perm | {g: torch.arange(spec.sizes[g])}, spec)
            score = group_score(spec, problem.ref, fixed, g)
            new = solve_lap(score)
            old_value, new_value = (
                score[torch.arange(len(new)), perm[g]].sum(),
                score[torch.arange(len(new)), new].sum(),
            )
            if new_value > old_value + 1e-12:
                perm[g], improved = new, True
        history.append(objective(problem.ref, apply_permutation(problem.other, perm, spec)))
        if not improved:
            break
    return perm


def weight_matching_trace(
    problem: Problem, cfg: WeightMatchingCfg, init: Perm | None = None
) -> tuple[Perm, list[list[float]]]:
    """Best permutation over its starts, and each start's objective per sweep: `init` alone
    when given (a refinement keeps its start), else the identity and `restarts` random ones."""
    gen = torch.Generator().manual_seed(cfg.seed)
    starts = [init or identity(problem.spec)]
    if init is None:
        starts += [random_permutation(problem.spec, gen) for _ in range(cfg.restarts)]
    best, best_value, traces = starts[0], float("-inf"), []
    for start in starts:
        history: list[float] = []
        perm = _sweeps(problem, start, cfg, gen, history)
        traces.append(history)
        if history[-1] > best_value:
            best, best_value = perm, history[-1]
    return best, traces


def weight_matching(problem: Problem, cfg: WeightMatchingCfg, init: Perm | None = None) -> Perm:
    return weight_matching_trace(problem, cfg, init)[0]
