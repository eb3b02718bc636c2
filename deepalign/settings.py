"""Which settings a command uses: `--params` if given, else the project's params.yaml where
there is one, else the defaults shipped with the package. Paths inside a params file
(aligner checkpoints, the data folder) are read relative to that file's folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from deepalign.config import load_section
from deepalign.core.data import DataCfg
from deepalign.methods import MethodsCfg
from deepalign.methods.learned import DeepAlignCfg

DEFAULTS = Path(__file__).with_name("defaults.yaml")
PROJECT = Path("params.yaml")


def params_file(given: Path | None) -> Path:
    """The params file a command reads (see the module docstring)."""
    if given is not None:
        return given
    return PROJECT if PROJECT.is_file() else DEFAULTS


def _beside(path: Path, entry: str) -> str:
    """A path from a params file, taken relative to that file's folder."""
    return entry if Path(entry).is_absolute() else str(path.parent / entry)


def methods_cfg(path: Path) -> MethodsCfg:
    """Every method's settings (section `align`), aligner paths relative to the file."""
    cfg = load_section("align", MethodsCfg, path, allow_extra=True)
    found = [_beside(path, p) for p in cfg.deep_align.checkpoints]
    return dataclasses.replace(cfg, deep_align=DeepAlignCfg(found))


def bn_reset_images(path: Path) -> int:
    """How many training images recompute a merged or interpolated network's BatchNorm
    statistics (`curves.bn_reset_images`; 0: keep the averaged running statistics)."""
    from deepalign.evaluation.curves import CurvesCfg

    return load_section("curves", CurvesCfg, path).bn_reset_images


def data_cfg(path: Path, name: str) -> DataCfg:
    """Data set `name` with the file's split settings, its data folder relative to the file."""
    cfg = load_section("data", DataCfg, path)
    return dataclasses.replace(cfg, name=name, root=_beside(path, cfg.root))
