"""One aligner signature, one registry.

Every method is `fn(problem, cfg, init) -> Perm | Scores`: it brings `problem.other` into
`problem.ref`'s basis, optionally starting from `init`. "a+b" runs b from a's answer: as
scores where b can start from scores (SOFT_STARTS), else hardened by the Hungarian algorithm.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deepalign.config import invalid
from deepalign.core.assignment import Scores, harden
from deepalign.core.permspec import Perm, apply_permutation, identity
from deepalign.errors import DeepAlignError
from deepalign.methods.activation_matching import ActivationMatchingCfg, activation_matching
from deepalign.methods.learned import DeepAlignCfg, deep_align, deep_align_batch
from deepalign.methods.problem import Problem, solve_lap
from deepalign.methods.sinkhorn import SinkhornCfg, sinkhorn, sinkhorn_rebasin
from deepalign.methods.ste import SteCfg, ste
from deepalign.methods.weight_matching import WeightMatchingCfg, objective, weight_matching

__all__ = [
    "ALIGNERS",
    "SOFT_STARTS",
    "AlignResult",
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


def naive(problem: Problem, cfg: Any, init: Perm | None = None) -> Perm:
    """No alignment: the identity (or the given start)."""
    return init or identity(problem.spec)


Aligner = Callable[[Problem, Any, Perm | None], Perm | Scores]
ALIGNERS: dict[str, Aligner] = {
    "naive": naive,
    "weight_matching": weight_matching,
    "activation_matching": activation_matching,
    "ste": ste,
    "sinkhorn": sinkhorn_rebasin,
    "deep_align": deep_align,
}
# Methods that can align a whole batch of pairs in one call: fn(refs, others, cfg) -> {g: (K, n, n)}
BATCHED = {"deep_align": deep_align_batch}
# Methods that take a start given as scores (n, n), not only as a permutation (n,)
SOFT_STARTS = {"sinkhorn"}


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
    method: str | Method, problem: Problem, cfg: MethodsCfg, init: Perm | Scores | None = None
) -> AlignResult:
    """Run one (possibly chained) method on one pair and time it; `init` seeds the first step."""
    answer = init
    start = time.perf_counter()
    for step, settings in Method.parse(method).settings(cfg).items():
        given = answer if step in SOFT_STARTS else harden(answer)
        answer = ALIGNERS[step](problem, settings, given)
    perm = harden(answer)
    seconds = time.perf_counter() - start
    value = objective(problem.ref, apply_permutation(problem.other, perm, problem.spec))
    return AlignResult(perm, seconds, value)
