"""Weight matching (Git Re-Basin, Alg. 1): coordinate descent over the groups, one LAP each."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from deepalign.config import Iterations, Seed, Steps
from deepalign.core.matching import Scorer
from deepalign.core.permspec import Perm, identity, random_permutation, runs_index, take
from deepalign.core.weightspace import WeightSpace
from deepalign.methods.problem import Problem, solve_lap


@dataclass(frozen=True)
class WeightMatchingCfg:
    max_iter: Iterations  # sweeps over all groups at most
    restarts: Steps  # extra random starts when no start is given; the best objective wins
    seed: Seed  # order of the groups in each sweep, and restart starts


LARGE = 1 << 22  # entries from which a tensor's inner product is taken in its own dtype


def _inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> in float64, or by BLAS in the tensors' dtype for a large pair (float64 copies of
    a VGG's 100M-entry layer take seconds per sweep)."""
    if a.numel() >= LARGE:
        return torch.dot(a.reshape(-1), b.reshape(-1)).double()
    return (a.double() * b.double()).sum()


def objective(ref: WeightSpace, aligned: WeightSpace) -> float:
    """<ref, aligned> over all parameters (maximising it minimises their L2 distance)."""
    other = aligned.params()
    return float(sum(_inner(t, other[k]) for k, t in ref.params().items()))


class _Objective:
    """`objective(ref, apply_permutation(other, perm))` after each sweep, each tensor's term
    kept until a permutation acting on it changes (the same numbers, summed in the same
    order; a VGG's 4096-unit layers settle long before the small ones do)."""

    def __init__(self, problem: Problem, scorer: Scorer) -> None:
        self.problem, self.runs = problem, scorer.runs
        self.kept: dict[str, tuple[list[torch.Tensor], torch.Tensor]] = {}

    def __call__(self, perm: Perm) -> float:
        other = self.problem.other.params()
        return float(
            sum(self._term(k, t, other[k], perm) for k, t in self.problem.ref.params().items())
        )

    def _term(self, key: str, ref: torch.Tensor, other: torch.Tensor, perm: Perm) -> torch.Tensor:
        runs = self.runs.get(key, [])
        used = [perm[g] for g, _ in runs]
        kept = self.kept.get(key)
        if kept is not None and all(torch.equal(p, q) for p, q in zip(kept[0], used)):
            return kept[1]
        by_axis: dict[int, list] = {}
        for (_, ax), p in zip(runs, used):
            by_axis.setdefault(ax.axis, []).append((ax, p))
        for axis, found in by_axis.items():
            other = take(other, axis, runs_index(found, other.shape[axis]), batched=False)
        term = _inner(ref, other)
        self.kept[key] = (used, term)
        return term


def _sweeps(
    problem: Problem,
    perm: Perm,
    cfg: WeightMatchingCfg,
    gen: torch.Generator,
    history: list[float],
    scorer: Scorer,
    bar: tqdm,
) -> Perm:
    spec, value = problem.spec, _Objective(problem, scorer)
    perm = {g: p.clone() for g, p in perm.items()}
    solved: dict[str, list[torch.Tensor]] = {}  # the permutations each group's last LAP saw
    for sweep in range(cfg.max_iter):
        improved = False
        bar.set_postfix_str(f"sweep {sweep + 1}", refresh=False)
        for k in torch.randperm(len(spec.groups), generator=gen).tolist():
            bar.update()
            g = spec.groups[k]
            seen = [perm[h] for h in scorer.depends[g]]
            if g in solved and all(torch.equal(p, q) for p, q in zip(solved[g], seen)):
                continue  # the same scores as last time: the same (kept) solution
            solved[g] = seen
            score = scorer.score(perm, g)
            new = solve_lap(score)
            old_value, new_value = (
                score[torch.arange(len(new)), perm[g]].sum(),
                score[torch.arange(len(new)), new].sum(),
            )
            if new_value > old_value + 1e-12:
                perm[g], improved = new, True
        history.append(value(perm))
        if not improved:
            break
    return perm


def _progress(problem: Problem, cfg: WeightMatchingCfg, start: int, starts: int) -> tqdm:
    """A bar on a terminal once one start has run 2 s (large layers), with an estimate for
    `max_iter` sweeps (most stop far sooner: when a sweep improves nothing)."""
    label = "weight matching" + (f" (start {start + 1}/{starts})" if starts > 1 else "")
    return tqdm(
        total=cfg.max_iter * len(problem.spec.groups),
        desc=label,
        unit="group",
        delay=2.0,
        disable=None,  # off where stderr is not a terminal (pipelines, logs)
        leave=False,
    )


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
    scorer = Scorer(problem.spec, problem.ref, problem.other)
    for k, start in enumerate(starts):
        history: list[float] = []
        with _progress(problem, cfg, k, len(starts)) as bar:
            perm = _sweeps(problem, start, cfg, gen, history, scorer, bar)
        traces.append(history)
        if history[-1] > best_value:
            best, best_value = perm, history[-1]
    return best, traces


def weight_matching(problem: Problem, cfg: WeightMatchingCfg, init: Perm | None = None) -> Perm:
    return weight_matching_trace(problem, cfg, init)[0]
