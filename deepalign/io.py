"""Checkpoints and atomic writes.

A deepalign checkpoint is a plain dict (loadable with `weights_only=True`):
  {"format": "deepalign/1", "arch": Arch.to_dict(), "state_dict": {...}, "meta": {...}}
A bare state_dict is accepted too: of the module `--model` builds, or of a plain
`nn.Sequential` whose architecture is inferred from its shapes. Every file is written through
a temp file renamed into place, never over a folder or a special file, with the permissions
the umask allows; the temp file's name (`.<name>.XXXXXXXX.deepalign.tmp`) is the one pattern
`clean_stale_temps` deletes.

A checkpoint is verified before it is trusted: a zip archive's CRC-32 of every member (torch's
reader checks none, so flipped bytes inside a tensor would load), then its records by type
and range (string keys, real floating-point tensors of 1 to 5 dimensions (integer buffers
only where the architecture has them), a mapping for `meta`, a consistent architecture
record). Every OS error names the path.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import os
import pickle
import re
import stat
import tempfile
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import deepalign.core.resnet  # noqa: F401  (registers its record kind: every checkpoint loads)
from deepalign.core.arch import Arch, arch_from_dict
from deepalign.core.chain import infer_arch
from deepalign.core.permspec import Perm, PermSpec, apply_permutation
from deepalign.core.weightspace import WeightSpace
from deepalign.errors import DeepAlignError, shown

FORMAT = "deepalign/1"


@dataclass(frozen=True)
class Checkpoint:
    """A network read from disk: architecture, parameters and free-form metadata."""

    arch: Arch
    ws: WeightSpace  # float32, for computing
    native: WeightSpace  # as stored (float16/64 kept), for writing a permuted copy back
    bare: bool  # a bare state_dict (written back as one), not a deepalign checkpoint
    arch_inferred: bool  # the architecture was guessed from shapes (conv strides unknown)
    meta: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Tensor] = field(default_factory=dict)  # integer buffers, kept as stored


def _umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output(path: Path) -> None:
    """Refuse an output path that is a folder, a special file, or under a regular file."""
    path = Path(path)
    try:
        _check_output(path)
    except OSError as e:  # a name too long, a folder without permission to look in
        raise os_error(path, e, "write") from e


def _check_output(path: Path) -> None:
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise DeepAlignError(f"{path}: cannot write under '{parent}', which is not a folder")
    if path.is_dir():
        raise DeepAlignError(f"{path}: is a folder; give a file name to write")
    if path.exists() and not stat.S_ISREG(path.stat().st_mode):
        raise DeepAlignError(
            f"{path}: not a regular file (device, FIFO or socket); refusing to replace it"
        )


def os_error(path: Path, e: OSError, doing: str) -> DeepAlignError:
    """An OS error as the one line users see: the path, what was being done, and why."""
    why = e.strerror or type(e).__name__
    return DeepAlignError(f"{path}: cannot {doing} ({why})")


TMP_SUFFIX = ".deepalign.tmp"
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}" + re.escape(TMP_SUFFIX))


@contextmanager
def atomic_path(path: Path):
    """Yield a temp path beside `path`; rename it onto `path` only if the block succeeds.

    The file gets the permissions the umask allows (mkstemp alone would leave it 0600). An OS
    error (no space, a read-only folder, a name too long) is one DeepAlignError naming `path`.
    """
    path = Path(path)
    if path.is_symlink():  # write where the link points; replacing the link would break it
        path = Path(os.path.realpath(path))
    check_output(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
        os.close(fd)
    except OSError as e:
        raise os_error(path, e, "write") from e
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        raise os_error(path, e, "write") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _is_own_temp(path: Path) -> bool:
    return _TEMP_NAME.fullmatch(path.name) is not None


def clean_stale_temps(path: Path) -> list[Path]:
    """Delete the temp files an interrupted `atomic_path` left for `path`: for a file, its own
    temps beside it; for a folder, every temp of `atomic_path`'s pattern inside it. Nothing
    else (another program's `.x.tmp`) is touched."""
    path = Path(path)
    if path.is_dir():
        stale = [p for p in path.rglob(f"*{TMP_SUFFIX}") if _is_own_temp(p)]
    elif path.parent.is_dir():
        pattern = f".{glob_escape(path.name)}.*{TMP_SUFFIX}"
        stale = [p for p in path.parent.glob(pattern) if _is_own_temp(p)]
    else:
        stale = []
    for tmp in stale:
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink(missing_ok=True)
    return stale


def glob_escape(name: str) -> str:
    """`name` with glob's special characters taken literally."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write `path` through `write(tmp)`; a failed write (a full disk) names `path`."""
    with atomic_path(path) as tmp:
        try:
            write(tmp)
        except RuntimeError as e:  # torch.save's zip writer: "file write failed"
            raise DeepAlignError(f"{path}: cannot write ({shown(str(e))})") from e


def save_torch(path: Path, blob: Any) -> None:
    """`torch.save(blob)` written atomically: serialised in memory first, so that a failed
    write is the OS's own reason (no space left, file too large), not torch's "unexpected pos"."""
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    data = buffer.getbuffer()
    write_atomic(path, lambda tmp: tmp.write_bytes(data))


def digest(record: Any, length: int = 16) -> str:
    """The resume key of every stage: sha256 of the record as sorted JSON (values JSON cannot
    hold as strings), its first `length` hex digits."""
    blob = json.dumps(record, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, or "missing"."""
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"


_PKG = Path(__file__).resolve().parent


@functools.cache
def _code_digests(code: tuple[Path, ...]) -> dict[str, str]:
    """sha256 of each source file, read once per process (a zoo fingerprints every network)."""
    return {p.resolve().relative_to(_PKG).as_posix(): file_digest(p) for p in code}


def fingerprint(record: Any, code: Iterable[Path] = ()) -> str:
    """The resume key of every resumable result (a zoo network, the aligner's training state,
    a method's alignment, a study run): the settings and inputs that decide it (`record`) and
    the bytes of the source files that compute it (`code`), so a code change redoes the work."""
    return digest({"record": record, "code": _code_digests(tuple(code))})


def read_result(path: Path) -> dict | None:
    """A saved result (JSON for .json, else torch), or None when missing or unreadable."""
    try:
        if path.suffix == ".json":
            blob = json.loads(path.read_text())
        else:
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # missing, truncated or foreign: redo the work
        return None
    return blob if isinstance(blob, dict) else None


def load_current(path: Path, fp: str) -> dict | None:
    """A result saved with `save_current` under the same fingerprint; None when it is missing,
    unreadable (a truncated or foreign file) or was made with other settings or code."""
    blob = read_result(path)
    return blob if blob is not None and blob.get("fingerprint") == fp else None


def save_current(path: Path, blob: dict, fp: str) -> None:
    """Save a resumable result (JSON for .json, else torch) atomically, with its fingerprint."""
    blob = blob | {"fingerprint": fp}
    if path.suffix == ".json":
        write_json(path, blob)
    else:
        save_torch(path, blob)


def write_json(path: Path, data: Any) -> None:
    """JSON written atomically; NaN or inf (invalid JSON) is refused, naming the file."""
    try:
        text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    except ValueError as e:
        raise DeepAlignError(f"{path}: refusing to write NaN or inf into JSON") from e
    write_atomic(path, lambda tmp: tmp.write_text(text))


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows of equal keys as a CSV file (header from the first row), written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, lambda tmp: tmp.write_text(buf.getvalue()))


def _own_storage(t: Tensor) -> Tensor:
    """A copy that owns just its elements: saving a view would save its whole base storage."""
    return t.detach().cpu().clone(memory_format=torch.contiguous_format)


def save_checkpoint(
    path: Path,
    arch: Arch,
    ws: WeightSpace,
    meta: dict | None = None,
    extras: dict[str, Tensor] | None = None,
) -> None:
    """Write an unbatched network atomically (about the size of its parameters)."""
    state = {k: _own_storage(v) for k, v in arch.state_dict(ws, extras).items()}
    blob = {"format": FORMAT, "arch": arch.to_dict(), "state_dict": state, "meta": meta or {}}
    save_torch(path, blob)


def compact_checkpoint(path: Path) -> bool:
    """Rewrite a checkpoint whose tensors carry more storage than their elements; True if so.

    Zoo files written before `_own_storage` held their whole training group's tensors.
    """
    blob = _read(Path(path))
    state = blob.get("state_dict", {}) if isinstance(blob, dict) else {}
    bloated = any(
        t.untyped_storage().nbytes() > t.numel() * t.element_size() for t in state.values()
    )
    if bloated:
        blob["state_dict"] = {k: _own_storage(v) for k, v in state.items()}
        save_torch(path, blob)
    return bloated


def check_input(path: Path, what: str = "file") -> None:
    """Refuse an input that is missing, a folder or not a regular file, in one line."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DeepAlignError(f"{path}: no such {what}") from None
    except OSError as e:
        raise os_error(path, e, "read") from e
    if stat.S_ISDIR(mode):
        raise DeepAlignError(f"{path}: is a folder, not a {what}")
    if not stat.S_ISREG(mode):
        raise DeepAlignError(f"{path}: not a regular file (device, FIFO or socket)")


def verify_archive(path: Path) -> None:
    """Check every member of a torch zip archive against its recorded CRC-32.

    torch's reader checks none, so a checkpoint with flipped bytes inside a tensor loads as
    other weights. A member whose CRC was not recorded (0, torch's `compute_crc32` off) is
    not checked.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0:
                    continue
                crc = 0
                with archive.open(info) as member:
                    while chunk := member.read(1 << 20):
                        crc = zlib.crc32(chunk, crc)
                if crc != info.CRC:
                    raise DeepAlignError(
                        f"{path}: corrupt checkpoint (member '{info.filename}' fails its CRC-32)"
                    )
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError, zlib.error) as e:
        # NotImplementedError: a damaged directory asking for "zip file version 9.0"
        raise DeepAlignError(f"{path}: corrupt or truncated checkpoint ({shown(str(e))})") from e
    except OSError as e:
        raise os_error(path, e, "read") from e


def _read(path: Path) -> Any:
    check_input(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise os_error(path, e, "read") from e
    if not (magic.startswith(b"PK") or magic.startswith(b"\x80")):  # zip, or legacy pickle
        raise DeepAlignError(f"{path}: not a torch checkpoint (neither torch.save format)")
    if magic.startswith(b"PK"):
        verify_archive(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise DeepAlignError(
            f"{path}: holds objects that weights_only loading refuses; save a state_dict instead"
        ) from e
    except OSError as e:
        raise os_error(path, e, "read") from e
    except MemoryError as e:
        raise DeepAlignError(f"{path}: too large to load into memory") from e
    except Exception as e:  # torch's zip and pickle readers raise many kinds on a bad file
        raise DeepAlignError(f"{path}: corrupt torch checkpoint ({type(e).__name__})") from e


# The dtypes a network's weights may have; float8 and the like cannot be computed on here.
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_NDIM = 5  # Linear (out, in) ... Conv3d (out, in, kd, kh, kw) weights at most


def _check_tensor(key: str, t: Tensor) -> str | None:
    """Why tensor `key` cannot be a network parameter, or None."""
    if t.layout != torch.strided:
        return f"tensor '{key}' is sparse ({t.layout}); save dense tensors (.to_dense())"
    if t.dtype not in WEIGHT_DTYPES:
        dtype = str(t.dtype).removeprefix("torch.")
        allowed = ", ".join(str(d).removeprefix("torch.") for d in WEIGHT_DTYPES)
        return f"tensor '{key}' has dtype {dtype}; weights must be one of {allowed}"
    if t.ndim == 0 or t.ndim > MAX_NDIM:
        return f"tensor '{key}' has {t.ndim} dimensions {tuple(t.shape)}; 1 to {MAX_NDIM} expected"
    if 0 in t.shape:
        return f"tensor '{key}' has a zero-size dimension {tuple(t.shape)}"
    if not torch.isfinite(t).all():
        return f"tensor '{key}' holds NaN or inf values"
    return None


def _check_state(path: Path, state: Any) -> dict[str, Tensor]:
    """The state_dict's entries as they are stored, checked to be named tensors."""
    if not isinstance(state, dict):
        raise DeepAlignError(f"{path}: not a state_dict or deepalign checkpoint")
    for key, value in state.items():
        if not isinstance(key, str):
            raise DeepAlignError(f"{path}: state_dict key {shown(key)} is not a string")
        if not isinstance(value, Tensor):
            kind = type(value).__name__
            raise DeepAlignError(f"{path}: state_dict entry '{key}' is a {kind}, not a tensor")
    return state


def _split_state(
    path: Path, arch: Arch, state: dict[str, Tensor]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The weights (every floating tensor the architecture has, each checked) and the integer
    buffers it keeps (num_batches_tracked) apart."""
    weights, extras = {}, {}
    integer = arch.integer_shapes()
    for key, t in state.items():
        if key in integer and t.layout == torch.strided and not t.is_floating_point():
            if tuple(t.shape) != integer[key] or t.is_complex() or t.dtype == torch.bool:
                dtype = str(t.dtype).removeprefix("torch.")
                raise DeepAlignError(
                    f"{path}: '{key}' is {dtype} of shape {tuple(t.shape)}; "
                    f"an integer of shape {integer[key]} expected"
                )
            extras[key] = t
            continue
        problem = _check_tensor(key, t)
        if problem:
            raise DeepAlignError(f"{path}: {problem}")
        weights[key] = t
    return weights, extras


def _check_meta(path: Path, meta: Any) -> dict[str, Any]:
    """A checkpoint's `meta` record: a mapping with string keys."""
    if not isinstance(meta, dict) or not all(isinstance(k, str) for k in meta):
        raise DeepAlignError(f"{path}: 'meta' must be a mapping of names, got {shown(meta)}")
    return dict(meta)


def _ours(path: Path, blob: Any) -> bool:
    """True for a deepalign checkpoint (checking its keys), False for a bare state_dict."""
    if not (isinstance(blob, dict) and blob.get("format") == FORMAT):
        return False
    for key in ("arch", "state_dict"):
        if key not in blob:
            raise DeepAlignError(f"{path}: deepalign checkpoint without its '{key}' record")
    return True


def load_checkpoint(path: Path | str, model: Arch | None = None) -> Checkpoint:
    """Read a deepalign checkpoint or a bare state_dict, with clear errors.

    `model` gives the architecture (a bare state_dict's, or one that overrides the record);
    without it a bare state_dict must be a plain `nn.Sequential`, its architecture inferred from
    the shapes (conv strides then stay unknown). `ws` is float32 for computing; `native` keeps
    the stored dtypes, so a permuted copy can be written back exactly.
    """
    path = Path(path)
    blob = _read(path)
    is_ours = _ours(path, blob)
    state = _check_state(path, blob["state_dict"] if is_ours else blob)
    try:
        arch = model or (arch_from_dict(blob["arch"]) if is_ours else infer_arch(state))
        weights, extras = _split_state(path, arch, state)
        native = arch.weightspace(weights)
    except DeepAlignError as e:
        raise DeepAlignError(f"{path}: {e}") from e
    meta = _check_meta(path, blob.get("meta", {})) if is_ours else {}
    ws = native.map(Tensor.float)
    inferred = not is_ours and model is None
    return Checkpoint(arch, ws, native, not is_ours, inferred, meta, extras)


def save_permuted(
    path: Path, source: Checkpoint, perm: Perm, spec: PermSpec, meta: dict | None = None
) -> None:
    """Write `source` permuted by `perm` in the format and dtypes it came in."""
    ws = apply_permutation(source.native, perm, spec)
    save_network(path, source, ws, meta)


def save_network(path: Path, source: Checkpoint, ws: WeightSpace, meta: dict | None = None) -> None:
    """Write `ws` (unbatched) in the format and dtypes `source` came in: a deepalign
    checkpoint, or a bare state_dict with every key of the source (integer buffers kept)."""
    ws = ws.replace([t.to(source.native.named[k].dtype) for k, t in ws.named.items()])
    if not source.bare:
        save_checkpoint(path, source.arch, ws, source.meta | (meta or {}), source.extras)
        return
    state = source.arch.state_dict(ws, source.extras)
    out = OrderedDict((k, _own_storage(v)) for k, v in state.items())
    out._metadata = source.arch.module_versions()  # type: ignore[attr-defined]
    save_torch(path, out)
