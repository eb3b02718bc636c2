"""Mode-connectivity curves between aligned networks (Garipov et al. 2018; Tatro et al. 2020):
the `curves` stage's settings, endpoints, scoring against the straight line, and PAM. The
curve itself (parametrisation, fit, evaluation) is `deepalign.core.curves`.

PAM (proximal alternating minimisation, Tatro et al.) alternates fitting theta with
re-aligning B to the curve: weight matching of B against theta + rho * (current B), the
proximal term keeping the permutation near the current one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor

from deepalign.config import (
    MAX_POINTS,
    Count,
    Name,
    NonNegative,
    Positive,
    Steps,
    between,
)
from deepalign.core.arch import Arch
from deepalign.core.curves import (
    CurveEval,
    CurveFitCfg,
    curve_metrics,
    evaluate_curve,
    fit_curve,
    midpoint,
)
from deepalign.core.data import Split, reset_images_of
from deepalign.core.permspec import Perm, apply_permutation
from deepalign.core.weightspace import WeightSpace
from deepalign.methods import Problem, check_methods
from deepalign.methods.weight_matching import WeightMatchingCfg, weight_matching

PROBE_POINTS = 9  # t grid of PAM's objective: mean training loss along each curve


@dataclass(frozen=True)
class PamCfg:
    rounds: Steps  # curve fit / re-alignment alternations at most
    rho: NonNegative  # proximal weight: how strongly the permutation stays put
    eval_examples: Positive  # training images for the objective that accepts a round


@dataclass(frozen=True)
class PamState:
    """What PAM holds after its start or a round, for K pairs."""

    perms: Perm  # B's permutations, (K, n) per group
    theta: WeightSpace  # the control points (K, ...)
    objective: Tensor  # (K,): mean probe loss along each curve, as PAM measured it


def _realign(arch: Arch, theta: WeightSpace, b: WeightSpace, perm: Perm, rho: float) -> Perm:
    """Weight matching of B against theta + rho * (B as currently aligned), for one pair."""
    spec = arch.spec
    current = apply_permutation(b, perm, spec)
    target = b.replace([t + rho * c for t, c in zip(theta.tensors(), current.tensors())])
    cfg = WeightMatchingCfg(max_iter=100, restarts=0, seed=0)
    return weight_matching(Problem(spec, target, b, arch), cfg, perm)


def pam(
    arch: Arch,
    a: WeightSpace,
    b_raw: WeightSpace,
    perms: Perm,
    data: Split,
    fit_cfg: CurveFitCfg,
    cfg: PamCfg,
) -> tuple[Perm, WeightSpace, list[PamState]]:
    """PAM for K pairs; a round is kept (per pair) only if it lowers the training objective.

    Returns the final permutations of B ((K, n) per group), control points, and what PAM
    held after its start and after each round.
    """
    probe = Split(data.x[: cfg.eval_examples], data.y[: cfg.eval_examples])
    b = apply_permutation(b_raw, perms, arch.spec)
    theta = fit_curve(arch, a, b, data, fit_cfg)
    best = evaluate_curve(arch, fit_cfg.kind, a, theta, b, probe, PROBE_POINTS).loss.mean(1)
    history = [PamState(perms, theta, best)]  # best: (K,)
    for _ in range(cfg.rounds):
        new = [
            _realign(arch, theta[k], b_raw[k], {g: p[k] for g, p in perms.items()}, cfg.rho)
            for k in range(a.batch_size)
        ]
        new_perms = {g: torch.stack([p[g] for p in new]) for g in perms}
        if all(torch.equal(new_perms[g], perms[g]) for g in perms):
            break
        new_b = apply_permutation(b_raw, new_perms, arch.spec)
        new_theta = fit_curve(arch, a, new_b, data, fit_cfg, theta=_carry(theta))
        ends = (a, new_theta, new_b)
        value = evaluate_curve(arch, fit_cfg.kind, *ends, probe, PROBE_POINTS).loss.mean(1)
        better = value < best  # (K,): accept per pair
        perms = {g: torch.where(better[:, None], new_perms[g], perms[g]) for g in perms}
        theta = _select(better, new_theta, theta)
        best = torch.minimum(value, best)
        history.append(PamState(perms, theta, best))
        if not better.any():
            break
    return perms, theta, history


def _carry(theta: WeightSpace) -> WeightSpace:
    return theta.map(torch.clone)


def _select(mask: Tensor, x: WeightSpace, y: WeightSpace) -> WeightSpace:
    """Per pair, x where mask else y."""

    def pick(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(mask.view(-1, *[1] * (a.ndim - 1)), a, b)

    return x.replace([pick(a, b) for a, b in zip(x.tensors(), y.tensors())])


@dataclass(frozen=True)
class CurvesCfg:
    """Section `curves` of params.yaml."""

    archs: list[Name]
    methods: list[str]  # alignments (from the align stage) whose endpoints curves join
    pam_from: str  # method whose alignment PAM starts from; "" skips PAM
    pairs: Count  # first K of the align stage's test pairs
    points: Annotated[int, between(2, MAX_POINTS)]  # t grid of the evaluation
    bn_reset_images: Count  # training images for every curve network's BatchNorm statistics
    # (networks with BatchNorm only; 0: keep the interpolated running statistics)
    fit: CurveFitCfg
    pam: PamCfg

    def reset_images(self, train: Split) -> Tensor | None:
        return reset_images_of(train, self.bn_reset_images)

    def __post_init__(self) -> None:
        check_methods("methods", self.methods)
        if self.pam_from:
            check_methods("pam_from", [self.pam_from])


@dataclass(frozen=True)
class CurveResult:
    curve: CurveEval
    linear: CurveEval
    seconds: float  # fitting time for all K pairs
    theta: WeightSpace  # the fitted control points (K, ...)


def endpoints(
    arch: Arch, nets: WeightSpace, pairs: list[tuple[int, int]], perms: dict[str, Tensor]
) -> tuple[WeightSpace, WeightSpace, WeightSpace]:
    """A, B before alignment, and B aligned, for the first K pairs: batched (K, ...)."""
    a = nets[torch.tensor([i for i, _ in pairs])]
    b = nets[torch.tensor([j for _, j in pairs])]
    k = len(pairs)
    return a, b, apply_permutation(b, {g: p[:k] for g, p in perms.items()}, arch.spec)


def fit_and_evaluate(
    arch: Arch, a: WeightSpace, b: WeightSpace, data_train: Split, data_test: Split, cfg: CurvesCfg
) -> CurveResult:
    """A curve per pair, scored against the straight line on the same t grid."""
    start = time.perf_counter()
    theta = fit_curve(arch, a, b, data_train, cfg.fit)
    seconds = time.perf_counter() - start
    return _scored(arch, a, theta, b, data_train, data_test, cfg, seconds)


def _scored(
    arch: Arch,
    a: WeightSpace,
    theta: WeightSpace,
    b: WeightSpace,
    data_train: Split,
    data_test: Split,
    cfg: CurvesCfg,
    seconds: float,
) -> CurveResult:
    """The fitted curves and the straight lines, scored on the test split."""
    reset = cfg.reset_images(data_train)
    curve = evaluate_curve(arch, cfg.fit.kind, a, theta, b, data_test, cfg.points, reset)
    linear = evaluate_curve(arch, cfg.fit.kind, a, midpoint(a, b), b, data_test, cfg.points, reset)
    return CurveResult(curve, linear, seconds, theta)


def pam_and_evaluate(
    arch: Arch,
    a: WeightSpace,
    b_raw: WeightSpace,
    perms: Perm,
    data_train: Split,
    data_test: Split,
    cfg: CurvesCfg,
) -> tuple[CurveResult, list[PamState]]:
    """PAM from the given alignment, then the same scoring as `fit_and_evaluate`."""
    start = time.perf_counter()
    perms, theta, history = pam(arch, a, b_raw, perms, data_train, cfg.fit, cfg.pam)
    seconds = time.perf_counter() - start
    b = apply_permutation(b_raw, perms, arch.spec)
    return _scored(arch, a, theta, b, data_train, data_test, cfg, seconds), history


def summarize_curves(result: CurveResult) -> dict[str, float]:
    """Mean over pairs of the curve's and the straight line's metrics."""
    curve, linear = curve_metrics(result.curve), curve_metrics(result.linear)
    out = {k: v.mean().item() for k, v in curve.items()}
    out |= {f"linear_{k}": v.mean().item() for k, v in linear.items()}
    out["min_acc_worst_pair"] = curve["min_acc"].min().item()
    out["seconds_to_fit"] = result.seconds
    return out


def curve_rows(results: dict[str, CurveResult]) -> list[dict]:
    """Mean test accuracy and loss along each method's curve and straight line, per t."""
    rows = []
    for method, r in results.items():
        columns = {
            "curve_acc": r.curve.acc.mean(0),
            "linear_acc": r.linear.acc.mean(0),
            "curve_loss": r.curve.loss.mean(0),
            "linear_loss": r.linear.loss.mean(0),
        }
        for k, t in enumerate(r.curve.t.tolist()):
            rows.append(
                {"method": method, "t": round(t, 4)}
                | {name: round(c[k].item(), 6) for name, c in columns.items()}
            )
    return rows
