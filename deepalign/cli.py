"""The `deepalign` command line: inspect, permute, align, merge and compare networks.

Networks are deepalign checkpoints or bare state_dicts: of a plain nn.Sequential (its
architecture read from the shapes), or of any module `--model pkg.module:callable` builds.
Settings: the package's defaults, with the keys of `--params FILE` merged over them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from deepalign.console import run_app
from deepalign.errors import DeepAlignError, UsageError, one_line

if TYPE_CHECKING:  # the heavy imports wait for a command that needs them (fast --help)
    from deepalign.core.arch import Arch
    from deepalign.core.data import Dataset
    from deepalign.io import Checkpoint

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, rich_markup_mode=None)
console = Console(markup=False, highlight=False, soft_wrap=True)  # "[...]" is text; no wrap
_state = {"debug": False}
DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10")  # deepalign.core.data.DATASETS


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")) -> None:
    _state["debug"] = debug
    if not debug:  # torch's warnings (legacy files, storage) would break the one-line rule
        warnings.simplefilter("ignore")


def fail(message: str, code: int) -> NoReturn:
    """One `error:` line on stderr (control characters escaped) and exit `code`."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    raise typer.Exit(code)


def _out_of_memory(e: BaseException) -> bool:
    import torch

    return isinstance(e, MemoryError | torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e)
    )


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input becomes one line on stderr (traceback with --debug): exit 2 for a bad
    command line (UsageError), 1 for a bad file, an OS error or memory running out."""

    @wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        import torch

        torch.set_num_threads(1)  # one pair at a time: small matrices (deepalign.threads)
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


@app.command()
def sweep(
    overrides: list[str] = typer.Argument(
        ...,
        help="params.yaml keys and values to try: align.pairs=20,50 aligner.epochs=50,100; a "
        "value may be a YAML list ('align.methods=[naive,ste],[naive]').",
    ),
    workdir: Path = typer.Option(Path("."), help="The DVC project folder."),
    metrics: str = typer.Option(
        "metrics/headline.json", help="Metrics file logged per run (the headline)."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Grid of params overrides as DVC experiments logged to MLflow (in a project folder):
    every combination runs as `dvc exp run -S ...` inside the Prefect flow `sweep`
    (`python -m flows.pipeline`)."""
    options = ["--workdir", str(workdir), "--metrics", metrics, *(["--debug"] if debug else [])]
    cmd = [sys.executable, "-m", "flows.pipeline", *overrides, *options]
    raise typer.Exit(subprocess.run(cmd).returncode)


def main() -> None:
    """The console script: like `app`, but a bad option value is one line too (exit 2); with
    no arguments at all, the help."""
    run_app(app, sys.argv[1:] or ["--help"])


# --- options ------------------------------------------------------------------------------------

SEED = typer.Option(0, min=0, max=2**63 - 1, help="Seed of the random permutation.")
FORCE = typer.Option(False, "--force", help="Overwrite an input file (still via a temp file).")
MODEL = typer.Option(
    None,
    "--model",
    help="The networks' module: pkg.module:callable or path/to/file.py:callable (a callable "
    "that builds it with no arguments), or a deepalign checkpoint of the architecture.",
)
INPUT_SHAPE = typer.Option(
    None,
    "--input-shape",
    help="One example's shape for --model (e.g. 3,32,32); default: the data set's, else a "
    "guess from the first layer.",
)
PARAMS = typer.Option(
    None,
    "--params",
    help="Settings file whose keys are merged over the package's defaults (no other file is "
    "read; ./params.yaml only when named here).",
)
REF = typer.Argument(help="Reference network: a checkpoint or a bare state_dict.", metavar="REF")
OTHER = typer.Argument(help="The other network, of the same architecture as REF.", metavar="OTHER")
METHOD_HELP = (  # the names are deepalign.methods.ALIGNERS' (not imported here: fast --help)
    "A registered aligner (e.g. weight_matching, deep_align; an unknown name lists them all), "
    "or 'a+b' (b refines a's answer); '@k' sets an iterative step's steps "
    "(deep_align+sinkhorn@10)."
)
ALIGNER = typer.Option(None, help="DEEP-ALIGN checkpoint (file or folder) for deep_align.")
DATA_HELP = f"Data set ({', '.join(DATASETS)})"
BN_RESET = typer.Option(
    True,
    "--bn-reset/--no-bn-reset",
    help="Recompute BatchNorm statistics of every merged or interpolated network on "
    "`batchnorm.reset_images` training images (1,024 by default; BatchNorm networks only).",
)


