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
and its line here. A step whose settings have `steps` may carry its own step count:
"deep_align+sinkhorn@10" refines for 10 steps instead of `align.sinkhorn.steps`.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from deepalign.config import MAX_STEPS, invalid
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
    "budgeted",
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
    """A registered aligner or an 'a+b' chain (b starts from a's answer), each step optionally
    with a step count, 'sinkhorn@10': the one parse of a method name, and the one place its
    steps find their settings."""

    name: str
    steps: tuple[str, ...]  # each step's registered aligner
    budgets: tuple[int | None, ...]  # each step's '@k' (None: the step count of its settings)

    @classmethod
    def parse(cls, name: str | Method) -> Method:
        """'deep_align+sinkhorn@10' -> its steps, each a known aligner with an optional step
        count for one whose settings have `steps`, or a clear error."""
        if isinstance(name, Method):
            return name
        parsed = [_step(name, step) for step in name.split("+")]
        return cls(name, tuple(s for s, _ in parsed), tuple(k for _, k in parsed))

    def settings(self, cfg: MethodsCfg | None) -> dict[str, Any]:
        """Each step's section of `align` (None for a step without settings, like naive), with
        its '@k' as `steps`."""
        found = {s: getattr(cfg, s, None) for s in self.steps}
        for step, k in zip(self.steps, self.budgets):
            if k is not None and found[step] is not None:
                found[step] = dataclasses.replace(found[step], steps=k)
        return found

    @property
    def iterative(self) -> bool:
        """Whether a step optimises each pair over many steps (STE, Sinkhorn re-basin)."""
        return any(ALIGNERS[s].iterative for s in self.steps)

    def rest(self) -> Method:
        """The chain after its first step (naive when nothing follows)."""
        if len(self.steps) == 1:
            return Method("naive", ("naive",), (None,))
        return Method(self.name.split("+", 1)[1], self.steps[1:], self.budgets[1:])


def budgeted() -> list[str]:
    """The registered aligners that take '@k': those whose settings have `steps`."""
    return [
        name
        for name, a in ALIGNERS.items()
        if a.settings is not None and "steps" in {f.name for f in dataclasses.fields(a.settings)}
    ]


def _step(method: str, step: str) -> tuple[str, int | None]:
    """One step of a method name, 'sinkhorn@10' -> ('sinkhorn', 10), or a clear error."""
    aligner, at, k = step.partition("@")
    if aligner not in ALIGNERS:
        raise DeepAlignError(f"unknown method '{aligner}' (known: {', '.join(ALIGNERS)})")
    if not at:
        return aligner, None
    takes = ", ".join(budgeted())
    if aligner not in budgeted():
        raise DeepAlignError(
            f"method '{method}': {aligner} takes no '@k' (a step count: {takes} only)"
        )
    if not re.fullmatch(r"[1-9][0-9]*", k) or int(k) > MAX_STEPS:
        raise DeepAlignError(
            f"method '{method}': '@{k}' is not a step count (a whole number from 1 to "
            f"{MAX_STEPS:,}; {takes} take '@k')"
        )
    return aligner, int(k)


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
