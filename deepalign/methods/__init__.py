"""One aligner signature, one registry.

Every method is `run(problem, cfg, init) -> Answer`: it brings `problem.other` into
`problem.ref`'s basis, optionally starting from `init`, the previous step's `Answer`. "a+b"
runs b from a's answer: Sinkhorn reads its scores where it has them (DEEP-ALIGN's), every
other method its permutation (the Hungarian solution of those scores). A method that can
align many pairs at once (DEEP-ALIGN's forward pass, Sinkhorn re-basin's batched descent) also
registers `batch(problems, cfg, inits) -> answers`; `align_all` uses it for every pair of a
chain's step together and shares its time evenly among them.

`ALIGNERS` is the one declaration of the methods: a method's settings dataclass, given in its
entry, is its sub-section `align.<name>` of params.yaml (`MethodsCfg`, `settings_keys`), and
the command line and the params lists accept exactly its names. A new aligner is its module
and its line here.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from deepalign.config import invalid
from deepalign.core.assignment import Answer
from deepalign.core.permspec import Perm, apply_permutation, identity
from deepalign.errors import DeepAlignError
from deepalign.methods.activation_matching import ActivationMatchingCfg, activation_matching
from deepalign.methods.learned import DeepAlignCfg, deep_align, deep_align_problems
from deepalign.methods.problem import Problem, solve_lap
from deepalign.methods.sinkhorn import (
    SinkhornCfg,
    sinkhorn,
    sinkhorn_rebasin,
    sinkhorn_rebasin_batch,
)
from deepalign.methods.ste import SteCfg, ste, ste_batch
from deepalign.methods.weight_matching import WeightMatchingCfg, objective, weight_matching
from deepalign.threads import per_pair

__all__ = [
    "ALIGNERS",
    "AlignResult",
    "Aligner",
    "Answer",
    "Method",
    "MethodsCfg",
    "Problem",
    "align",
    "align_all",
    "check_methods",
    "settings_class",
    "settings_keys",
    "sinkhorn",
    "solve_lap",
]


def naive(problem: Problem, cfg: Any, init: Answer | None = None) -> Answer:
    """No alignment: the identity (or the given start)."""
    return init or Answer(hard=identity(problem.spec))


def _from_permutation(fn: Callable[[Problem, Any, Perm | None], Perm]) -> Callable[..., Answer]:
    """A method that starts from a permutation and finds one, as a registry entry."""

    def run(problem: Problem, cfg: Any, init: Answer | None = None) -> Answer:
        return Answer(hard=fn(problem, cfg, init.perm if init else None))

    return run


Batch = Callable[[Sequence[Problem], Any, Sequence[Answer | None]], list[Answer]]


@dataclass(frozen=True)
class Aligner:
    """A registered method: one pair at a time, and all pairs at once where it can."""

    run: Callable[[Problem, Any, Answer | None], Answer]
    settings: type | None = None  # its settings' dataclass: section `align.<name>`
    batch: Batch | None = None  # many pairs of one architecture at once, one answer each
    warm_up: bool = False  # one untimed call before timing (DEEP-ALIGN loads its checkpoint)
    iterative: bool = False  # optimises each pair over many steps: the slow methods


ALIGNERS: dict[str, Aligner] = {
    "naive": Aligner(naive),
    "weight_matching": Aligner(_from_permutation(weight_matching), WeightMatchingCfg),
    "activation_matching": Aligner(_from_permutation(activation_matching), ActivationMatchingCfg),
    "ste": Aligner(ste, SteCfg, batch=ste_batch, iterative=True),
    "sinkhorn": Aligner(
        sinkhorn_rebasin, SinkhornCfg, batch=sinkhorn_rebasin_batch, iterative=True
    ),
    "deep_align": Aligner(deep_align, DeepAlignCfg, batch=deep_align_problems, warm_up=True),
}


def _with_settings() -> dict[str, type]:
    """Each registered aligner that has settings, and their dataclass."""
    return {name: a.settings for name, a in ALIGNERS.items() if a.settings is not None}


def settings_keys() -> tuple[str, ...]:
    """The params keys of the registered aligners' settings: `align.<name>` each."""
    return tuple(f"align.{name}" for name in _with_settings())


def settings_class() -> type:
    """The settings of every registered aligner as one frozen dataclass: a field (and a
    sub-section of `align`) per aligner with settings, in registry order."""
    return dataclasses.make_dataclass(
        "MethodsCfg",
        list(_with_settings().items()),
        frozen=True,
        namespace={"__module__": __name__, "__doc__": "Every method's settings (`align`)."},
    )


MethodsCfg = settings_class()


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

    @property
    def iterative(self) -> bool:
        """Whether a step optimises each pair over many steps (STE, Sinkhorn re-basin)."""
        return any(ALIGNERS[s].iterative for s in self.steps)

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
    seconds: float  # wall time of the alignment alone (a batched step's share of it)
    objective: float  # <ref, aligned other>, the weight-matching objective
    answer: Answer  # what the last step returned (DEEP-ALIGN: its scores)


def _step_all(
    aligner: Aligner, problems: Sequence[Problem], settings: Any, answers: list[Answer | None]
) -> tuple[list[Answer], list[float]]:
    """One step of a chain on every pair: all at once where the method can, else one by one;
    each pair's answer and seconds."""
    if aligner.batch is None:
        out, seconds = [], []
        with per_pair():
            for problem, answer in zip(problems, answers):
                start = time.perf_counter()
                out.append(aligner.run(problem, settings, answer))
                seconds.append(time.perf_counter() - start)
        return out, seconds
    if aligner.warm_up:
        aligner.batch(problems[:1], settings, answers[:1])
    start = time.perf_counter()
    out = aligner.batch(problems, settings, answers)
    share = (time.perf_counter() - start) / len(problems)
    return out, [share] * len(problems)


def align_all(
    method: str | Method,
    problems: Sequence[Problem],
    cfg: MethodsCfg,
    inits: Sequence[Answer | None] | None = None,
) -> list[AlignResult]:
    """Run one (possibly chained) method on pairs of one architecture and time each pair;
    `inits` seed the first step. The Hungarian solve of scores is timed per pair."""
    answers: list[Answer | None] = list(inits) if inits is not None else [None] * len(problems)
    seconds = [0.0] * len(problems)
    for step, settings in Method.parse(method).settings(cfg).items():
        answers, spent = _step_all(ALIGNERS[step], problems, settings, answers)
        seconds = [s + t for s, t in zip(seconds, spent)]
    results = []
    for problem, answer, spent in zip(problems, answers, seconds):
        start = time.perf_counter()
        perm = answer.perm  # type: ignore[union-attr]
        spent += time.perf_counter() - start
        value = objective(problem.ref, apply_permutation(problem.other, perm, problem.spec))
        results.append(AlignResult(perm, spent, value, answer))  # type: ignore[arg-type]
    return results


def align(
    method: str | Method, problem: Problem, cfg: MethodsCfg, init: Answer | None = None
) -> AlignResult:
    """Run one (possibly chained) method on one pair and time it; `init` seeds the first step."""
    return align_all(method, [problem], cfg, [init])[0]