def _shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(v < 1 for v in shape):
        raise UsageError(f"--input-shape: '{text}' is not sizes like 3,32,32")
    return shape


def _model(path: Path | None, shape: str | None, data: Dataset | None) -> Arch | None:
    """The architecture --model names (a callable's module, or a checkpoint's record)."""
    if path is None:
        return None
    from deepalign.io import load_checkpoint
    from deepalign.usermodel import is_reference, network_arch

    text = str(path)
    if is_reference(text) and not path.is_file():
        return network_arch(text, _shape(shape), data)
    return load_checkpoint(path).arch


def _model_reads(model: Path | None) -> dict[str, Path | None]:
    from deepalign.usermodel import is_reference, reference_source

    if model is None or not is_reference(str(model)) or model.is_file():
        return {"--model": model}
    return {"--model": reference_source(str(model))}


def _settings(params: Path | None):
    from deepalign.settings import load_settings

    return load_settings(params)


def _data_cfg(name: str, params: Path | None):
    if name not in DATASETS:
        raise UsageError(f"--data: unknown data set '{name}' (known: {', '.join(DATASETS)})")
    from deepalign.settings import data_cfg

    return data_cfg(_settings(params), name)


def _data(name: str | None, params: Path | None) -> Dataset | None:
    from deepalign.core.data import load_dataset

    return load_dataset(_data_cfg(name, params)) if name is not None else None


def _method(method: str):
    from deepalign.methods import Method

    try:
        return Method.parse(method)
    except DeepAlignError as e:
        raise UsageError(f"--method: {e}") from e


# --- loading networks ---------------------------------------------------------------------------


def _networks(
    paths: list[Path], data: Dataset | None, model: Path | None, shape: str | None
) -> tuple[list[Checkpoint], Arch]:
    """Networks checked alike, `--model` building their architecture when given."""
    from deepalign.usermodel import load_networks

    return load_networks(paths, data, _model(model, shape, data))


def _reads(
    paths: dict[str, Path],
    method: str | None,
    data: str | None,
    params: Path | None,
    aligner: Path | None,
    model: Path | None,
) -> dict[str, Path | None]:
    """Every path a command reads, by the option that names it."""
    from deepalign.core.data import data_paths
    from deepalign.methods.learned import checkpoint_files
    from deepalign.settings import methods_cfg

    settings = _settings(params)
    reads: dict[str, Path | None] = {**paths, **_model_reads(model), "--params": settings.where}
    reads["--aligner"] = aligner
    if method is not None and aligner is None and "deep_align" in _method(method).steps:
        for i, path in enumerate(checkpoint_files(methods_cfg(settings).deep_align)):
            reads[f"align.deep_align.checkpoints[{i}]"] = path
    if data is not None:
        for i, path in enumerate(data_paths(_data_cfg(data, params))):
            reads[f"--data ({i})"] = path
    return reads


def _methods_cfg(params: Path | None, aligner: Path | None, method: str):
    from deepalign.settings import methods_for

    return methods_for(_settings(params), method, aligner)


def _align(pair, method, data, params, aligner, model, shape):
    """Load, check and align one pair with the settings of the params file."""
    from deepalign.methods import Problem
    from deepalign.methods import align as align_pair

    _method(method)  # an unknown name fails before anything loads
    cfg = _methods_cfg(params, aligner, method)
    dataset = _data(data, params)
    (a, b), arch = _networks(list(pair), dataset, model, shape)
    problem = Problem.of(a.ws, b.ws, arch, dataset.train if dataset else None)
    return a, b, arch, problem, align_pair(method, problem, cfg), dataset


