"""scipy's Hungarian against lapx's Jonker-Volgenant (`solve_large_lap`) on large assignments:
median seconds of each, their ratio, and whether they agree (the same permutation, or the same
objective to 1e-9 of it).

    python -m deepalign.evaluation.lap_check [out.json | -]

Matrices: a planted permutation in noise at 512-4096 units, and the first weight-matching
scores of every 2048+ unit group of two randomly initialised AlexNets (torchvision, 3x64x64).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
from scipy.optimize import linear_sum_assignment

from deepalign.core.assignment import LARGE, solve_large_lap

REPEATS = 3
SIZES = (512, 1024, 2048, 4096)


def planted(n: int, seed: int) -> np.ndarray:
    """(n, n) scores: 1 on a random permutation, plus N(0, 0.5^2) noise everywhere."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(0.0, 0.5, size=(n, n))
    scores[np.arange(n), rng.permutation(n)] += 1.0
    return scores


def alexnet_scores() -> dict[str, np.ndarray]:
    """Weight matching's first scores of each 2048+ unit group of two random AlexNets."""
    from deepalign.core.matching import Scorer
    from deepalign.core.permspec import identity
    from deepalign.evaluation.torchvision_check import SHAPE, build
    from deepalign.usermodel import network_arch

    ref, other = build("alexnet", 0), build("alexnet", 1)
    arch = network_arch(ref, input_shape=SHAPE)
    spec = arch.spec
    a, b = arch.weightspace(ref.state_dict()), arch.weightspace(other.state_dict())
    scorer, start = Scorer(spec, a, b), identity(spec)
    return {
        f"alexnet {g}": scorer.score(start, g).numpy().copy()
        for g in spec.groups
        if spec.sizes[g] >= LARGE
    }


def _median_seconds(solve: Callable[[], np.ndarray]) -> tuple[float, np.ndarray]:
    times, cols = [], None
    for _ in range(REPEATS):
        start = time.perf_counter()
        cols = solve()
        times.append(time.perf_counter() - start)
    return statistics.median(times), cols  # type: ignore[return-value]


def compare(scores: np.ndarray) -> dict[str, float | bool]:
    """Both solvers on one (n, n) matrix."""
    rows = np.arange(len(scores))
    scipy_s, exact = _median_seconds(lambda: linear_sum_assignment(scores, maximize=True)[1])
    lapx_s, fast = _median_seconds(lambda: solve_large_lap(scores))
    best, got = scores[rows, exact].sum(), scores[rows, fast].sum()
    return {
        "n": len(scores),
        "scipy_s": round(scipy_s, 3),
        "lapx_s": round(lapx_s, 3),
        "speedup": round(scipy_s / lapx_s, 2),
        "same_permutation": bool(np.array_equal(exact, fast)),
        "objective_gap": float((best - got) / max(abs(best), 1.0)),
    }


def main(argv: list[str]) -> None:
    from deepalign.evaluation.torchvision_check import measure_all

    measure_all(
        {f"planted {n}": planted(n, seed=n) for n in SIZES} | alexnet_scores(), compare, argv
    )


if __name__ == "__main__":
    main(sys.argv[1:])
