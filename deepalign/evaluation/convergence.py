"""Sinkhorn re-basin from three starts: how many steps a learned start saves.

Per test pair, Sinkhorn re-basin runs from the identity (zero logits), from weight matching's
permutation (init_scale x one-hot) and from DEEP-ALIGN's logits; the hard permutation after
each step count of a grid is scored by its test loss barrier. The target is the barrier the
identity start reaches after `align.sinkhorn.steps` (plain Sinkhorn's full run in the align
stage; the grid may go further); each start's cost to
reach it is its steps and its wall time, the start itself (weight matching, DEEP-ALIGN's
forward pass) included.

The DEEP-ALIGN start also says where the model errs: per hidden group, the share of units on
which its own permutation (step 0) agrees with the refined one (last step), and the barrier
when that group alone takes the refined permutation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from deepalign.config import MAX_POINTS, GridPoints, Name, Positive, between, invalid
from deepalign.core.data import Dataset
from deepalign.core.lmc import barriers, interpolate
from deepalign.core.permspec import Perm, apply_permutation
from deepalign.methods import MethodsCfg, Problem, align_all
from deepalign.methods.sinkhorn import sinkhorn_trajectory
from deepalign.zoo.store import Zoo

STARTS = ("identity", "weight_matching", "deep_align")


@dataclass(frozen=True)
class ConvergeCfg:
    """Section `converge` of params.yaml."""

    archs: list[Name]
    pairs: Positive  # the first K test pairs of the align stage
    steps: list[Annotated[int, between(0, MAX_POINTS)]]  # step counts scored, ascending
    points: GridPoints  # lambda grid of each barrier

    def __post_init__(self) -> None:
        if not self.steps or sorted(set(self.steps)) != list(self.steps):
            raise invalid("steps", self.steps, "distinct step counts in ascending order")


def _starts(problems: list[Problem], cfg: MethodsCfg) -> dict[str, list]:
    """Each start's answer per pair (None: the identity) and its seconds per pair."""
    found = {m: align_all(m, problems, cfg) for m in ("weight_matching", "deep_align")}
    return {
        "identity": [(None, 0.0)] * len(problems),
        **{m: [(r.answer, r.seconds) for r in results] for m, results in found.items()},
    }


def refine_rows(
    name: str, zoo: Zoo, data: Dataset, methods: MethodsCfg, cfg: ConvergeCfg
) -> tuple[list[dict], list[dict]]:
    """One row per (start, pair, steps): the loss barrier and the seconds spent so far; and
    one row per (pair, hidden group) diagnosing DEEP-ALIGN's own permutation. The descents of
    every start and pair run at once (seconds per pair: each descent's share, plus its start)."""
    pairs = zoo.pairs("test", cfg.pairs)
    problems = [
        Problem.of(zoo.nets[i], zoo.nets[j], zoo.arch, data.train.of_networks(i)) for i, j in pairs
    ]
    sinkhorn = dataclasses.replace(methods.sinkhorn, steps=cfg.steps[-1])
    begun = _starts(problems, methods)
    inits = [answer for start in STARTS for answer, _ in begun[start]]
    marks = sinkhorn_trajectory(problems * len(STARTS), sinkhorn, inits, cfg.steps)
    barrier = _memo_barrier(zoo, data, cfg.points)
    rows, layers = [], []
    for s, start in enumerate(STARTS):
        for k, (i, j) in enumerate(pairs):
            at = s * len(pairs) + k  # this descent's place in the batch
            for steps, perms, seconds in marks:
                rows.append(
                    {
                        "arch": name,
                        "method": start,  # the start: a series in DVC plots
                        "pair": k,
                        "steps": steps,
                        "loss_barrier": barrier((i, j), perms[at]),
                        "seconds": begun[start][k][1] + seconds,
                    }
                )
            if start == "deep_align":
                own, refined = marks[0][1][at], marks[-1][1][at]
                layers += _layer_rows(zoo, (i, j), own, refined, data, cfg.points, k)
    return rows, layers


def _memo_barrier(zoo: Zoo, data: Dataset, points: int) -> Callable[[tuple[int, int], Perm], float]:
    """`_barrier` that scores each (pair, permutation) once: starts often stop moving before
    the last step counts of the grid."""
    seen: dict[tuple, float] = {}

    def barrier(pair: tuple[int, int], perm: Perm) -> float:
        key = (pair, *(tuple(p.tolist()) for _, p in sorted(perm.items())))
        if key not in seen:
            seen[key] = _barrier(zoo, pair, perm, data, points)
        return seen[key]

    return barrier


def _barrier(zoo: Zoo, pair: tuple[int, int], perm: Perm, data: Dataset, points: int) -> float:
    aligned = apply_permutation(zoo.nets[pair[1]], perm, zoo.arch.spec)
    split = data.test.of_networks(pair[0])
    curve = interpolate(zoo.arch, zoo.nets[pair[0]], aligned, split, points)
    return barriers(curve)["loss_barrier"]


def _layer_rows(
    zoo: Zoo,
    pair: tuple[int, int],
    own: Perm,
    refined: Perm,
    data: Dataset,
    points: int,
    k: int,
) -> list[dict]:
    """Per group: agreement of DEEP-ALIGN's permutation with the refined one, and the barrier
    with that group alone replaced by the refined permutation."""
    return [
        {
            "pair": k,
            "group": g,
            "agreement": (own[g] == refined[g]).double().mean().item(),
            "loss_barrier_group_refined": _barrier(zoo, pair, own | {g: refined[g]}, data, points),
        }
        for g in own
    ]


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def summarize_layers(layers: list[dict]) -> dict[str, dict]:
    """Per hidden group: mean agreement with the refined permutation, and the mean barrier
    with that group refined alone."""
    out = {}
    for g in dict.fromkeys(r["group"] for r in layers):
        mine = [r for r in layers if r["group"] == g]
        out[g] = {
            "agreement": _mean(mine, "agreement"),
            "loss_barrier_group_refined": _mean(mine, "loss_barrier_group_refined"),
        }
    return out


def summarize_convergence(rows: list[dict], steps: list[int], full_run: int) -> dict[str, dict]:
    """Per start: mean barrier per step count, and the steps and seconds to reach the target
    (the identity start's mean barrier after `full_run` steps)."""
    if full_run not in steps:
        raise invalid("steps", steps, f"a grid holding align.sinkhorn.steps ({full_run})")

    def at(start: str, k: int) -> list[dict]:
        return [r for r in rows if r["method"] == start and r["steps"] == k]

    target = _mean(at("identity", full_run), "loss_barrier")
    out: dict[str, dict] = {"target_loss_barrier": {"value": target, "steps": full_run}}
    for start in STARTS:
        curve = {k: _mean(at(start, k), "loss_barrier") for k in steps}
        reached = next((k for k in steps if curve[k] <= target + 1e-12), None)
        out[start] = {
            "reached": reached is not None,
            "steps_to_target": reached if reached is not None else steps[-1],
            "seconds_to_target": _mean(
                at(start, reached if reached is not None else steps[-1]), "seconds"
            ),
            "final_loss_barrier": curve[steps[-1]],
            "loss_barrier": {str(k): v for k, v in curve.items()},
        }
    return out