def _reset_count(params: Path | None, on: bool) -> int:
    from deepalign.settings import bn_reset_images

    return bn_reset_images(_settings(params)) if on else 0


def _reset_images(dataset: Dataset | None, on: bool, params: Path | None):
    from deepalign.core.data import reset_images_of

    return reset_images_of(dataset.train if dataset else None, _reset_count(params, on))


# --- commands -----------------------------------------------------------------------------------


@app.command()
@friendly
def info(
    checkpoint: Path = typer.Argument(
        help="A deepalign checkpoint or a bare state_dict.", metavar="CHECKPOINT"
    ),
    model: Path | None = MODEL,
    input_shape: str | None = INPUT_SHAPE,
) -> None:
    """Print a network's architecture and the permutation groups traced from its graph."""
    (ckpt,), arch = _networks([checkpoint], None, model, input_shape)
    spec = arch.spec
    inferred = " (inferred from shapes: ReLU assumed, s?: stride unknown)"
    note = inferred if ckpt.arch_inferred else ""
    console.print(f"{one_line(str(checkpoint))}: {arch.describe()}{note}")
    console.print(f"parameters: {ckpt.ws.flatten().numel():,}")
    table = Table("group", "units", "acts on (tensor[axis], x block)")
    for group in spec.groups:
        acts = ", ".join(
            f"{key}[{axis}]"
            + (f"[{offset}:]" if offset else "")
            + (f" x{block}" if block > 1 else "")
            for key, axis, block, offset in spec.acting(group)
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
    model: Path | None = MODEL,
    input_shape: str | None = INPUT_SHAPE,
    force: bool = FORCE,
) -> None:
    """Write a randomly permuted copy of CHECKPOINT that computes the same function."""
    import torch

    from deepalign.core.permspec import random_permutation
    from deepalign.guard import check_io
    from deepalign.io import check_output, save_permuted

    check_io({"CHECKPOINT": checkpoint, **_model_reads(model)}, {"--out": out}, force)
    check_output(out)
    (ckpt,), arch = _networks([checkpoint], None, model, input_shape)
    spec = arch.spec
    perm = random_permutation(spec, torch.Generator().manual_seed(seed))
    meta = {"permuted_from": str(checkpoint), "permutation_seed": seed}
    save_permuted(out, ckpt, perm, spec, meta)
    units = ", ".join(f"{g}: {n}" for g, n in spec.sizes.items())
    console.print(f"wrote {one_line(str(out))} ({units} units)")


@app.command("align")
@friendly
def align_cmd(
    ref: Path = REF,
    other: Path = OTHER,
    method: str = typer.Option("weight_matching", help=METHOD_HELP),
    out: Path = typer.Option(..., "-o", "--out", help="OTHER permuted into REF's basis."),
    data: str | None = typer.Option(None, help=f"{DATA_HELP} for data-driven methods."),
    params: Path | None = PARAMS,
    aligner: Path | None = ALIGNER,
    model: Path | None = MODEL,
    input_shape: str | None = INPUT_SHAPE,
    force: bool = FORCE,
) -> None:
    """Permute OTHER's hidden units to match REF; the output computes OTHER's function.

    It prints the weight-matching objective <REF, aligned OTHER> (higher: more alike) and the
    L2 distance between the two networks' weights before and after aligning."""
    from deepalign.core.permspec import apply_permutation
    from deepalign.guard import check_io
    from deepalign.io import check_output, save_permuted

    reads = _reads({"REF": ref, "OTHER": other}, method, data, params, aligner, model)
    check_io(reads, {"--out": out}, force)
    check_output(out)
    a, b, arch, problem, result, _ = _align(
        (ref, other), method, data, params, aligner, model, input_shape
    )
    aligned = apply_permutation(b.ws, result.perm, problem.spec)
    save_permuted(out, b, result.perm, problem.spec, {"aligned_to": str(ref), "method": method})
    before = (a.ws.flatten() - b.ws.flatten()).norm().item()
    after = (a.ws.flatten() - aligned.flatten()).norm().item()
    console.print(
        f"{method}: <REF, aligned OTHER> = {result.objective:.4f} (weight-matching objective, "
        f"higher: more alike) in {result.seconds * 1e3:.1f} ms; weight distance to REF "
        f"{before:.3f} before, {after:.3f} after; wrote {one_line(str(out))}"
    )


