"""No path a command or stage reads can be written by it: every path option of every command
and every stage, enumerated from their signatures and declarations, is tried as an output."""

import importlib
import inspect
import os
import shutil
import sys
import typing
from pathlib import Path

import pytest

from deepalign.cli import app
from deepalign.core.chain import mlp_arch
from deepalign.errors import UsageError
from deepalign.guard import check_io, clash, overlap
from deepalign.io import save_checkpoint
from deepalign.zoo.build import init_network
from flows.common import cli, stage_folders, stage_reads, stage_writes
from flows.dvcgen import discover
from tests.helpers import ROOT, error_line, runner

ARCH = mlp_arch(64, [12, 10], 10, "relu")
WRITES = {"out"}  # the command-line options that name a written path


# --- the guard's rule ---------------------------------------------------------------------------


def test_overlap_sees_names_links_and_folders(tmp_path):
    folder, file = tmp_path / "zoo", tmp_path / "zoo" / "net.pt"
    folder.mkdir()
    file.write_bytes(b"x")
    (tmp_path / "link.pt").symlink_to(file)
    os.link(file, tmp_path / "hard.pt")
    assert overlap(file, file) == "is"
    assert overlap(tmp_path / "link.pt", file) == "is"
    assert overlap(tmp_path / "hard.pt", file) == "is"
    assert overlap(tmp_path / "zoo" / "." / "net.pt", file) == "is"
    assert overlap(folder, file) == "is a folder holding"
    assert overlap(folder / "new.pt", folder) == "lies inside"
    # negative twins: neighbours are not overlaps
    assert overlap(tmp_path / "zoo2", folder) is None
    assert overlap(tmp_path / "net.pt", file) is None
    assert overlap(tmp_path / "other.pt", tmp_path / "another.pt") is None


def test_force_allows_overwriting_an_input_but_never_for_a_stage(tmp_path):
    source = tmp_path / "a.pt"
    source.write_bytes(b"x")
    check_io({"REF": source}, {"--out": source}, force=True)
    with pytest.raises(UsageError, match="--force"):
        check_io({"REF": source}, {"--out": source})
    with pytest.raises(UsageError, match="a stage never writes"):
        check_io({"--params": source}, {"--metrics": source}, force=True, stage=True)
    assert clash({"REF": source}, {"--out": tmp_path / "b.pt"}) is None


def test_a_new_file_inside_a_read_folder_is_allowed_where_its_files_are_named(tmp_path):
    folder = tmp_path / "metrics"
    folder.mkdir()
    (folder / "zoo.json").write_text("{}")
    reads, folders = {"reads zoo": folder / "zoo.json"}, {"--metrics": folder}
    check_io(reads, {"--headline": folder / "headline.json"}, stage=True, folders=folders)
    for out in (folder / "zoo.json", folder, tmp_path):  # an input, the folder, its parent
        with pytest.raises(UsageError):
            check_io(reads, {"--headline": out}, stage=True, folders=folders)


def test_two_outputs_on_one_path_are_refused_even_with_force(tmp_path):
    out = tmp_path / "m.json"
    with pytest.raises(UsageError, match="--plots"):
        check_io({}, {"--metrics": out, "--plots": out}, force=True)


# --- every command-line path option -------------------------------------------------------------


def path_options() -> dict[str, list[str]]:
    """Command -> the names of its parameters typed Path (read from the functions)."""
    found = {}
    for info in app.registered_commands:
        fn = inspect.unwrap(info.callback)
        hints = typing.get_type_hints(fn)
        paths = [n for n, t in hints.items() if Path in (t, *typing.get_args(t))]
        found[info.name or fn.__name__] = paths
    return found


def make_inputs(tmp_path: Path) -> dict[str, Path]:
    files = {}
    for i, name in enumerate(("checkpoint", "ref", "other", "model")):
        files[name] = tmp_path / f"{name}.pt"
        save_checkpoint(files[name], ARCH, init_network(ARCH, i))
    files["params"] = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", files["params"])
    files["aligner"] = tmp_path / "aligner.pt"
    files["aligner"].write_bytes(b"a trained aligner")
    return files


