"""A stage's contract, declared once in its flow file as `STAGE = Stage(...)`.

The declaration names the params.yaml sections its typed configs come from, the DVC params
keys it depends on, and its paths by role: each path is a command-line option (its default:
the pipeline's path) and a DVC dep, out, metric or plot. dvc.yaml, study/dvc.yaml and the
stage table of docs/pipeline.md are generated from these declarations (`python -m flows.dvcgen`;
`tests/test_dvc_deps.py` fails when they differ).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from deepalign.errors import UsageError

# Path roles, in the order of the command's options: what DVC does with each.
ROLES = {
    "folders": "Folder the stage reads.",
    "deps": "Input, written by an earlier stage.",
    "persist": "Output kept across runs: an interrupted run resumes in it.",
    "plots": "Folder or file of CSV series DVC draws (kept in git).",
    "uncached": "Output file or folder, e.g. PNG figures (kept in git).",
    "metrics": "Metrics file (JSON, kept in git).",
}


@dataclass(frozen=True)
class Paths:
    """A stage's paths by option name: `io.zoo`, `io.metrics`."""

    at: dict[str, Path]

    def __getattr__(self, name: str) -> Path:
        if name.startswith("__") or name == "at":
            raise AttributeError(name)
        try:
            return self.at[name]
        except KeyError:
            raise AttributeError(f"no path '{name}' (known: {', '.join(self.at)})") from None


@dataclass(frozen=True)
class Plot:
    """How DVC draws the CSVs of one plots path: their x and y columns, the axis titles and a
    template (one under .dvc/plots/: `by_method` draws one line per value of the CSV's `method`
    column, `by_method_log` the same on a log y axis, `by_steps` one line per step count,
    `budget` a named point per method on a log x axis, those with a step budget `k` joined, a
    panel per `arch`)."""

    x: str
    y: str
    x_label: str
    y_label: str
    template: str = "by_method"


@dataclass(frozen=True)
class Stage:
    """One pipeline stage; its name is its flow's module name (`flows/<name>.py`)."""

    name: str
    configs: dict[str, str]  # flow argument -> params.yaml section ('a.b': a sub-section)
    params: tuple[str, ...]  # DVC params keys (may be narrower than whole sections)
    folders: dict[str, str] = field(default_factory=dict)  # option -> path, by role (ROLES)
    deps: dict[str, str] = field(default_factory=dict)
    persist: dict[str, str] = field(default_factory=dict)
    plots: dict[str, str] = field(default_factory=dict)
    uncached: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, str] = field(default_factory=dict)
    plot: dict[str, Plot] = field(default_factory=dict)  # plots option -> how DVC draws it
    headline: tuple[str, ...] = ()  # metrics options DVC shows (`dvc metrics show`); the
    # others are detail files, kept in git and logged to MLflow, but not DVC metrics
    per_arch: tuple[str, ...] = ()  # metrics options keyed by architecture: MLflow gets one
    # nested run per architecture (tagged stage/arch) with the numbers under their own names
    nested: tuple[str, ...] = ()  # metrics options the flow logs itself in nested runs (per
    # architecture and method, tagged); the stage's own run keeps the file as an artifact
    kept: tuple[str, ...] = ()  # metrics options DVC keeps across runs (persist): a resuming
    # stage keeps the timings of the work it reuses there (outputs hold no timings)
    reads: tuple[str, ...] = ()  # further deps: files other stages write
    optional: tuple[str, ...] = ()  # files read where present, not deps (another pipeline's)
    partial: tuple[str, ...] = ()  # flow arguments built from only part of their section
    notes: dict[str, str] = field(default_factory=dict)  # option -> what is inside (README)
    fan_out: bool = False  # its tasks are many similar units (networks, methods): they go to
    # the configured runner; otherwise one at a time in the stage's process (flows.common)
    pipeline: str = "dvc.yaml"  # or study/dvc.yaml (outside the default `dvc repro`)

    def roles(self) -> dict[str, str]:
        """Path option -> its role, in option order."""
        return {k: role for role in ROLES for k in getattr(self, role)}

    def defaults(self) -> dict[str, Path]:
        """Path option -> the pipeline's path."""
        return {k: Path(p) for role in ROLES for k, p in getattr(self, role).items()}

    def paths(self, root: Path | None = None, **given: Path) -> Paths:
        """The stage's paths: the pipeline's, under `root` when given, replaced by `given`."""
        unknown = set(given) - set(self.defaults())
        if unknown:
            raise UsageError(f"stage {self.name}: no path option {sorted(unknown)}")
        base = {k: root / p if root else p for k, p in self.defaults().items()}
        return Paths(base | {k: Path(v) for k, v in given.items()})

    def inputs(self, io: Paths) -> dict[str, Path]:
        """The files it reads besides its path options (`reads`, `optional`), by their names
        in words: one inside a `folders` option's default is read inside the folder given."""
        found = {}
        for name in (*self.reads, *self.optional):
            path = Path(name)
            for option, folder in self.folders.items():
                if path.is_relative_to(folder):
                    path = io.at[option] / path.relative_to(folder)
                    break
            found[f"the stage's input {name}"] = path
        return found

    def written(self, io: Paths) -> list[Path]:
        """The paths of `io` this stage writes."""
        return [io.at[k] for k, role in self.roles().items() if role not in ("folders", "deps")]
