"""The align and evaluate stages' work, as library calls the flows sequence."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from deepalign.config import Count, GridPoints, Name, NonNegative, Positive, Seed, invalid
from deepalign.core.data import DataCfg, Dataset, reset_images_of
from deepalign.core.lmc import Curve, barriers, interpolate
from deepalign.core.permspec import apply_permutation
from deepalign.evaluation.pairs import MethodRun, align_pairs, planted_recoveries
from deepalign.evaluation.stats import paired_bootstrap, summarize_pairs
from deepalign.io import file_digest, fingerprint
from deepalign.methods import Method, MethodsCfg, check_methods
from deepalign.methods.learned import checkpoint_files
from deepalign.zoo.store import Zoo

BARRIER_KEYS = (
    "loss_barrier",
    "loss_barrier_ends",
    "loss_auc",
    "acc_barrier",
    "acc_auc",
    "merged_acc",
)


@dataclass(frozen=True)
class AlignCfg(MethodsCfg):
    """Section `align`: which methods run on which zoo pairs, plus each method's settings."""

    archs: list[Name]  # zoo architectures to align
    methods: list[str]  # registry names; "a+b" refines a's answer with b
    pairs: Count  # test pairs (i, i+1) of the zoo's test split
    planted_pairs: Positive  # test networks aligned to a permuted, perturbed copy of themselves
    planted_noise: NonNegative  # noise std of the copy, relative to each tensor's std
    seed: Seed

    def __post_init__(self) -> None:
        check_methods("methods", self.methods)


@dataclass(frozen=True)
class EvaluateCfg:
    points: GridPoints  # lambda grid, both ends included (odd, so 0.5 is on it)
    compare: list[list[str]]  # [a, b]: paired difference of loss barriers a - b over pairs
    bootstrap: Positive  # resamples of the pairs for the 95% interval
    bn_reset_images: Count  # training images for each interpolated network's BatchNorm
    # statistics (networks with BatchNorm only; 0: keep the interpolated running statistics)

    def __post_init__(self) -> None:
        for i, pair in enumerate(self.compare):
            if len(pair) != 2:
                raise invalid(f"compare[{i}]", pair, "a pair [a, b] of methods")
            check_methods(f"compare[{i}]", pair)


def paired_comparisons(rows: list[dict], cfg: EvaluateCfg) -> dict[str, dict]:
    """Per architecture and [a, b] in cfg.compare: mean of a - b with a bootstrap interval.

    Pairs share networks (ring pairs), so the intervals are somewhat optimistic.
    """
    out: dict[str, dict] = {}
    for arch in dict.fromkeys(r["arch"] for r in rows):
        by_method: dict[str, list[float]] = {}
        for r in rows:
            if r["arch"] == arch:
                by_method.setdefault(r["method"], []).append(r["loss_barrier"])
        out[arch] = {
            f"{a} - {b}": paired_bootstrap(by_method[a], by_method[b], cfg.bootstrap)
            for a, b in cfg.compare
            if a in by_method and b in by_method
        }
    return out


