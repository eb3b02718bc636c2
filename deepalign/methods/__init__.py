"""One aligner signature, one registry.

Every method is `run(problem, cfg, init) -> Answer`: it brings `problem.other` into
`problem.ref`'s basis, optionally starting from `init`, the previous step's `Answer`. "a+b"
runs b from a's answer: Sinkhorn reads its scores where it has them (DEEP-ALIGN's), every
other method its permutation (the Hungarian solution of those scores).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deepalign.config import invalid
from deepalign.core.assignment import Answer, Scores
from deepalign.core.permspec import Perm, apply_permutation, identity
from deepalign.core.weightspace import WeightSpace
from deepalign.errors import DeepAlignError
from deepalign.methods.activation_matching import ActivationMatchingCfg, activation_matching
from deepalign.methods.learned import DeepAlignCfg, deep_align, deep_align_batch
from deepalign.methods.problem import Problem, solve_lap
from deepalign.methods.sinkhorn import SinkhornCfg, sinkhorn, sinkhorn_rebasin
from deepalign.methods.ste import SteCfg, ste
from deepalign.methods.weight_matching import WeightMatchingCfg, objective, weight_matching

__all__ = [
    "ALIGNERS",
    "AlignResult",
    "Aligner",
    "Answer",
    "Method",
    "MethodsCfg",
    "Problem",
    "align",
    "check_methods",
    "sinkhorn",
    "solve_lap",
]


@dataclass(frozen=True)
class MethodsCfg:
    """Settings of every method, one sub-section each in params.yaml."""

    weight_matching: WeightMatchingCfg
    activation_matching: ActivationMatchingCfg
    ste: SteCfg
    sinkhorn: SinkhornCfg
    deep_align: DeepAlignCfg


def naive(problem: Problem, cfg: Any, init: Answer | None = None) -> Answer:
    """No alignment: the identity (or the given start)."""
    return init or Answer(hard=identity(problem.spec))


def _from_permutation(fn: Callable[[Problem, Any, Perm | None], Perm]) -> Callable[..., Answer]:
    """A method that starts from a permutation and finds one, as a registry entry."""

    def run(problem: Problem, cfg: Any, init: Answer | None = None) -> Answer:
        return Answer(hard=fn(problem, cfg, init.perm if init else None))

    return run


@dataclass(frozen=True)
class Aligner:
    """A registered method: one pair at a time, and all pairs at once where it can."""

    run: Callable[[Problem, Any, Answer | None], Answer]
    batch: Callable[[WeightSpace, WeightSpace, Any], Scores] | None = None  # -> {g: (K, n, n)}


ALIGNERS: dict[str, Aligner] = {
    "naive": Aligner(naive),
    "weight_matching": Aligner(_from_permutation(weight_matching)),
    "activation_matching": Aligner(_from_permutation(activation_matching)),
    "ste": Aligner(_from_permutation(ste)),
    "sinkhorn": Aligner(sinkhorn_rebasin),
    "deep_align": Aligner(deep_align, batch=deep_align_batch),
}


@dataclass(frozen=True)
class Method:
    """A registered aligner or an 'a+b' chain (b starts from a's answer): the one parse of a
    method name, and the one place its steps find their settings."""

    name: str
    steps: tuple[str, ...]

    @classmethod
    def parse(cls, name: str | Method) -> Method:
        """'weight_matching+sinkhorn' -> its steps, each a known aligner, or a clear error."""
        if isinstance(name, Method):
            return name
        steps = tuple(name.split("+"))
        for step in steps:
            if step not in ALIGNERS:
                raise DeepAlignError(f"unknown method '{step}' (known: {', '.join(ALIGNERS)})")
        return cls(name, steps)

    def settings(self, cfg: MethodsCfg | None) -> dict[str, Any]:
        """Each step's section of `align` (None for a step without settings, like naive)."""
        return {s: getattr(cfg, s, None) for s in self.steps}

    def rest(self) -> Method:
        """The chain after its first step (naive when nothing follows)."""
        steps = self.steps[1:] or ("naive",)
        return Method("+".join(steps), steps)


def check_methods(key: str, methods: list[str]) -> None:
    """A params list of method names, each parsed, or an error naming the key."""
    for method in methods:
        try:
            Method.parse(method)
        except DeepAlignError as e:
            raise invalid(key, method, f"a known method or 'a+b' chain; {e}") from e


@dataclass(frozen=True)
class AlignResult:
    perm: Perm
    seconds: float  # wall time of the alignment alone
    objective: float  # <ref, aligned other>, the weight-matching objective


def align(
    method: str | Method, problem: Problem, cfg: MethodsCfg, init: Answer | None = None
) -> AlignResult:
    """Run one (possibly chained) method on one pair and time it; `init` seeds the first step."""
    answer = init
    start = time.perf_counter()
    for step, settings in Method.parse(method).settings(cfg).items():
        answer = ALIGNERS[step].run(problem, settings, answer)
    perm = answer.perm  # type: ignore[union-attr]  (the Hungarian solve of scores is timed)
    seconds = time.perf_counter() - start
    value = objective(problem.ref, apply_permutation(problem.other, perm, problem.spec))
    return AlignResult(perm, seconds, value)
