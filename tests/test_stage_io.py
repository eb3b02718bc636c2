"""A stage never writes what it reads: the files it reads inside a folder option follow that
option (the report reads its metrics from `--metrics`, wherever it points)."""

import json
import sys
from pathlib import Path

import pytest

from deepalign.errors import UsageError
from flows.common import check_stage_io, cli
from flows.report import STAGE, report


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A project folder with a params file and another stage's metrics in `elsewhere/`."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")
    (tmp_path / "elsewhere").mkdir()
    for stage in ("zoo", "evaluate", "inr"):  # inr: a study's results, read where present
        (tmp_path / "elsewhere" / f"{stage}.json").write_text('{"mlp": {}}\n')
    return tmp_path


@pytest.mark.parametrize(
    "given,refused",
    [
        ({"metrics": "elsewhere", "headline": "elsewhere/zoo.json"}, "zoo.json 'elsewhere/"),
        ({"metrics": "elsewhere", "out": "elsewhere/evaluate.json"}, "evaluate.json 'elsewhere/"),
        ({"metrics": "elsewhere", "headline": "elsewhere/inr.json"}, "inr.json 'elsewhere/"),
        ({"headline": "metrics/zoo.json"}, "input metrics/zoo.json 'metrics/zoo.json'"),
        ({"figures": "figs", "out": "figs/curves/x.png"}, "input figures/curves 'figs/curves'"),
    ],
)
def test_the_report_never_writes_over_what_it_reads(folder, given, refused):
    io = STAGE.paths(**{k: Path(v) for k, v in given.items()})
    with pytest.raises(UsageError, match=refused):
        check_stage_io(STAGE, io, Path("params.yaml"))


def test_a_new_file_inside_the_metrics_folder_is_allowed(folder):
    io = STAGE.paths(metrics=Path("elsewhere"), headline=Path("elsewhere/headline.json"))
    check_stage_io(STAGE, io, Path("params.yaml"))  # twin: no clash, no error


def test_the_report_command_refuses_in_one_line_and_leaves_its_input(folder, monkeypatch, capsys):
    before = (folder / "elsewhere" / "zoo.json").read_bytes()
    argv = ["report", "--metrics", "elsewhere", "--headline", "elsewhere/zoo.json"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        cli(report)  # refused before any Prefect server or flow starts
    assert done.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: elsewhere/zoo.json: --headline is the stage's input metrics/")
    assert (folder / "elsewhere" / "zoo.json").read_bytes() == before
    assert json.loads(before) == {"mlp": {}}
