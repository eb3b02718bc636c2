"""The `deepalign` command line: inspect, permute, align and compare checkpoints."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import warnings
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, NoReturn

import torch
import typer
from rich.console import Console
from rich.table import Table

from deepalign.config import MAX_POINTS, load_section
from deepalign.console import run_app
from deepalign.core import lmc
from deepalign.core.arch import (
    Arch,
    check_fits,
    check_same_arch,
    resolve_input,
    state_dict_from_weightspace,
)
from deepalign.core.data import DATASETS, DataCfg, Dataset, data_paths, load_dataset
from deepalign.core.permspec import apply_permutation, perm_spec, random_permutation
from deepalign.core.weightspace import check_same_shapes, stack
from deepalign.errors import DeepAlignError, UsageError, one_line
from deepalign.evaluation import curves as mc
from deepalign.guard import check_io
from deepalign.io import (
    Checkpoint,
    check_output,
    load_checkpoint,
    save_permuted,
    write_atomic,
)
from deepalign.methods import ALIGNERS, Method, MethodsCfg, Problem
from deepalign.methods import align as align_pair
from deepalign.methods.learned import DeepAlignCfg, checkpoint_files

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, rich_markup_mode=None)
console = Console(markup=False, highlight=False)  # a path's "[...]" is text, never markup
_state = {"debug": False}
DEFAULT_DATA = DataCfg("digits", "data", False, 0, 0.1, 0.2)  # the split params.yaml ships


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")) -> None:
    _state["debug"] = debug
    if not debug:  # torch's warnings (legacy files, storage) would break the one-line rule
        warnings.simplefilter("ignore")
    torch.set_num_threads(1)  # one pair at a time: small matrices (deepalign.threads)


def fail(message: str, code: int) -> NoReturn:
    """One `error:` line on stderr (control characters escaped) and exit `code`."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    raise typer.Exit(code)


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, MemoryError | torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e)
    )


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input becomes one line on stderr (traceback with --debug): exit 2 for a bad
    command line (UsageError), 1 for a bad file, an OS error or memory running out."""

    @wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (DeepAlignError, OSError, MemoryError, RuntimeError) as e:
            if _state["debug"]:
                raise
            if isinstance(e, DeepAlignError):
                fail(str(e), 2 if isinstance(e, UsageError) else 1)
            if isinstance(e, OSError):
                fail(f"{e.filename or 'a file'}: {e.strerror or type(e).__name__}", 1)
            if _out_of_memory(e):
                fail("out of memory (use smaller networks, or a machine with more memory)", 1)
            raise

    return run


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def sweep(ctx: typer.Context) -> None:
    """Grid of params overrides as DVC experiments logged to MLflow: KEY=V1,V2 ... [--workdir]
    (runs `python -m flows.pipeline`, the Prefect flow; see its --help)."""
    cmd = [sys.executable, "-m", "flows.pipeline", *ctx.args]
    raise typer.Exit(subprocess.run(cmd).returncode)


def main() -> None:
    """The console script: like `app`, but a bad option value is one line too (exit 2)."""
    run_app(app)


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
    console.print(f"{one_line(str(checkpoint))}: {ckpt.arch.describe()}{note}")
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
    check_io({"CHECKPOINT": checkpoint}, {"--out": out}, force)
    check_output(out)
    ckpt = load_checkpoint(checkpoint)
    spec = perm_spec(ckpt.ws)
    perm = random_permutation(spec, torch.Generator().manual_seed(seed))
    meta = {"permuted_from": str(checkpoint), "permutation_seed": seed}
    save_permuted(out, ckpt, perm, spec, meta)
    units = ", ".join(f"{g}: {n}" for g, n in spec.sizes.items())
    console.print(f"wrote {one_line(str(out))} ({units} units)")


def _data_cfg(name: str, params: Path) -> DataCfg:
    """Data set `name` with the split settings of the params file (its defaults if absent)."""
    if name not in DATASETS:
        raise UsageError(f"--data: unknown data set '{name}' (known: {', '.join(DATASETS)})")
    cfg = load_section("data", DataCfg, params) if params.is_file() else DEFAULT_DATA
    return dataclasses.replace(cfg, name=name)


def _data(name: str | None, params: Path) -> Dataset | None:
    return load_dataset(_data_cfg(name, params)) if name is not None else None


def _load_alike(ref: Path, other: Path, model: Path | None) -> tuple[Checkpoint, Checkpoint]:
    """Both networks; a bare state_dict takes the architecture the other one records."""
    given = _model(model)
    a, b = load_checkpoint(ref, given), load_checkpoint(other, given)
    if given is None and a.arch_inferred != b.arch_inferred:
        if a.arch_inferred:
            a = load_checkpoint(ref, b.arch)
        else:
            b = load_checkpoint(other, a.arch)
    return a, b


def _pair(
    ref: Path, other: Path, data: Dataset | None, model: Path | None
) -> tuple[Checkpoint, Checkpoint, Arch]:
    """Both networks, checked alike (shapes and the whole architecture record); with data, an
    inferred architecture is completed and both are checked against the data set."""
    a, b = _load_alike(ref, other, model)
    check_same_shapes(a.ws, b.ws, (str(ref), str(other)))
    check_same_arch(a.arch, b.arch, (str(ref), str(other)))
    arch = a.arch
    if data is None:
        return a, b, arch
    try:
        if a.arch_inferred:
            arch = resolve_input(arch, data.image_shape)
        check_fits(arch, data.image_shape, data.n_classes, data.name)
    except DeepAlignError as e:
        raise DeepAlignError(f"{ref}: {e}") from e
    return a, b, arch


def _method(method: str) -> Method:
    try:
        return Method.parse(method)
    except DeepAlignError as e:
        raise UsageError(f"--method: {e}") from e


def _align_reads(
    pair: tuple[Path, Path],
    method: str,
    data: str | None,
    params: Path,
    aligner: Path | None,
    model: Path | None,
) -> dict[str, Path | None]:
    """Every path an aligning command reads, by the option that names it."""
    reads: dict[str, Path | None] = {"REF": pair[0], "OTHER": pair[1], "--model": model}
    reads |= {"--params": params if params.is_file() else None, "--aligner": aligner}
    if aligner is None and "deep_align" in _method(method).steps:
        cfg = load_section("align", MethodsCfg, params, allow_extra=True)
        for i, path in enumerate(checkpoint_files(cfg.deep_align)):
            reads[f"align.deep_align.checkpoints[{i}]"] = path
    if data is not None:
        for i, path in enumerate(data_paths(_data_cfg(data, params))):
            reads[f"--data ({i})"] = path
    return reads


def _align(
    pair: tuple[Path, Path],
    method: str,
    data: str | None,
    params: Path,
    aligner: Path | None,
    model: Path | None,
):
    """Load, check and align one pair with the settings of params.yaml."""
    _method(method)  # an unknown name fails before anything loads
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
    """Permute OTHER's hidden units to match REF; the output computes OTHER's function.

    It prints the weight-matching objective <REF, aligned OTHER> (higher: more alike) and the
    L2 distance between the two networks' weights before and after aligning."""
    reads = _align_reads((ref, other), method, data, params, aligner, model)
    check_io(reads, {"--out": out}, force)
    check_output(out)
    a, b, arch, problem, result, _ = _align((ref, other), method, data, params, aligner, model)
    aligned = apply_permutation(b.ws, result.perm, problem.spec)
    save_permuted(out, b, result.perm, problem.spec, {"aligned_to": str(ref), "method": method})
    before = (a.ws.flatten() - b.ws.flatten()).norm().item()
    after = (a.ws.flatten() - aligned.flatten()).norm().item()
    console.print(
        f"{method}: objective {result.objective:.4f}, {result.seconds * 1e3:.1f} ms; "
        f"L2 distance to REF {before:.3f} -> {after:.3f}; wrote {one_line(str(out))}"
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
    if points % 2 == 0:
        raise UsageError(f"--points: {points} is even; an odd number puts lambda 0.5 on the grid")
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
    title = one_line(f"{ref.name} -> {other.name} on {data} test")
    table = Table("metric", "value", title=title)
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
    reads = _align_reads((ref, other), method, data, params, aligner, model)
    check_io(reads, {"--out": out}, force)
    check_output(out)
    cfg = load_section("curves", mc.CurvesCfg, params)
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
    console.print(f"fitted in {metrics['seconds_to_fit']:.1f} s; wrote {one_line(str(out))}")


if __name__ == "__main__":
    main()
