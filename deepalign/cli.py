"""The `deepalign` command line: inspect, permute, align and compare checkpoints."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console
from rich.table import Table

from deepalign.errors import DeepAlignError
from deepalign.io import load_checkpoint, save_like
from deepalign.permspec import apply_permutation, perm_spec, random_permutation

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()
_state = {"debug": False}


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
