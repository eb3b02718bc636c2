"""dvc.yaml cannot go stale: it is generated from the STAGEs, and covers every imported file."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deepalign.errors import DeepAlignError
from flows import dvcgen
from flows.imports import ROOT, import_closure
from flows.stages import Stage

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


def test_dvc_yaml_and_the_stage_table_are_what_the_stages_declare():
    assert dvcgen.main(["--check"]) == 0, "run `python -m flows.dvcgen`"


def test_a_changed_declaration_makes_the_check_fail(monkeypatch, capsys):
    import flows.curves

    stage = flows.curves.STAGE
    monkeypatch.setattr(flows.curves, "STAGE", Stage(**(vars(stage) | {"params": ("curves",)})))
    assert dvcgen.main(["--check"]) == 1
    stale = "out of date; run `python -m flows.dvcgen`"
    assert capsys.readouterr().out.splitlines() == [
        f"{f}: {stale}" for f in ("dvc.yaml", "docs/pipeline.md")
    ]


def test_a_stage_reading_what_no_stage_writes_is_an_error():
    stages = dvcgen.discover()
    report = next(s for s in stages if s.name == "report")
    typo = Stage(**(vars(report) | {"reads": ("metrics/zooo.json",)}))
    with pytest.raises(
        DeepAlignError, match=r"flows/report.py: STAGE reads \['metrics/zooo.json'\]"
    ):
        dvcgen._topological([*stages, typo])


def test_every_stage_reads_its_configs_from_declared_params():
    """The sections a flow builds its configs from are covered by the stage's DVC params."""
    for stage in dvcgen.discover():
        for section in stage.configs.values():
            assert any(
                section == p or section.startswith(f"{p}.") or p.startswith(f"{section}.")
                for p in stage.params
            ), f"{stage.name}: reads '{section}' but DVC does not track it"


def test_the_code_that_decides_an_alignment_exists():
    from deepalign.evaluation.experiment import ALIGNMENT_CODE

    assert len(ALIGNMENT_CODE) >= 10 and all(p.is_file() for p in ALIGNMENT_CODE)


@pytest.mark.slow  # starts a process
def test_dvc_accepts_the_generated_pipelines():
    """DVC builds one graph from both files: no output overlaps another stage or dvc.yaml."""
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "dag"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "study" in done.stdout and "evaluate" in done.stdout


def _deps(name: str) -> set[str]:
    """The code deps of one stage (`dvc.yaml:zoo`, `study/dvc.yaml:merge`)."""
    return next({str(d) for d in s[1].get("deps", [])} for s in _stages() if s[0] == name)


def test_a_stage_depends_on_the_code_it_runs_not_on_the_report_or_the_api():
    html, figures, api = (
        f"deepalign/{f}.py" for f in ("evaluation/report", "evaluation/figures", "api")
    )
    zoo, evaluate, report = (_deps(f"dvc.yaml:{s}") for s in ("zoo", "evaluate", "report"))
    assert not {html, figures, api} & zoo and "deepalign/zoo/build.py" in zoo
    assert figures in evaluate and html not in evaluate  # its figures, not the report's page
    assert html in report and figures not in report  # twin: the report stage runs the page


def test_the_lazy_api_is_no_dep_but_an_import_of_it_would_be(tmp_path, monkeypatch):
    import flows.imports as imports

    package = tmp_path / "deepalign"
    package.mkdir()
    (package / "api.py").write_text("")
    lazy = (ROOT / "deepalign" / "__init__.py").read_text()
    (package / "__init__.py").write_text(lazy)
    monkeypatch.setattr(imports, "ROOT", tmp_path)
    assert imports.import_closure("deepalign") == {Path("deepalign/__init__.py")}
    (package / "__init__.py").write_text(f"{lazy}\n\ndef api():\n    from deepalign import api\n")
    assert Path("deepalign/api.py") in imports.import_closure("deepalign")  # twin


RUNS_ANOTHER = {("bench", "zoo")}  # bench times the zoo stage's own task


def test_a_stage_flow_is_a_dep_of_its_own_stage_only():
    deps = {name.split(":")[1]: {str(d) for d in st.get("deps", [])} for name, st, _ in _stages()}
    found = {(s, o) for s in deps for o in deps if o != s and f"flows/{o}.py" in deps[s]}
    assert found == RUNS_ANOTHER
