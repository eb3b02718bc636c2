"""The `deepalign` command line: inspect, permute, align and compare checkpoints."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console
from rich.table import Table

from deepalign import curves as mc
from deepalign import lmc
from deepalign.align import MethodsCfg, Problem, parse_method
from deepalign.align import align as align_pair
from deepalign.align.deep_align import DeepAlignCfg
from deepalign.arch import Arch, state_dict_from_weightspace
from deepalign.config import load_section
from deepalign.data import DataCfg, Dataset, load_dataset
from deepalign.errors import DeepAlignError
from deepalign.io import Checkpoint, load_checkpoint, save_like, write_atomic
from deepalign.permspec import apply_permutation, perm_spec, random_permutation
from deepalign.weightspace import check_same_shapes, stack

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()
_state = {"debug": False}
DEFAULT_DATA = DataCfg("digits", "data", False, 0, 0.1, 0.2)  # the split params.yaml ships


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")) -> None:
    _state["debug"] = debug


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn DeepAlignError into one line on stderr and exit 1 (traceback with --debug)."""

    @wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DeepAlignError as e:
            if _state["debug"]:
                raise
            print(f"error: {e}", file=sys.stderr)
            raise typer.Exit(1) from None

    return run


@app.command()
@friendly
def info(checkpoint: Path) -> None:
    """Print a checkpoint's architecture and the permutation groups derived from it."""
    ckpt = load_checkpoint(checkpoint)
    spec = perm_spec(ckpt.ws)
    note = " (inferred from shapes: ReLU, stride 1 assumed)" if ckpt.arch_inferred else ""
    console.print(f"[bold]{checkpoint}[/bold]: {ckpt.arch.describe()}{note}")
    console.print(f"parameters: {ckpt.ws.flatten().numel():,}")
    table = Table("group", "units", "acts on (tensor, axis, block)")
    for group in spec.groups:
        acts = ", ".join(
            f"{k}{i}[{axis}]" + (f" x{b}" if b > 1 else "")
            for (k, i), axis, b in spec.acting(group)
        )
        table.add_row(group, str(spec.sizes[group]), acts)
    console.print(table)
    for key in ("seed", "split", "test_acc", "test_loss"):
        if key in ckpt.meta:
            console.print(f"{key}: {ckpt.meta[key]}")


@app.command()
@friendly
def permute(
    checkpoint: Path,
    seed: int = typer.Option(0, help="Seed of the random permutation."),
    out: Path = typer.Option(..., "-o", "--out", help="Where to write the permuted copy."),
) -> None:
    """Write a randomly permuted copy of CHECKPOINT that computes the same function."""
    ckpt = load_checkpoint(checkpoint)
    spec = perm_spec(ckpt.ws)
    perm = random_permutation(spec, torch.Generator().manual_seed(seed))
    meta = {"permuted_from": str(checkpoint), "permutation_seed": seed}
    save_like(out, ckpt, apply_permutation(ckpt.ws, perm, spec), meta)
    console.print(f"wrote {out} ({', '.join(f'{g}: {n}' for g, n in spec.sizes.items())} units)")


def _data(name: str | None, params: Path):
    """The named data set with the split settings of params.yaml (defaults if it is absent)."""
    if name is None:
        return None
    cfg = load_section("data", DataCfg, params) if params.is_file() else DEFAULT_DATA
    return load_dataset(dataclasses.replace(cfg, name=name))


def _pair(ref: Path, other: Path, data: Dataset | None) -> tuple[Checkpoint, Checkpoint, Arch]:
    a, b = load_checkpoint(ref), load_checkpoint(other)
    check_same_shapes(a.ws, b.ws, (str(ref), str(other)))
    arch = a.arch
    if a.arch_inferred and data is not None and len(arch.input_shape) == 3:
        arch = dataclasses.replace(arch, input_shape=data.image_shape)
    return a, b, arch


def _align(
    ref: Path,
    other: Path,
    method: str,
    dataset: Dataset | None,
    params: Path,
    aligner: Path | None,
):
    """Load, check and align one pair with the settings of params.yaml."""
    parse_method(method)
    cfg = load_section("align", MethodsCfg, params, allow_extra=True)
    if aligner is not None:
        cfg = dataclasses.replace(cfg, deep_align=DeepAlignCfg([str(aligner)]))
    a, b, arch = _pair(ref, other, dataset)
    problem = Problem.of(a.ws, b.ws, arch, dataset.train if dataset else None)
    return a, b, arch, problem, align_pair(method, problem, cfg)


