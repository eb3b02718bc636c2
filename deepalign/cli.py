"""The `deepalign` command line: inspect, permute, align and compare checkpoints."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console
from rich.table import Table

from deepalign.config import MAX_POINTS, load_section
from deepalign.core import lmc
from deepalign.core.arch import Arch, resolve_input, state_dict_from_weightspace
from deepalign.core.data import DATASETS, DataCfg, Dataset, load_dataset
from deepalign.core.permspec import apply_permutation, perm_spec, random_permutation
from deepalign.core.weightspace import check_same_shapes, stack
from deepalign.errors import DeepAlignError
from deepalign.evaluation import curves as mc
from deepalign.io import (
    Checkpoint,
    check_not_input,
    load_checkpoint,
    save_permuted,
    write_atomic,
)
from deepalign.methods import ALIGNERS, Method, MethodsCfg, Problem
from deepalign.methods import align as align_pair
from deepalign.methods.learned import DeepAlignCfg

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, rich_markup_mode=None)
console = Console()
_state = {"debug": False}
DEFAULT_DATA = DataCfg("digits", "data", False, 0, 0.1, 0.2)  # the split params.yaml ships


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")) -> None:
    _state["debug"] = debug
    torch.set_num_threads(1)  # one pair at a time: small matrices (deepalign.threads)


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


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def sweep(ctx: typer.Context) -> None:
    """Grid of params overrides as DVC experiments logged to MLflow: KEY=V1,V2 ... [--workdir]
    (runs `python -m flows.pipeline`, the Prefect flow; see its --help)."""
    cmd = [sys.executable, "-m", "flows.pipeline", *ctx.args]
    raise typer.Exit(subprocess.run(cmd).returncode)


def main() -> None:
    """The console script: like `app`, but a bad option value is one line too (exit 2)."""
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        sys.exit(130)
    except typer.TyperException as e:  # click's UsageError and BadParameter
        if not hasattr(e, "format_message"):
            raise
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx else ""
        print(f"error: {e.format_message()}{hint}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)


SEED = typer.Option(0, min=0, max=2**63 - 1, help="Seed of the random permutation.")
FORCE = typer.Option(False, "--force", help="Overwrite an input file (still via a temp file).")
MODEL = typer.Option(
    None,
    "--model",
    help="A deepalign checkpoint whose architecture bare state_dicts have (conv strides).",
)


REF = typer.Argument(
    help="Reference network: a deepalign checkpoint or a bare state_dict.", metavar="REF"
)
OTHER = typer.Argument(help="The other network, of the same architecture as REF.", metavar="OTHER")
METHOD_HELP = f"One of {', '.join(ALIGNERS)}, or 'a+b' (b refines a's answer)."
ALIGNER = typer.Option(None, help="DEEP-ALIGN checkpoint (file or folder) for deep_align.")
DATA_HELP = f"Data set ({', '.join(DATASETS)})"


def _model(path: Path | None) -> Arch | None:
    return load_checkpoint(path).arch if path is not None else None


@app.command()
@friendly
def info(
    checkpoint: Path = typer.Argument(
        help="A deepalign checkpoint or a bare state_dict.", metavar="CHECKPOINT"
    ),
    model: Path | None = MODEL,
) -> None:
    """Print a checkpoint's architecture and the permutation groups derived from it."""
    ckpt = load_checkpoint(checkpoint, _model(model))
    spec = perm_spec(ckpt.ws)
    inferred = " (inferred from shapes: ReLU assumed, s?: stride unknown)"
    note = inferred if ckpt.arch_inferred else ""
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
        value = ckpt.meta.get(key)
        if value is not None:
            console.print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")


@app.command()
@friendly
def permute(
    checkpoint: Path = typer.Argument(
        help="A deepalign checkpoint or a bare state_dict.", metavar="CHECKPOINT"
    ),
    seed: int = SEED,
    out: Path = typer.Option(..., "-o", "--out", help="Where to write the permuted copy."),
    force: bool = FORCE,
) -> None:
    """Write a randomly permuted copy of CHECKPOINT that computes the same function."""
    check_not_input(out, [checkpoint], force)
    ckpt = load_checkpoint(checkpoint)
    spec = perm_spec(ckpt.ws)
    perm = random_permutation(spec, torch.Generator().manual_seed(seed))
    meta = {"permuted_from": str(checkpoint), "permutation_seed": seed}
    save_permuted(out, ckpt, perm, spec, meta)
    console.print(f"wrote {out} ({', '.join(f'{g}: {n}' for g, n in spec.sizes.items())} units)")


def _data(name: str | None, params: Path):
    """The named data set with the split settings of params.yaml (defaults if it is absent)."""
    if name is None:
        return None
    cfg = load_section("data", DataCfg, params) if params.is_file() else DEFAULT_DATA
    return load_dataset(dataclasses.replace(cfg, name=name))


