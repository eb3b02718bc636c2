"""Mode-connectivity curves between aligned networks (Garipov et al. 2018; Tatro et al. 2020).

A curve phi(t), t in [0, 1], joins two fixed endpoints A and B through one trainable control
point theta:
  bezier:   phi(t) = (1-t)^2 A + 2t(1-t) theta + t^2 B
  polyline: phi(t) = A + 2t (theta - A) for t <= 1/2, theta + (2t-1)(B - theta) after
With theta = (A + B) / 2 both are the straight line. Many pairs train at once: every tensor
has a leading pair dimension, and one batched forward pass (`forward_batched`) runs them all.

PAM (proximal alternating minimisation, Tatro et al.) alternates fitting theta with
re-aligning B to the curve: weight matching of B against theta + rho * (current B), the
proximal term keeping the permutation near the current one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor

from deepalign.config import (
    MAX_POINTS,
    Count,
    NonNegative,
    Positive,
    PositiveFloat,
    Seed,
    Steps,
    between,
    one_of,
)
from deepalign.core.arch import Arch, as_input
from deepalign.core.data import Split
from deepalign.core.lmc import evaluate_networks, reset_statistics
from deepalign.core.permspec import Perm, apply_permutation
from deepalign.core.weightspace import WeightSpace, lerp
from deepalign.errors import DeepAlignError
from deepalign.methods import Problem, check_methods
from deepalign.methods.weight_matching import WeightMatchingCfg, weight_matching

KINDS = ("bezier", "polyline")
PROBE_POINTS = 9  # t grid of PAM's objective: mean training loss along each curve


@dataclass(frozen=True)
class CurveFitCfg:
    kind: Annotated[str, one_of(*KINDS)]  # bezier | polyline
    epochs: Steps  # passes over the training split
    batch_size: Positive
    lr: PositiveFloat
    seed: Seed


@dataclass(frozen=True)
class PamCfg:
    rounds: Steps  # curve fit / re-alignment alternations at most
    rho: NonNegative  # proximal weight: how strongly the permutation stays put
    eval_examples: Positive  # training images for the objective that accepts a round


def _coefficients(kind: str, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Weights of A, theta and B at t: each (K,)."""
    if kind == "bezier":
        return (1 - t) ** 2, 2 * t * (1 - t), t**2
    if kind == "polyline":
        first = t <= 0.5
        a = torch.where(first, 1 - 2 * t, torch.zeros_like(t))
        b = torch.where(first, torch.zeros_like(t), 2 * t - 1)
        return a, 1 - a - b, b
    raise DeepAlignError(f"unknown curve kind '{kind}' (known: {', '.join(KINDS)})")