@app.command("align")
@friendly
def align_cmd(
    ref: Path,
    other: Path,
    method: str = typer.Option("weight_matching", help="Registry name; 'a+b' refines a with b."),
    out: Path = typer.Option(..., "-o", "--out", help="OTHER permuted into REF's basis."),
    data: str | None = typer.Option(None, help="Data set for data-driven methods (digits)."),
    params: Path = typer.Option(Path("params.yaml"), help="Method settings: section `align`."),
    aligner: Path | None = typer.Option(None, help="DEEP-ALIGN checkpoint for deep_align."),
) -> None:
    """Permute OTHER's hidden units to match REF; the output computes OTHER's function."""
    a, b, arch, problem, result = _align(ref, other, method, _data(data, params), params, aligner)
    aligned = apply_permutation(b.ws, result.perm, problem.spec)
    save_like(out, b, aligned, {"aligned_to": str(ref), "method": method})
    before = (a.ws.flatten() - b.ws.flatten()).norm().item()
    after = (a.ws.flatten() - aligned.flatten()).norm().item()
    console.print(
        f"{method}: objective {result.objective:.4f}, {result.seconds * 1e3:.1f} ms; "
        f"L2 distance to REF {before:.3f} -> {after:.3f}; wrote {out}"
    )


@app.command()
@friendly
def interpolate(
    ref: Path,
    other: Path,
    data: str = typer.Option("digits", help="Data set whose test split is scored."),
    points: int = typer.Option(25, help="Lambda grid size (odd, both ends included)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    params: Path = typer.Option(Path("params.yaml"), help="Data split settings."),
) -> None:
    """Loss and accuracy barriers along the straight line from REF to OTHER."""
    dataset = _data(data, params)
    a, b, arch = _pair(ref, other, dataset)
    curve = lmc.interpolate(arch, a.ws, b.ws, dataset.test, points)
    metrics = lmc.barriers(curve)
    if as_json:
        print(
            json.dumps(
                metrics
                | {
                    "lambda": curve.lambdas.tolist(),
                    "loss": curve.loss.tolist(),
                    "acc": curve.acc.tolist(),
                },
                indent=2,
            )
        )
        return
    table = Table("metric", "value", title=f"{ref.name} -> {other.name} on {data} test")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}")
    console.print(table)


@app.command()
@friendly
def curve(
    ref: Path,
    other: Path,
    method: str = typer.Option("weight_matching", help="Alignment of OTHER before the curve."),
    data: str = typer.Option("digits", help="Train split fits the curve, test split scores it."),
    out: Path = typer.Option(..., "-o", "--out", help="Where to write the curve."),
    params: Path = typer.Option(Path("params.yaml"), help="Sections `align` and `curves`."),
    aligner: Path | None = typer.Option(None, help="DEEP-ALIGN checkpoint for deep_align."),
) -> None:
    """Fit a Bezier curve from REF to aligned OTHER and compare it with the straight line."""
    cfg = load_section("curves", mc.CurvesCfg, params)
    dataset = _data(data, params)
    a, b, arch, problem, result = _align(ref, other, method, dataset, params, aligner)
    ends = stack([a.ws]), stack([apply_permutation(b.ws, result.perm, problem.spec)])
    fitted = mc.fit_and_evaluate(arch, *ends, dataset.train, dataset.test, cfg)
    metrics = mc.summarize_curves(fitted)
    theta = fitted.theta[0]
    blob = {
        "format": "deepalign-curve/1",
        "kind": cfg.fit.kind,
        "arch": arch.to_dict(),
        "endpoints": [state_dict_from_weightspace(arch, w[0]) for w in ends],
        "control": state_dict_from_weightspace(arch, theta),
        "metrics": metrics,
    }
    write_atomic(out, lambda tmp: torch.save(blob, tmp))
    table = Table("", "curve", "straight line", title=f"{method}-aligned, {data} test")
    for key in ("mean_acc", "min_acc", "max_loss", "curve_barrier"):
        table.add_row(key, f"{metrics[key]:.4f}", f"{metrics['linear_' + key]:.4f}")
    console.print(table)
    console.print(f"fitted in {metrics['seconds_to_fit']:.1f} s; wrote {out}")
