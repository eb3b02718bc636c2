"""dvc.yaml cannot go stale: every project file a stage's command imports is one of its deps."""

import re
from pathlib import Path

import pytest
import yaml

from tests.imports import ROOT, import_closure

PIPELINES = [ROOT / "dvc.yaml", ROOT / "study" / "dvc.yaml"]


def _stages() -> list[tuple[str, dict, Path]]:
    """(name, stage, working dir) of every stage of every pipeline."""
    out = []
    for path in PIPELINES:
        for name, stage in yaml.safe_load(path.read_text())["stages"].items():
            wdir = (path.parent / stage.get("wdir", ".")).resolve()
            out.append((f"{path.relative_to(ROOT)}:{name}", stage, wdir))
    return out


def uncovered(stage: dict, wdir: Path) -> list[str]:
    """Project files imported by the stage's `python -m` command that no dep covers."""
    module = re.search(r"python -m (\S+)", stage["cmd"])
    assert module, f"not a `python -m` stage: {stage['cmd']}"
    deps = [(wdir / d).resolve() for d in stage.get("deps", [])]
    missing = []
    for rel in sorted(import_closure(module.group(1))):
        path = ROOT / rel
        if not any(path == d or d in path.parents for d in deps):
            missing.append(str(rel))
    return missing


@pytest.mark.parametrize("name,stage,wdir", _stages(), ids=[s[0] for s in _stages()])
def test_stage_deps_cover_every_imported_project_file(name, stage, wdir):
    assert uncovered(stage, wdir) == [], f"{name}: add these to its deps"


def test_a_removed_dep_is_reported():
    name, stage, wdir = next(s for s in _stages() if s[0] == "dvc.yaml:evaluate")
    assert uncovered(stage, wdir) == []
    pruned = stage | {"deps": [d for d in stage["deps"] if d != "deepalign/core/permspec.py"]}
    assert uncovered(pruned, wdir) == ["deepalign/core/permspec.py"]


def test_closure_follows_parents_and_from_imports():
    closure = {str(p) for p in import_closure("flows.train_aligner")}
    # `from deepalign.methods.deep_align.model import ...` runs both packages' __init__ first
    assert {"deepalign/__init__.py", "deepalign/methods/deep_align/__init__.py"} <= closure
    assert "deepalign/methods/deep_align/model.py" in closure and "flows/common.py" in closure
    assert "deepalign/cli.py" not in closure  # twin: not everything is imported


def _readme_rows() -> dict[str, list[str]]:
    """The README's stage table: stage -> [flow, params, writes] cells."""
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`") and cells[1].startswith("`flows/"):
            rows[cells[0].split("`")[1]] = cells[1:]
    return rows


def test_readme_stage_table_matches_the_pipelines():
    rows = _readme_rows()
    names = [name.split(":")[1] for name, _, _ in _stages()]
    assert sorted(rows) == sorted(names)
    for name, stage, _ in _stages():
        flow, params, writes = rows[name.split(":")[1]]
        module = re.search(r"python -m (\S+)", stage["cmd"]).group(1)
        assert flow == f"`{module.replace('.', '/')}.py`", name
        assert re.findall(r"`([^`]+)`", params) == stage.get("params", []), name
        for kind in ("outs", "metrics", "plots"):
            for out in stage.get(kind, []):
                path = next(iter(out)) if isinstance(out, dict) else out
                assert f"`{path}" in writes, f"{name}: README does not name {path}"


def test_the_code_that_decides_an_alignment_exists():
    from deepalign.evaluation.experiment import ALIGNMENT_CODE

    assert len(ALIGNMENT_CODE) >= 10 and all(p.is_file() for p in ALIGNMENT_CODE)
