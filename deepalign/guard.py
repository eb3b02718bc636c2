"""The one input/output guard, shared by the command line and every stage.

A command names every path it reads (params file, checkpoints, aligner, model, data, metrics)
and every path it writes, each by the option that gave it. A written path may not be a read
one (the same name, a symbolic or hard link to it, a folder that holds it, or a place inside a
folder that is read), nor another written one. The command line allows the first with
`--force` (still written through a temp file); a stage never does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from deepalign.errors import UsageError

Named = Mapping[str, Path | None]  # option name ("--model", "REF") -> path (None: not given)


def _real(path: Path) -> Path:
    """The path with every symbolic link resolved, whether or not it exists."""
    return Path(os.path.realpath(path))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them is missing or unreadable: compare names only
        return _real(a) == _real(b)


def overlap(written: Path, read: Path) -> str | None:
    """How writing `written` would touch `read`, or None."""
    if _same_file(written, read):
        return "is"
    w, r = _real(written), _real(read)
    if w in r.parents:
        return "is a folder holding"
    if r in w.parents:
        return "lies inside"
    return None


def _given(paths: Named) -> list[tuple[str, Path]]:
    return [(name, Path(p)) for name, p in paths.items() if p is not None and str(p) != ""]


def clash(reads: Named, writes: Named, folders: Named | None = None) -> str | None:
    """The first written path that touches a read path or another written path, as a phrase
    naming both paths and their options; None when the command is safe. `folders` are read
    folders whose own files a command names among `reads`: writing a new file inside them is
    allowed, writing over them (or a folder holding them) is not."""
    outs = _given(writes)
    for out_name, out in outs:
        for in_name, source in _given(reads):
            how = overlap(out, source)
            if how:
                return f"{out}: {out_name} {how} {in_name} '{source}'"
        for in_name, source in _given(folders or {}):
            how = overlap(out, source)
            if how and how != "lies inside":
                return f"{out}: {out_name} {how} {in_name} '{source}'"
    for i, (name_a, a) in enumerate(outs):
        for name_b, b in outs[i + 1 :]:
            how = overlap(a, b)
            if how:
                return f"{a}: {name_a} {how} {name_b} '{b}', which is written too"
    return None


def check_io(
    reads: Named,
    writes: Named,
    force: bool = False,
    stage: bool = False,
    folders: Named | None = None,
) -> None:
    """Refuse a command that would write what it reads (unless `force`, never for a stage)."""
    found = clash(reads, writes, folders)
    if found is None:
        return
    if stage:
        raise UsageError(f"{found}; a stage never writes what it reads")
    if "which is written too" in found:
        raise UsageError(f"{found}; give each output its own path")
    if not force:
        raise UsageError(f"{found}; refusing to overwrite an input (pass --force)")