def _weights(text: str | None, count: int) -> list[float] | None:
    """--weights: one finite, non-negative number per network, not all zero."""
    if text is None:
        return None
    from deepalign.merging import check_weights

    try:
        return check_weights([float(v) for v in text.split(",")], count)
    except ValueError:
        raise UsageError(f"--weights: '{text}' is not numbers like 0.5,0.5") from None
    except DeepAlignError as e:
        raise UsageError(f"--weights: {e}") from None


@app.command()
@friendly
def merge(
    networks: list[Path] = typer.Argument(
        help="REF OTHER [MORE ...]: two or more networks of one architecture.", metavar="REF"
    ),
    method: str = typer.Option(
        "weight_matching", help=f"Two networks: {METHOD_HELP} More: MergeMany (weight matching)."
    ),
    out: Path = typer.Option(..., "-o", "--out", help="The merged network (REF's format)."),
    weights: str | None = typer.Option(None, help="One weight per network (default: equal)."),
    repair: bool = typer.Option(False, "--repair", help="REPAIR the merged network's units."),
    data: str | None = typer.Option(None, help=f"{DATA_HELP}: training images for BatchNorm."),
    bn_reset: bool = BN_RESET,
    params: Path | None = PARAMS,
    aligner: Path | None = ALIGNER,
    model: Path | None = MODEL,
    input_shape: str | None = INPUT_SHAPE,
    force: bool = FORCE,
) -> None:
    """Align the networks and write their average: a network `load_state_dict` takes (REF's
    keys, shapes and dtypes; BatchNorm statistics recomputed where it has BatchNorm)."""
    from deepalign.guard import check_io
    from deepalign.io import check_output, save_network
    from deepalign.merging import merge_networks

    if len(networks) < 2:
        raise UsageError(f"merge needs at least two networks, got {len(networks)}")
    _method(method)
    shares = _weights(weights, len(networks))
    named = {("REF" if i == 0 else f"NETWORK {i}"): p for i, p in enumerate(networks)}
    check_io(_reads(named, method, data, params, aligner, model), {"--out": out}, force)
    check_output(out)
    dataset = _data(data, params)
    nets, arch = _networks(list(networks), dataset, model, input_shape)
    train = dataset.train if dataset else None
    cfg = _methods_cfg(params, aligner, method)
    images = _reset_count(params, bn_reset)
    merged = merge_networks(arch, [n.ws for n in nets], method, cfg, shares, train, repair, images)
    save_network(out, nets[0], merged, {"merged_from": [str(p) for p in networks]})
    how = method if len(networks) == 2 else "MergeMany (weight_matching)"
    console.print(f"merged {len(networks)} networks ({how}); wrote {one_line(str(out))}")


