"""Figures (PNG, for the report) and the CSV series `dvc plots` draws, of the stages' results."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from deepalign.core.lmc import Curve  # noqa: E402
from deepalign.io import write_atomic  # noqa: E402


def interpolation_rows(curves: dict[str, list[Curve]]) -> list[dict]:
    """Mean curve per method: rows (method, lambda, test_loss, test_acc) for `dvc plots`."""
    rows = []
    for method, cs in curves.items():
        loss = torch.stack([c.loss for c in cs]).mean(0)
        acc = torch.stack([c.acc for c in cs]).mean(0)
        for lam, lo, ac in zip(cs[0].lambdas.tolist(), loss.tolist(), acc.tolist()):
            rows.append(
                {
                    "method": method,
                    "lambda": round(lam, 4),
                    "test_loss": round(lo, 6),
                    "test_acc": round(ac, 6),
                }
            )
    return rows


def plot_curves(path: Path, curves: dict[str, list[Curve]], title: str) -> None:
    """Test loss and accuracy along the line, mean over pairs with a 1-std band per method."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, cs in curves.items():
        lam = cs[0].lambdas
        for ax, key in zip(axes, ("loss", "acc")):
            values = torch.stack([getattr(c, key) for c in cs]).double()
            mean, std = values.mean(0), values.std(0) if len(cs) > 1 else torch.zeros_like(lam)
            ax.plot(lam, mean, label=method)
            ax.fill_between(lam, mean - std, mean + std, alpha=0.15)
    axes[0].set(xlabel="lambda", ylabel="test loss", yscale="log", title=f"{title}: loss")
    axes[1].set(xlabel="lambda", ylabel="test accuracy", title=f"{title}: accuracy")
    axes[1].legend(fontsize=8)
    _save(fig, path)


def plot_curve_accuracy(path: Path, results: dict, title: str) -> None:
    """Test accuracy vs t along each method's curve (solid) and straight line (dashed)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, (method, r) in enumerate(results.items()):
        color = f"C{k}"
        ax.plot(r.curve.t, r.curve.acc.mean(0), color=color, label=f"{method} curve")
        ax.plot(r.linear.t, r.linear.acc.mean(0), color=color, linestyle="--", alpha=0.7)
    ax.set(
        xlabel="t",
        ylabel="test accuracy (mean over pairs)",
        title=f"{title}: Bezier curves (solid) vs straight lines (dashed)",
    )
    ax.legend(fontsize=8, loc="lower left")
    _save(fig, path)


def plot_convergence(path: Path, rows: list[dict], target: float, title: str) -> None:
    """Mean test loss barrier vs Sinkhorn steps per start, with the target as a line."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for start in dict.fromkeys(r["method"] for r in rows):
        steps = sorted({r["steps"] for r in rows if r["method"] == start})
        values = [
            [r["loss_barrier"] for r in rows if r["method"] == start and r["steps"] == k]
            for k in steps
        ]
        mean = [sum(v) / len(v) for v in values]
        ax.plot(steps, mean, marker="o", label=f"from {start}")
    ax.axhline(target, color="grey", linestyle="--", label="target: plain Sinkhorn, full run")
    ax.set_xscale("symlog", linthresh=5)
    ax.set_xlim(left=0)
    ax.set_yscale("log")
    ax.set(
        xlabel="Sinkhorn re-basin steps",
        ylabel="test loss barrier (mean over pairs)",
        title=f"{title}: refinement from three starts",
    )
    ax.legend(fontsize=8)
    _save(fig, path)


def budget_rows(summary: dict[str, dict[str, dict]], budgets: dict[str, int | None]) -> list[dict]:
    """Per architecture and method: mean loss barrier against mean seconds per pair, and the
    method's refinement step budget k ("" off the budget curve) for `dvc plots`."""
    return [
        {
            "arch": arch,
            "method": method,
            "k": "" if budgets.get(method) is None else budgets[method],
            "seconds_per_pair": round(values["seconds_per_pair_mean"], 6),
            "loss_barrier": round(values["loss_barrier_mean"], 6),
        }
        for arch, methods in summary.items()
        for method, values in methods.items()
    ]


def plot_refine_budget(path: Path, rows: list[dict], title: str, curve: str) -> None:
    """Loss barrier vs seconds per pair (both log), a named point per method, and the methods
    with a step budget k joined in order of k (`curve` names them); a panel per architecture."""
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    fig, axes = plt.subplots(1, len(archs), figsize=(6 * len(archs), 4.5), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        mine = [r for r in rows if r["arch"] == arch and r["seconds_per_pair"] > 0]  # log axis
        for r in mine:
            at = (r["seconds_per_pair"], r["loss_barrier"])
            ax.scatter(*at, s=18, zorder=3)
            ax.annotate(r["method"], at, xytext=(4, 3), textcoords="offset points", fontsize=7)
        budgeted = sorted((r for r in mine if r["k"] != ""), key=lambda r: r["k"])
        if budgeted:
            ks = ", ".join(str(r["k"]) for r in budgeted)
            xs, ys = (
                [r["seconds_per_pair"] for r in budgeted],
                [r["loss_barrier"] for r in budgeted],
            )
            ax.plot(xs, ys, color="grey", zorder=2, label=f"{curve}, k = {ks}")
            ax.legend(fontsize=8)
        ax.set(
            xscale="log",
            yscale="log",  # naive's barrier would squash the aligned methods
            xlabel="seconds per pair",
            ylabel="test loss barrier (mean over pairs)",
            title=f"{title} {arch}",
        )
    _save(fig, path)


def plot_scaling(path: Path, rows: list[dict], weight_matching: float, title: str) -> None:
    """DEEP-ALIGN's test barrier vs train networks (one line per step count), and vs steps."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, other, ax in (
        ("train_networks", "mark", axes[0]),
        ("mark", "train_networks", axes[1]),
    ):
        for value in sorted({r[other] for r in rows}):
            line = sorted((r[key], r["deep_align"]) for r in rows if r[other] == value)
            name = "steps" if other == "mark" else "train networks"
            ax.plot(*zip(*line), marker="o", label=f"{value} {name}")
        ax.axhline(weight_matching, color="grey", linestyle="--", label="weight matching")
        ax.set(
            xscale="log",
            xlabel=key.replace("mark", "training steps").replace("_", " "),
            ylabel="test loss barrier (mean over pairs)",
        )
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}: DEEP-ALIGN against zoo size and training steps")
    _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> None:
    """The laid-out figure as a PNG at `path` (written atomically), then closed."""
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