def invocation(command: str, files: dict[str, Path], out: Path) -> list[str]:
    """A command line of `command` that reads every path option it has and writes `out`."""
    f = {k: str(v) for k, v in files.items()}
    if command == "permute":
        return ["permute", f["checkpoint"], "--model", f["model"], "-o", str(out)]
    reads = [f["ref"], f["other"], "--params", f["params"], "--model", f["model"]]
    if command == "train-aligner":
        return [command, *reads, "-o", str(out)]
    return [command, *reads, "--aligner", f["aligner"], "-o", str(out)]


def read_options() -> list[tuple[str, str]]:
    options = path_options()
    return [
        (command, name)
        for command, names in options.items()
        if WRITES & set(names)
        for name in names
        if name not in WRITES
    ]


def test_every_path_option_of_every_command_is_classified():
    """A new path option must be added here (read or written): this fails until it is."""
    assert path_options() == {
        "sweep": ["workdir"],  # a project folder, read (flows.pipeline checks it)
        "info": ["checkpoint", "model"],
        "permute": ["checkpoint", "out", "model"],
        "align": ["ref", "other", "out", "params", "aligner", "model"],
        "interpolate": ["ref", "other", "params", "model"],
        "curve": ["ref", "other", "out", "params", "aligner", "model"],
        "merge": ["networks", "out", "params", "aligner", "model"],
        "train-aligner": ["out", "params", "model"],  # NETWORKS are text: files, folders, globs
    }


@pytest.mark.parametrize(("command", "option"), read_options())
def test_no_command_writes_a_path_it_reads(tmp_path, command, option):
    files = make_inputs(tmp_path)
    victim = files["ref" if option == "networks" else option]
    before = {p: p.read_bytes() for p in files.values()}
    line = error_line(runner.invoke(app, invocation(command, files, victim)), exit_code=2)
    assert victim.name in line and "--force" in line
    assert {p: p.read_bytes() for p in files.values()} == before
    assert sorted(tmp_path.iterdir()) == sorted(files.values())  # no temp left


def test_writing_beside_an_input_file_is_allowed(tmp_path):
    files = make_inputs(tmp_path)
    out = tmp_path / "permuted.pt"  # same folder as the input, another name
    result = runner.invoke(app, ["permute", str(files["checkpoint"]), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file()


# --- every stage's path options -----------------------------------------------------------------


def stage_cases() -> list[tuple[str, str, str]]:
    """(stage, read option or declared read, written option) for every stage."""
    cases = []
    for stage in discover():
        writes = [k.removeprefix("--") for k in stage_writes(stage, stage.paths())]
        reads = [*stage_reads(stage, stage.paths(), Path("params.yaml"))]
        reads += [*stage_folders(stage, stage.paths())]
        cases += [(stage.name, r, w) for r in reads for w in writes]
        cases += [(stage.name, f"--{a}", b) for a in writes for b in writes if a < b]
    return cases


def run_stage(module: str, args: list[str], cwd: Path) -> int:
    """A stage's command line in this process; the guard refuses before any flow starts."""
    flow = getattr(importlib.import_module(f"flows.{module}"), module)
    argv, here = sys.argv, Path.cwd()
    sys.argv, code = [f"flows/{module}.py", *args], 0
    os.chdir(cwd)
    try:
        cli(flow)
    except SystemExit as done:
        code = done.code or 0
    finally:
        sys.argv = argv
        os.chdir(here)
    return int(code)


def test_every_stage_has_cases():
    names = {s.name for s in discover()}
    assert names == {c[0] for c in stage_cases()}
    assert {"zoo", "align", "evaluate", "report", "study"} <= names


@pytest.mark.parametrize(("name", "read", "written"), stage_cases())
def test_no_stage_writes_a_path_it_reads(tmp_path, capsys, name, read, written):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    if read.startswith("the stage's input "):  # a declared read (the aligner): no option
        target, args = read.removeprefix("the stage's input "), []
    else:
        option = read.removeprefix("--")
        target = "params.yaml" if option == "params" else f"in-{option}"
        args = [] if option == "params" else [read, target]
    before = sorted(p.name for p in tmp_path.iterdir())
    code = run_stage(name, ["--params", "params.yaml", *args, f"--{written}", target], tmp_path)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error:") and f"--{written}" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "params.yaml").read_bytes() == (ROOT / "params.yaml").read_bytes()
