"""Which settings a command uses: the defaults shipped with the package, with the keys of a
params file merged over them when one is given (`--params FILE`, `params=`). No file is read
unless it is named, so a folder's own `params.yaml` (every DVC project has one) never changes
what a command does. Unknown sections and keys of the given file are refused, each naming the
file and the key; paths inside it (aligner checkpoints, the data folder) are read relative to
that file's folder."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from deepalign.config import Count, build, pick, read_params, suggest
from deepalign.core.data import DataCfg
from deepalign.errors import DeepAlignError

T = TypeVar("T")
DEFAULTS = Path(__file__).with_name("defaults.yaml")
# Sections of the project's params.yaml that only the pipeline's stages read: a params file
# given to a command may hold them (tests/test_user_path.py checks them against params.yaml).
PIPELINE_SECTIONS = (
    "data", "zoo", "bench", "aligner", "align", "evaluate", "converge", "study", "curves",
    "scale", "resnets", "resnets_learned", "ood", "merge", "inr", "quality", "runner", "schedule",
)  # fmt: skip


@dataclass(frozen=True)
class BatchNormCfg:
    """Section `batchnorm`: how merge and interpolate treat BatchNorm statistics."""

    reset_images: Count  # training images that recompute them (0: keep the averaged ones)


def _merged(base: Any, over: Any) -> Any:
    """`over`'s values over `base`'s, mapping by mapping; anything else replaces."""
    if not (isinstance(base, Mapping) and isinstance(over, Mapping)):
        return over
    return {**base, **{k: _merged(base[k], v) if k in base else v for k, v in over.items()}}


@dataclass(frozen=True)
class Settings:
    """The packaged defaults, and the given file's keys over them."""

    values: dict[str, Any]
    given: Path | None  # the params file named by the user, if any
    given_keys: dict[str, Any]  # that file's own mapping (for paths relative to it)

    @property
    def where(self) -> Path:
        """The file errors name: the given one, else the packaged defaults."""
        return self.given or DEFAULTS

    def section(self, name: str, cls: type[T], allow_extra: bool = False) -> T:
        """Section (or 'section.sub') `name` as `cls`; errors name the file and the key."""
        return build(cls, pick(self.values, name, self.where), f"{self.where}: {name}", allow_extra)

    def path(self, section: str, value: str) -> str:
        """A path from `section`: relative to the given file's folder where that file set the
        section, else to the package's."""
        if Path(value).is_absolute():
            return value
        own = self.given is not None and section.split(".")[0] in self.given_keys
        return str((self.given.parent if own else DEFAULTS.parent) / value)  # type: ignore[union-attr]


def _check_sections(given: Path, data: dict[str, Any], defaults: dict[str, Any]) -> None:
    known = [*defaults, *(s for s in PIPELINE_SECTIONS if s not in defaults)]
    for key in data:
        if key not in known:
            raise DeepAlignError(f"{given}: {key}: unknown section{suggest(str(key), known)}")


def load_settings(given: Path | str | None = None) -> Settings:
    """The packaged defaults, with `given`'s keys merged over them when a file is named."""
    defaults = read_params(DEFAULTS)
    if given is None:
        return Settings(defaults, None, {})
    given = Path(given)
    data = read_params(given)
    _check_sections(given, data, defaults)
    return Settings(_merged(defaults, data), given, data)


def methods_cfg(settings: Settings):
    """Every method's settings (section `align`), aligner paths relative to their file."""
    from deepalign.evaluation.experiment import AlignCfg
    from deepalign.methods import MethodsCfg
    from deepalign.methods.learned import DeepAlignCfg

    known = [f.name for f in dataclasses.fields(AlignCfg)]  # the stage's keys and each method's
    section = pick(settings.values, "align", settings.where)
    for key in section if isinstance(section, Mapping) else ():
        if key not in known:
            hint = suggest(str(key), known)
            raise DeepAlignError(f"{settings.where}: align.{key}: unknown key{hint}")
    cfg = settings.section("align", MethodsCfg, allow_extra=True)
    found = [settings.path("align", p) for p in cfg.deep_align.checkpoints]
    return dataclasses.replace(cfg, deep_align=DeepAlignCfg(found))


NO_ALIGNER = (
    "method {method} needs a trained DEEP-ALIGN aligner and none was found ({looked}): give "
    "one, a file or a folder of them (aligner='aligner.pt' in Python, --aligner in the CLI); "
    "this project's `dvc repro` trains aligner/mlp.pt and aligner/cnn.pt for its digits zoos"
)


def methods_for(settings: Settings, method: str, aligner: str | Path | None = None):
    """`methods_cfg` with `aligner` (a file or folder) standing in for the configured
    aligners; a learned method with no aligner file to read stops here, saying how to give
    one."""
    from deepalign.methods import Method
    from deepalign.methods.learned import DeepAlignCfg, checkpoint_files

    cfg = methods_cfg(settings)
    if aligner is not None:
        cfg = dataclasses.replace(cfg, deep_align=DeepAlignCfg([str(aligner)]))
    if "deep_align" in Method.parse(method).steps:
        files = checkpoint_files(cfg.deep_align)
        if not any(f.is_file() for f in files):
            looked = ", ".join(map(str, files)) or "none configured"
            raise DeepAlignError(NO_ALIGNER.format(method=method, looked=looked))
    return cfg


def bn_reset_images(settings: Settings) -> int:
    """How many training images recompute a merged or interpolated network's BatchNorm
    statistics (`batchnorm.reset_images`; 0: keep the averaged running statistics)."""
    return settings.section("batchnorm", BatchNormCfg).reset_images


def data_cfg(settings: Settings, name: str) -> DataCfg:
    """Data set `name` with the file's split settings, its data folder relative to the file."""
    cfg = settings.section("data", DataCfg)
    return dataclasses.replace(cfg, name=name, root=settings.path("data", cfg.root))