def point(kind: str, a: WeightSpace, theta: WeightSpace, b: WeightSpace, t: Tensor) -> WeightSpace:
    """phi(t) for K pairs at once: t (K,), every WeightSpace batched (K, ...)."""
    ca, ct, cb = _coefficients(kind, t)

    def mix(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
        shape = (-1, *[1] * (x.ndim - 1))
        return ca.view(shape) * x + ct.view(shape) * y + cb.view(shape) * z

    return a.replace([mix(*ts) for ts in zip(a.tensors(), theta.tensors(), b.tensors())])


def midpoint(a: WeightSpace, b: WeightSpace) -> WeightSpace:
    return lerp(a, b, 0.5)


def fit(
    arch: Arch,
    a: WeightSpace,
    b: WeightSpace,
    data: Split,
    cfg: CurveFitCfg,
    theta: WeightSpace | None = None,
) -> WeightSpace:
    """Train the control points of K curves (endpoints fixed); one t per batch and pair."""
    gen = torch.Generator().manual_seed(cfg.seed)
    params = [t.detach().clone().requires_grad_() for t in (theta or midpoint(a, b)).tensors()]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    a, b = a.detach(), b.detach()
    x, y = as_input(arch, data.x), data.y
    for _ in range(cfg.epochs):
        for idx in torch.randperm(len(y), generator=gen).split(cfg.batch_size):
            t = torch.rand(a.batch_size, generator=gen)
            phi = point(cfg.kind, a, a.replace(params), b, t)
            # BatchNorm: batch statistics while fitting (Garipov et al.), reset to evaluate
            logits = arch.forward_batched(phi, x[idx], train=True)  # (K, b, C)
            loss = F.cross_entropy(logits.flatten(0, 1), y[idx].repeat(a.batch_size))
            opt.zero_grad(set_to_none=True)
            (loss * a.batch_size).backward()  # each pair's own mean loss
            opt.step()
    return a.replace([p.detach() for p in params])


@dataclass(frozen=True)
class CurveEval:
    t: Tensor  # (T,)
    loss: Tensor  # (K, T)
    acc: Tensor  # (K, T)


@torch.no_grad()
def evaluate(
    arch: Arch,
    kind: str,
    a: WeightSpace,
    theta: WeightSpace,
    b: WeightSpace,
    split: Split,
    points: int,
    reset: Tensor | None = None,
) -> CurveEval:
    """Loss and accuracy of every pair's curve on a grid of t; with `reset` images, every
    network on a curve gets BatchNorm statistics of its own."""
    ts = torch.linspace(0, 1, points)
    k = a.batch_size
    losses, accs = [], []
    for t in ts:
        phi = reset_statistics(arch, point(kind, a, theta, b, t.expand(k)), reset)
        loss, acc = evaluate_networks(arch, phi, split)
        losses.append(loss)
        accs.append(acc)
    return CurveEval(ts, torch.stack(losses, 1), torch.stack(accs, 1))


def curve_metrics(ev: CurveEval) -> dict[str, Tensor]:
    """Per pair: mean/min accuracy and max loss along the curve, and its loss barrier."""
    line = (1 - ev.t) * ev.loss[:, :1] + ev.t * ev.loss[:, -1:]
    return {
        "mean_acc": ev.acc.mean(1),
        "min_acc": ev.acc.min(1).values,
        "max_loss": ev.loss.max(1).values,
        "curve_barrier": (ev.loss - line).max(1).values.clamp_min(0),
    }


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
) -> tuple[Perm, WeightSpace, list[float]]:
    """PAM for K pairs; a round is kept only if it lowers the training objective.

    Returns the final permutations of B ((K, n) per group), control points, and the mean
    objective after each accepted step (never increasing).
    """
    probe = Split(data.x[: cfg.eval_examples], data.y[: cfg.eval_examples])
    b = apply_permutation(b_raw, perms, arch.spec)
    theta = fit(arch, a, b, data, fit_cfg)
    best = evaluate(arch, fit_cfg.kind, a, theta, b, probe, PROBE_POINTS).loss.mean(1)  # (K,)
    history = [best.mean().item()]
    for _ in range(cfg.rounds):
        new = [
            _realign(arch, theta[k], b_raw[k], {g: p[k] for g, p in perms.items()}, cfg.rho)
            for k in range(a.batch_size)
        ]
        new_perms = {g: torch.stack([p[g] for p in new]) for g in perms}
        if all(torch.equal(new_perms[g], perms[g]) for g in perms):
            break
        new_b = apply_permutation(b_raw, new_perms, arch.spec)
        new_theta = fit(arch, a, new_b, data, fit_cfg, theta=_carry(theta))
        ends = (a, new_theta, new_b)
        value = evaluate(arch, fit_cfg.kind, *ends, probe, PROBE_POINTS).loss.mean(1)
        better = value < best  # (K,): accept per pair
        perms = {g: torch.where(better[:, None], new_perms[g], perms[g]) for g in perms}
        theta = _select(better, new_theta, theta)
        best = torch.minimum(value, best)
        history.append(best.mean().item())
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

    archs: list[str]
    methods: list[str]  # alignments (from the align stage) whose endpoints curves join
    pam_from: str  # method whose alignment PAM starts from; "" skips PAM
    pairs: Count  # first K of the align stage's test pairs
    points: Annotated[int, between(2, MAX_POINTS)]  # t grid of the evaluation
    bn_reset_images: Count  # training images for every curve network's BatchNorm statistics
    # (networks with BatchNorm only; 0: keep the interpolated running statistics)
    fit: CurveFitCfg
    pam: PamCfg

    def reset_images(self, train: Split) -> Tensor | None:
        return train.x[: self.bn_reset_images] if self.bn_reset_images else None

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
    theta = fit(arch, a, b, data_train, cfg.fit)
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
    curve = evaluate(arch, cfg.fit.kind, a, theta, b, data_test, cfg.points, reset)
    linear = evaluate(arch, cfg.fit.kind, a, midpoint(a, b), b, data_test, cfg.points, reset)
    return CurveResult(curve, linear, seconds, theta)


def pam_and_evaluate(
    arch: Arch,
    a: WeightSpace,
    b_raw: WeightSpace,
    perms: Perm,
    data_train: Split,
    data_test: Split,
    cfg: CurvesCfg,
) -> tuple[CurveResult, list]:
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
