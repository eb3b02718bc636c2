"""Checkpoints and atomic writes.

A deepalign checkpoint is a plain dict (loadable with `weights_only=True`):
  {"format": "deepalign/1", "arch": Arch.to_dict(), "state_dict": {...}, "meta": {...}}
A bare `nn.Sequential` state_dict is accepted too; its architecture is inferred from shapes.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deepalign.arch import (
    Arch,
    infer_arch,
    state_dict_from_weightspace,
    weightspace_from_state_dict,
)
from deepalign.errors import DeepAlignError
from deepalign.weightspace import WeightSpace

FORMAT = "deepalign/1"


@dataclass(frozen=True)
class Checkpoint:
    """A network read from disk: architecture, parameters and free-form metadata."""

    arch: Arch
    ws: WeightSpace
    meta: dict[str, Any] = field(default_factory=dict)
    arch_inferred: bool = False  # True for bare state_dicts (architecture guessed from shapes)


@contextmanager
def atomic_path(path: Path):
    """Yield a temp path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    with atomic_path(path) as tmp:
        write(tmp)


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows of equal keys as a CSV file (header from the first row), written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, lambda tmp: tmp.write_text(buf.getvalue()))


def save_checkpoint(path: Path, arch: Arch, ws: WeightSpace, meta: dict | None = None) -> None:
    """Write an unbatched network atomically."""
    state = {
        k: v.detach().cpu().contiguous() for k, v in state_dict_from_weightspace(arch, ws).items()
    }
    blob = {"format": FORMAT, "arch": arch.to_dict(), "state_dict": state, "meta": meta or {}}
    write_atomic(path, lambda tmp: torch.save(blob, tmp))


def _read(path: Path) -> Any:
    if not path.is_file():
        raise DeepAlignError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise DeepAlignError(f"{path}: not a torch checkpoint (torch.save writes a zip archive)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise DeepAlignError(
            f"{path}: holds objects that weights_only loading refuses; save a state_dict instead"
        ) from e
    except (RuntimeError, zipfile.BadZipFile, EOFError, ValueError, KeyError) as e:
        raise DeepAlignError(f"{path}: corrupt torch checkpoint ({type(e).__name__})") from e


def _check_state(path: Path, state: Any) -> dict[str, Tensor]:
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise DeepAlignError(f"{path}: not a state_dict or deepalign checkpoint")
    for key, t in state.items():
        if not torch.isfinite(t).all():
            raise DeepAlignError(f"{path}: tensor '{key}' holds NaN or inf values")
    return {k: v.float() for k, v in state.items()}


def load_checkpoint(path: Path | str) -> Checkpoint:
    """Read a deepalign checkpoint or a bare nn.Sequential state_dict, with clear errors."""
    path = Path(path)
    blob = _read(path)
    is_ours = isinstance(blob, dict) and blob.get("format") == FORMAT
    state = _check_state(path, blob["state_dict"] if is_ours else blob)
    try:
        arch = Arch.from_dict(blob["arch"]) if is_ours else infer_arch(state)
        ws = weightspace_from_state_dict(arch, state)
    except DeepAlignError as e:
        raise DeepAlignError(f"{path}: {e}") from e
    meta = dict(blob.get("meta", {})) if is_ours else {}
    return Checkpoint(arch=arch, ws=ws, meta=meta, arch_inferred=not is_ours)


def save_like(path: Path, source: Checkpoint, ws: WeightSpace, meta: dict | None = None) -> None:
    """Write `ws` in the format `source` came in: a deepalign checkpoint or a bare state_dict."""
    if not source.arch_inferred:
        save_checkpoint(path, source.arch, ws, source.meta | (meta or {}))
        return
    state = state_dict_from_weightspace(source.arch, ws.detach())
    write_atomic(path, lambda tmp: torch.save({k: v.contiguous() for k, v in state.items()}, tmp))