@app.command("train-aligner")
@friendly
def train_aligner(
    networks: list[str] = typer.Argument(
        help="Checkpoints of one architecture: files, folders (their *.pt) or quoted globs.",
        metavar="NETWORKS",
    ),
    out: Path = typer.Option(Path("aligner.pt"), "-o", "--out", help="The trained aligner."),
    data: str = typer.Option(
        "digits", help=f"{DATA_HELP}: images for the interpolation loss and validation."
    ),
    epochs: int | None = typer.Option(
        None, min=1, help="Epochs (default: the aligner section's, 60); each sees every network."
    ),
    params: Path | None = PARAMS,
    model: Path | None = MODEL,
    input_shape: str | None = INPUT_SHAPE,
    force: bool = FORCE,
) -> None:
    """Train DEEP-ALIGN on your networks (a tenth, at least 2, held out to pick the best epoch)
    for `align --method deep_align --aligner OUT`; an interrupted run resumes from
    OUT's `.state.pt` file."""
    from deepalign.guard import check_io
    from deepalign.io import check_output
    from deepalign.methods.deep_align.train import state_path
    from deepalign.user_aligner import aligner_cfg, train_user_aligner
    from deepalign.usermodel import expand_paths

    writes = {"--out": out, "--out's training state": state_path(out)}
    paths = expand_paths(list(networks), skip=tuple(writes.values()))
    named = {f"NETWORK {i}": p for i, p in enumerate(paths)}
    check_io(_reads(named, None, data, params, None, model), writes, force)
    check_output(out)
    cfg = aligner_cfg(_settings(params), epochs)
    dataset = _data(data, params)
    nets, arch = _networks(paths, dataset, model, input_shape)
    found = train_user_aligner(arch, [n.ws for n in nets], dataset, cfg, out)
    console.print(
        f"trained DEEP-ALIGN on {len(nets)} networks: best validation barrier "
        f"{found['best_val_loss_barrier']:.3f} (epoch {int(found['best_epoch']) + 1}), planted "
        f"recovery {found['best_val_planted_recovery']:.3f}; wrote {one_line(str(out))}"
    )


def _check_finite(curve, *ends) -> None:
    """Refuse a path whose loss overflowed, naming the network with the largest weights."""
    import torch

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
    points: int = typer.Option(25, min=3, max=10_001, help="Lambda grid size (odd, ends in)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    bn_reset: bool = BN_RESET,
    params: Path | None = PARAMS,
    model: Path | None = MODEL,
    input_shape: str | None = INPUT_SHAPE,
) -> None:
    """Loss and accuracy barriers along the straight line from REF to OTHER."""
    from deepalign.core import lmc

    if points % 2 == 0:
        raise UsageError(f"--points: {points} is even; an odd number puts lambda 0.5 on the grid")
    dataset = _data(data, params)
    (a, b), arch = _networks([ref, other], dataset, model, input_shape)
    reset = _reset_images(dataset, bn_reset, params)
    curve = lmc.interpolate(arch, a.ws, b.ws, dataset.test, points, reset)
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
    params: Path | None = PARAMS,
    aligner: Path | None = ALIGNER,
    model: Path | None = MODEL,
    input_shape: str | None = INPUT_SHAPE,
) -> None:
    """Fit a Bezier curve from REF to aligned OTHER and compare it with the straight line."""

    from deepalign.core.permspec import apply_permutation
    from deepalign.core.weightspace import stack
    from deepalign.evaluation import curves as mc
    from deepalign.guard import check_io
    from deepalign.io import check_output, save_torch

    reads = _reads({"REF": ref, "OTHER": other}, method, data, params, aligner, model)
    check_io(reads, {"--out": out}, force)
    check_output(out)
    cfg = _settings(params).section("curves", mc.CurvesCfg)
    a, b, arch, problem, result, dataset = _align(
        (ref, other), method, data, params, aligner, model, input_shape
    )
    ends = stack([a.ws]), stack([apply_permutation(b.ws, result.perm, problem.spec)])
    fitted = mc.fit_and_evaluate(arch, *ends, dataset.train, dataset.test, cfg)
    metrics = mc.summarize_curves(fitted)
    blob = {
        "format": "deepalign-curve/1",
        "kind": cfg.fit.kind,
        "arch": arch.to_dict(),
        "endpoints": [arch.state_dict(w[0]) for w in ends],
        "control": arch.state_dict(fitted.theta[0]),
        "metrics": metrics,
    }
    save_torch(out, blob)
    table = Table("", "curve", "straight line", title=f"{method}-aligned, {data} test")
    for key in ("mean_acc", "min_acc", "max_loss", "curve_barrier"):
        table.add_row(key, f"{metrics[key]:.4f}", f"{metrics['linear_' + key]:.4f}")
    console.print(table)
    console.print(f"fitted in {metrics['seconds_to_fit']:.1f} s; wrote {one_line(str(out))}")


if __name__ == "__main__":
    main()