def gap_closed(summary: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per method, the share of weight matching's gap to the best method it closes:
    (WM - X) / (WM - best) of mean loss barriers (best: the lowest of all methods); none
    without weight matching or where it is the best."""
    barrier = {m: v["loss_barrier_mean"] for m, v in summary.items()}
    wm = barrier.get("weight_matching")
    best = min(barrier.values(), default=None)
    if wm is None or wm == best:
        return {}
    return {m: (wm - x) / (wm - best) for m, x in barrier.items()}


def over_weight_matching(summary: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per method, its mean loss barrier over weight matching's; none without weight matching
    or where its barrier is 0."""
    wm = summary.get("weight_matching", {}).get("loss_barrier_mean")
    if not wm:
        return {}
    return {m: v["loss_barrier_mean"] / wm for m, v in summary.items()}


REFINED = "deep_align+sinkhorn"  # the refinement whose step budget the budget curve varies


def refine_budget(method: str, cfg: MethodsCfg, refined: str = REFINED) -> int | None:
    """Where `method` sits on `refined`'s curve of step budgets: its last step's step count
    ('@k', else its settings'), 0 for the chain without that step, None off the curve."""
    parsed, curve = Method.parse(method), Method.parse(refined)
    if parsed.steps == curve.steps[:-1] and not any(parsed.budgets):
        return 0
    if parsed.steps != curve.steps or any(parsed.budgets[:-1]):
        return None
    return parsed.settings(cfg)[curve.steps[-1]].steps


# The code that decides a method's permutations: a change re-runs every method.
_PKG = Path(__file__).parents[1]
ALIGNMENT_CODE = [
    *sorted((_PKG / "methods").glob("*.py")),
    *(_PKG / "core" / f for f in ("assignment.py", "permspec.py", "arch.py")),
    *(_PKG / "methods" / "deep_align" / f for f in ("model.py", "checkpoint.py")),
]


def run_fingerprint(method: str, cfg: AlignCfg, data: DataCfg, zoo: str) -> str:
    """Everything that determines a method's saved alignment (`zoo`: the zoo's `zoo_digest`,
    which covers its networks' bytes)."""
    parsed = Method.parse(method)
    settings = {s: asdict(c) for s, c in parsed.settings(cfg).items() if c is not None}
    files = checkpoint_files(cfg.deep_align) if "deep_align" in parsed.steps else []
    record = {
        "method": method,
        "settings": settings,
        "files": {str(f): file_digest(f) for f in files},
        "pairs": cfg.pairs,
        "planted": [cfg.planted_pairs, cfg.planted_noise, cfg.seed],
        "data": asdict(data),
        "zoo": zoo,
    }
    return fingerprint(record, ALIGNMENT_CODE)


def run_method(method: str, zoo: Zoo, data: Dataset, cfg: AlignCfg) -> MethodRun:
    """Align the test pairs and the planted copies with one method."""
    test = zoo.indices("test")
    pairs = zoo.pairs("test", cfg.pairs)
    perms, seconds, objective = align_pairs(method, zoo, pairs, data.train, cfg)
    planted = planted_recoveries(
        method, zoo, test[: cfg.planted_pairs], data.train, cfg, cfg.planted_noise, cfg.seed
    )
    return MethodRun(method, pairs, perms, seconds, objective, planted)


def pair_curves(
    run: MethodRun, zoo: Zoo, data: Dataset, points: int, reset_images: int = 0
) -> list[Curve]:
    """Test-split interpolation curve of every aligned pair (BatchNorm statistics recomputed
    on `reset_images` training images for every network on the line, where it has some)."""
    reset = reset_images_of(data.train, reset_images)
    curves = []
    for k, (i, j) in enumerate(run.pairs):
        aligned = apply_permutation(zoo.nets[j], run.perm(k), zoo.arch.spec)
        split = data.test.of_networks(i)
        curves.append(interpolate(zoo.arch, zoo.nets[i], aligned, split, points, reset))
    return curves


def score_methods(
    zoo: Zoo, data: Dataset, methods: list[str], settings: AlignCfg, points: int, label: str
) -> tuple[dict[str, dict], dict[str, list[Curve]]]:
    """Every method on the zoo's test pairs: barrier metrics, and the lines behind them."""
    summary, lines = {}, {}
    for method in tqdm(methods, desc=label, unit="method", mininterval=5.0):
        run = run_method(method, zoo, data, settings)
        lines[method] = pair_curves(run, zoo, data, points)
        summary[method], _ = method_metrics(run, lines[method])
    return summary, lines


def method_metrics(run: MethodRun, curves: list[Curve]) -> tuple[dict[str, float], list[dict]]:
    """Mean/std over pairs of every barrier metric, timing and recovery; and per-pair rows."""
    rows = [barriers(c) | {"seconds_per_pair": float(s)} for c, s in zip(curves, run.seconds)]
    per_metric = {k: [r[k] for r in rows] for k in (*BARRIER_KEYS, "seconds_per_pair")}
    per_metric["planted_recovery"] = run.planted_recovery.tolist()
    return summarize_pairs(per_metric), rows