def _pair(
    ref: Path, other: Path, data: Dataset | None, model: Path | None
) -> tuple[Checkpoint, Checkpoint, Arch]:
    """Both networks, checked alike; with data, an inferred architecture is completed."""
    arch_given = _model(model)
    a, b = load_checkpoint(ref, arch_given), load_checkpoint(other, arch_given)
    check_same_shapes(a.ws, b.ws, (str(ref), str(other)))
    arch = a.arch
    if a.arch_inferred and data is not None:
        try:
            arch = resolve_input(arch, data.image_shape)
        except DeepAlignError as e:
            raise DeepAlignError(f"{ref}: {e}") from e
    return a, b, arch


def _align(
    pair: tuple[Path, Path],
    method: str,
    data: str | None,
    params: Path,
    aligner: Path | None,
    model: Path | None,
):
    """Load, check and align one pair with the settings of params.yaml."""
    Method.parse(method)  # an unknown name fails before anything loads
    cfg = load_section("align", MethodsCfg, params, allow_extra=True)
    if aligner is not None:
        cfg = dataclasses.replace(cfg, deep_align=DeepAlignCfg([str(aligner)]))
    dataset = _data(data, params)
    a, b, arch = _pair(*pair, dataset, model)
    problem = Problem.of(a.ws, b.ws, arch, dataset.train if dataset else None)
    return a, b, arch, problem, align_pair(method, problem, cfg), dataset


@app.command("align")
@friendly
def align_cmd(
    ref: Path = REF,
    other: Path = OTHER,
    method: str = typer.Option("weight_matching", help=METHOD_HELP),
    out: Path = typer.Option(..., "-o", "--out", help="OTHER permuted into REF's basis."),
    data: str | None = typer.Option(None, help=f"{DATA_HELP} for data-driven methods."),
    params: Path = typer.Option(Path("params.yaml"), help="Method settings: section `align`."),
    aligner: Path | None = ALIGNER,
    model: Path | None = MODEL,
    force: bool = FORCE,
) -> None:
    """Permute OTHER's hidden units to match REF; the output computes OTHER's function."""
    check_not_input(out, [ref, other], force)
    a, b, arch, problem, result, _ = _align((ref, other), method, data, params, aligner, model)
    aligned = apply_permutation(b.ws, result.perm, problem.spec)
    save_permuted(out, b, result.perm, problem.spec, {"aligned_to": str(ref), "method": method})
    before = (a.ws.flatten() - b.ws.flatten()).norm().item()
    after = (a.ws.flatten() - aligned.flatten()).norm().item()
    console.print(
        f"{method}: objective {result.objective:.4f}, {result.seconds * 1e3:.1f} ms; "
        f"L2 distance to REF {before:.3f} -> {after:.3f}; wrote {out}"
    )


def _check_finite(curve: lmc.Curve, *ends: tuple[Checkpoint, Path]) -> None:
    """Refuse a path whose loss overflowed, naming the network with the largest weights."""
    if torch.isfinite(curve.loss).all():
        return
    big = max(ends, key=lambda e: e[0].ws.flatten().abs().max().item())
    largest = big[0].ws.flatten().abs().max().item()
    raise DeepAlignError(
        f"{big[1]}: the loss along the path is not finite (largest |weight| {largest:.3g}); "
        "the weights are too large to evaluate in float32"
    )


@app.command()
@friendly
def interpolate(
    ref: Path = REF,
    other: Path = OTHER,
    data: str = typer.Option("digits", help=f"{DATA_HELP} whose test split is scored."),
    points: int = typer.Option(
        25, min=3, max=MAX_POINTS, help="Lambda grid size (odd, both ends included)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    params: Path = typer.Option(Path("params.yaml"), help="Data split settings."),
    model: Path | None = MODEL,
) -> None:
    """Loss and accuracy barriers along the straight line from REF to OTHER."""
    dataset = _data(data, params)
    a, b, arch = _pair(ref, other, dataset, model)
    curve = lmc.interpolate(arch, a.ws, b.ws, dataset.test, points)
    _check_finite(curve, (a, ref), (b, other))
    metrics = lmc.barriers(curve)
    if as_json:
        path = {"lambda": curve.lambdas, "loss": curve.loss, "acc": curve.acc}
        blob = metrics | {k: v.tolist() for k, v in path.items()}
        print(json.dumps(blob, indent=2, allow_nan=False))
        return
    table = Table("metric", "value", title=f"{ref.name} -> {other.name} on {data} test")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}")
    console.print(table)


@app.command()
@friendly
def curve(
    ref: Path = REF,
    other: Path = OTHER,
    out: Path = typer.Option(..., "-o", "--out", help="Where to write the curve."),
    method: str = typer.Option(
        "weight_matching", help=f"Alignment before the curve: {METHOD_HELP}"
    ),
    data: str = typer.Option("digits", help=f"{DATA_HELP}: train fits the curve, test scores it."),
    force: bool = FORCE,
    params: Path = typer.Option(Path("params.yaml"), help="Sections `align` and `curves`."),
    aligner: Path | None = ALIGNER,
    model: Path | None = MODEL,
) -> None:
    """Fit a Bezier curve from REF to aligned OTHER and compare it with the straight line."""
    cfg = load_section("curves", mc.CurvesCfg, params)
    check_not_input(out, [ref, other], force)
    a, b, arch, problem, result, dataset = _align(
        (ref, other), method, data, params, aligner, model
    )
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


if __name__ == "__main__":
    main()
