"""The second battery of bad inputs: data loss, silently wrong answers, tracebacks and
misleading messages found by trying every command as an adversary would.

Each case goes through a public entry point (the `deepalign` command line, a stage's command,
`load_checkpoint`, `load_section`, the align stage's task) and asserts what a user sees: one
`error:` line naming the file, key or option at fault, a non-zero exit (2 for a bad command
line), and no input touched.
"""

import importlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from deepalign.cli import app
from deepalign.config import load_section, read_params
from deepalign.core.chain import cnn_arch, mlp_arch
from deepalign.core.data import DataCfg
from deepalign.errors import DeepAlignError
from deepalign.evaluation.experiment import AlignCfg
from deepalign.io import clean_stale_temps, load_checkpoint, save_checkpoint, write_json
from deepalign.zoo.build import ZooCfg, init_network, write_manifest
from tests.configs import net_cfg
from tests.helpers import (
    ROOT,
    error_line,
    import_footprint,
    run_limited,
    run_main,
    runner,
    stderr_line,
)

PARAMS = str(ROOT / "params.yaml")
ARCH = mlp_arch(64, [12, 10], 10, "relu")
TANH = mlp_arch(64, [12, 10], 10, "tanh")


def mlp_file(path: Path, seed: int = 0, arch=ARCH) -> Path:
    save_checkpoint(path, arch, init_network(arch, seed))
    return path


def bare_file(path: Path, seed: int = 0, width: int = 12) -> Path:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))
    torch.save(net.state_dict(), path)
    return path


def bytes_of(*paths: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in paths}


def pair(tmp_path: Path) -> tuple[Path, Path]:
    return mlp_file(tmp_path / "ref.pt", 0), mlp_file(tmp_path / "other.pt", 1)


# --- A. data loss: no command writes what it reads --------------------------------------------


def aligner_file(tmp_path: Path) -> Path:
    path = tmp_path / "aligner.pt"
    path.write_bytes(b"a trained aligner, hours of work")
    return path


def out_is_aligner(tmp_path):
    ref, other = pair(tmp_path)
    aligner = aligner_file(tmp_path)
    args = ["align", str(ref), str(other), "--method", "deep_align", "--aligner", str(aligner)]
    return [*args, "-o", str(aligner), "--params", PARAMS], aligner


def out_inside_aligner_folder(tmp_path):
    ref, other = pair(tmp_path)
    folder = tmp_path / "aligners"
    folder.mkdir()
    kept = folder / "mlp.pt"
    kept.write_bytes(b"a trained aligner")
    args = ["align", str(ref), str(other), "--method", "deep_align", "--aligner", str(folder)]
    return [*args, "-o", str(kept), "--params", PARAMS], kept


def out_is_model(tmp_path):
    ref, other = bare_file(tmp_path / "a.pt", 0), bare_file(tmp_path / "b.pt", 1)
    model = mlp_file(tmp_path / "model.pt", 2)
    return ["align", str(ref), str(other), "--model", str(model), "-o", str(model)], model


def out_is_params_of_curve(tmp_path):
    ref, other = pair(tmp_path)
    params = tmp_path / "params.yaml"
    shutil.copy(PARAMS, params)
    return ["curve", str(ref), str(other), "--params", str(params), "-o", str(params)], params


def out_is_params_of_align(tmp_path):
    ref, other = pair(tmp_path)
    params = tmp_path / "params.yaml"
    shutil.copy(PARAMS, params)
    return ["align", str(ref), str(other), "--params", str(params), "-o", str(params)], params


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(out_is_aligner, id="align-out-is-aligner"),
        pytest.param(out_inside_aligner_folder, id="align-out-inside-aligner-folder"),
        pytest.param(out_is_model, id="align-out-is-model"),
        pytest.param(out_is_params_of_curve, id="curve-out-is-params"),
        pytest.param(out_is_params_of_align, id="align-out-is-params"),
    ],
)
def test_no_command_overwrites_what_it_reads(tmp_path, build):
    args, victim = build(tmp_path)
    before = victim.read_bytes()
    line = error_line(runner.invoke(app, args), exit_code=2)
    assert victim.name in line and "--force" in line
    assert victim.read_bytes() == before


def stage(module: str, *args: str, cwd: Path) -> tuple[int, str]:
    """A stage's command line run in this process (refusals come before any flow runs)."""
    from flows.common import cli

    flow = getattr(importlib.import_module(f"flows.{module}"), module)
    argv, here = sys.argv, Path.cwd()
    sys.argv = [f"flows/{module}.py", *args]
    os.chdir(cwd)
    try:
        cli(flow)
        return 0, ""
    except SystemExit as done:
        return int(done.code or 0), ""
    finally:
        sys.argv = argv
        os.chdir(here)


def test_stage_metrics_onto_its_params_is_refused(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    shutil.copy(PARAMS, params)
    before = params.read_bytes()
    code, _ = stage("zoo", "--params", str(params), "--metrics", str(params), cwd=tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:"), err
    assert "params.yaml" in err[0] and "--metrics" in err[0] and "--params" in err[0]
    assert params.read_bytes() == before
    assert not (tmp_path / "zoo").exists()


def test_stage_out_folder_holding_its_params_is_refused(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    shutil.copy(PARAMS, params)
    other = tmp_path / ".notes.tmp"  # another program's temp file in that folder
    other.write_bytes(b"not ours")
    code, _ = stage("zoo", "--params", str(params), "--out", ".", cwd=tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--out" in err[0], err
    assert other.read_bytes() == b"not ours" and params.read_bytes() == Path(PARAMS).read_bytes()


def test_temp_clean_up_takes_only_the_writers_own_temps(tmp_path):
    out = tmp_path / "zoo"
    (out / "mlp").mkdir(parents=True)
    write_json(out / "mlp" / "manifest.json", {"networks": []})
    foreign = [
        out / "mlp" / ".notes.md.tmp",
        out / ".index.tmp",
        out / "mlp" / ".net-0001.pt.abc.tmp",  # not the writer's 8-character infix
        tmp_path / ".zoo.abcdefgh.deepalign.tmp",  # beside the folder, not in it
    ]
    own = [out / "mlp" / ".net-0001.pt.abcd_123.deepalign.tmp"]
    for path in foreign + own:
        path.write_bytes(b"x")
    assert clean_stale_temps(out) == own
    assert all(p.exists() for p in foreign) and not own[0].exists()
    metrics = tmp_path / "zoo.json"
    mine, theirs = tmp_path / ".zoo.json.a1b2c3d4.deepalign.tmp", tmp_path / ".zoo.json.x.tmp"
    for path in (mine, theirs):
        path.write_bytes(b"x")
    assert clean_stale_temps(metrics) == [mine] and theirs.exists()


# --- B. silently wrong ------------------------------------------------------------------------


def flipped(path: Path, count: int = 200) -> Path:
    """`path` with `count` bytes inverted inside its first tensor's data."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    blob = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 8
    for k in range(count):
        blob[start + k] ^= 0xFF
    path.write_bytes(bytes(blob))
    return path


@pytest.mark.parametrize("kind", ["deepalign", "bare"])
def test_flipped_bytes_inside_a_tensor_are_detected(tmp_path, kind):
    path = mlp_file(tmp_path / "net.pt") if kind == "deepalign" else bare_file(tmp_path / "net.pt")
    flipped(path)
    line = error_line(runner.invoke(app, ["info", str(path)]), exit_code=1)
    assert "net.pt" in line and "CRC" in line


def test_an_intact_checkpoint_passes_the_crc_check(tmp_path):
    path = mlp_file(tmp_path / "net.pt")
    assert len(load_checkpoint(path).ws.params()) == 6


@pytest.mark.parametrize("order", ["relu-first", "tanh-first"])
def test_networks_with_other_activations_are_refused_in_either_order(tmp_path, order):
    relu, tanh = mlp_file(tmp_path / "relu.pt", 0), mlp_file(tmp_path / "tanh.pt", 1, TANH)
    ref, other = (relu, tanh) if order == "relu-first" else (tanh, relu)
    args = ["interpolate", str(ref), str(other), "--points", "3", "--params", PARAMS]
    line = error_line(runner.invoke(app, args), exit_code=1)
    assert "relu" in line and "tanh" in line and "differ" in line


def test_bare_state_dict_takes_the_recorded_activation_of_its_partner(tmp_path):
    tanh = mlp_file(tmp_path / "tanh.pt", 1, TANH)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 10)
    )
    torch.save(net.state_dict(), tmp_path / "bare.pt")
    bare = tmp_path / "bare.pt"
    curves = []
    for ref, other in ((tanh, bare), (bare, tanh)):
        args = ["interpolate", str(ref), str(other), "--json", "--points", "5"]
        result = runner.invoke(app, [*args, "--params", PARAMS])
        assert result.exit_code == 0, (result.output, result.exception)
        curves.append(json.loads(result.stdout))
    # both ends run as tanh networks, whichever comes first: the path is the same reversed
    assert curves[0]["loss"] == pytest.approx(curves[1]["loss"][::-1], rel=1e-4)


def tiny_zoo(folder: Path, count: int = 4) -> Path:
    records = []
    for j in range(count):
        path = folder / f"net-{j:04d}.pt"
        save_checkpoint(path, ARCH, init_network(ARCH, j), {"index": j, "split": "test"})
        records.append({"index": j, "seed": j, "split": "test", "path": path.name})
    write_manifest(folder, folder.name, ARCH, records)
    return folder


def align_cfg(pairs: int = 2) -> AlignCfg:
    params = read_params(PARAMS)["align"]
    params |= {"pairs": pairs, "planted_pairs": 1, "archs": ["mlp"], "methods": ["naive"]}
    return load_section_from(params)


def load_section_from(section: dict) -> AlignCfg:
    from deepalign.config import build

    return build(AlignCfg, section, "test align")


def test_align_stage_redoes_its_work_when_a_network_changes_in_place(tmp_path, digits):
    from flows.align import align_method
    from flows.stages import Paths

    zoo = tiny_zoo(tmp_path / "zoo" / "mlp")
    io = Paths({"zoo": tmp_path / "zoo", "out": tmp_path / "aligned"})
    data_cfg = DataCfg("digits", "data", False, 0, 0.1, 0.2)
    cfg = align_cfg()
    kept = align_method.fn("weight_matching", "mlp", io, digits, data_cfg, cfg, {})
    saved = tmp_path / "aligned" / "mlp" / "weight_matching.pt"
    first = torch.load(saved, weights_only=True)
    manifest = (zoo / "manifest.json").read_bytes()
    save_checkpoint(zoo / "net-0001.pt", ARCH, init_network(ARCH, 99), {"index": 1})
    assert (zoo / "manifest.json").read_bytes() == manifest  # the manifest did not change
    again = align_method.fn("weight_matching", "mlp", io, digits, data_cfg, cfg, kept)
    second = torch.load(saved, weights_only=True)
    assert again["fingerprint"] != kept["fingerprint"]
    assert second["fingerprint"] != first["fingerprint"]


@pytest.mark.parametrize("what", ["empty", "not-json", "cnn-in-mlp-zoo", "path-escapes"])
def test_a_broken_zoo_is_one_error_naming_it(tmp_path, digits, what):
    from flows.align import align_method
    from flows.stages import Paths

    zoo = tiny_zoo(tmp_path / "zoo" / "mlp")
    manifest = zoo / "manifest.json"
    if what == "empty":
        manifest.write_text(json.dumps({"name": "mlp", "arch": ARCH.to_dict(), "networks": []}))
    elif what == "not-json":
        manifest.write_text("{ not json")
    elif what == "cnn-in-mlp-zoo":
        cnn = cnn_arch((1, 8, 8), [4, 4], [1, 2], 10, "relu")
        save_checkpoint(zoo / "net-0002.pt", cnn, init_network(cnn, 0))
    else:
        blob = json.loads(manifest.read_text())
        blob["networks"][0]["path"] = "../../../etc/passwd"
        manifest.write_text(json.dumps(blob))
    io = Paths({"zoo": tmp_path / "zoo", "out": tmp_path / "aligned"})
    data_cfg = DataCfg("digits", "data", False, 0, 0.1, 0.2)
    with pytest.raises(DeepAlignError) as info:
        align_method.fn("naive", "mlp", io, digits, data_cfg, align_cfg(), {})
    assert "manifest.json" in str(info.value) or "net-0002.pt" in str(info.value)
    assert "\n" not in str(info.value)


# --- C. tracebacks become one line ------------------------------------------------------------


def truncated(at: float):
    def write(path: Path) -> None:
        blob = mlp_file(path).read_bytes()
        path.write_bytes(blob[: int(len(blob) * at)])

    return write


def keyed(key):
    def write(path: Path) -> None:
        state = torch.load(bare_file(path), weights_only=True)
        state[key] = state.pop("0.bias")
        torch.save(state, path)

    return write


def retyped(dtype):
    def write(path: Path) -> None:
        state = torch.load(bare_file(path), weights_only=True)
        state["0.weight"] = state["0.weight"].to(dtype)
        torch.save(state, path)

    return write


def with_meta(meta):
    def write(path: Path) -> None:
        blob = torch.load(mlp_file(path), weights_only=True)
        blob["meta"] = meta
        torch.save(blob, path)

    return write


def with_module(index: int, **changes):
    def write(path: Path) -> None:
        blob = torch.load(mlp_file(path), weights_only=True)
        blob["arch"]["modules"][index].update(changes)
        torch.save(blob, path)

    return write


def cnn_with(**changes):
    def write(path: Path) -> None:
        arch = cnn_arch((1, 8, 8), [4, 4], [1, 2], 10, "relu")
        save_checkpoint(path, arch, init_network(arch, 0))
        blob = torch.load(path, weights_only=True)
        blob["arch"]["modules"][0].update(changes)
        torch.save(blob, path)

    return write


def with_arch(record):
    def write(path: Path) -> None:
        blob = torch.load(mlp_file(path), weights_only=True)
        blob["arch"] = record
        torch.save(blob, path)

    return write


BROKEN_FILES = [
    pytest.param(truncated(0.5), ["net.pt"], id="truncated-half"),
    pytest.param(truncated(0.9), ["net.pt"], id="truncated-tail"),
    pytest.param(truncated(0.02), ["net.pt"], id="truncated-head"),
    pytest.param(keyed(7), ["net.pt", "7"], id="int-key"),
    pytest.param(keyed(("0", "bias")), ["net.pt", "('0', 'bias')"], id="tuple-key"),
    pytest.param(retyped(torch.float8_e4m3fn), ["net.pt", "float8"], id="float8"),
    pytest.param(retyped(torch.float8_e5m2), ["net.pt", "float8"], id="float8-e5m2"),
    pytest.param(with_meta([1, 2]), ["net.pt", "meta"], id="meta-is-a-list"),
    pytest.param(with_meta("seed 3"), ["net.pt", "meta"], id="meta-is-a-string"),
    pytest.param(with_meta({1: 2}), ["net.pt", "meta"], id="meta-int-keys"),
    pytest.param(cnn_with(padding=-1), ["net.pt", "padding", "-1"], id="negative-padding"),
    pytest.param(cnn_with(stride=1.5), ["net.pt", "stride", "1.5"], id="fractional-stride"),
    pytest.param(cnn_with(in_dim=3), ["net.pt", "3 channels"], id="wrong-input-channels"),
    pytest.param(cnn_with(kernel=99), ["net.pt", "no pixels"], id="kernel-wider-than-image"),
    pytest.param(with_module(0, in_dim=63), ["net.pt", "63"], id="linear-in-dim-off"),
    pytest.param(with_module(0, in_dim="64"), ["net.pt", "in_dim"], id="size-as-string"),
    pytest.param(with_module(1, kind=3), ["net.pt", "kind"], id="kind-as-int"),
    pytest.param(with_module(0, extra=1), ["net.pt", "module 0"], id="unknown-module-field"),
    pytest.param(with_arch([1, 2]), ["net.pt", "architecture"], id="arch-is-a-list"),
    pytest.param(with_arch({"modules": [], "input_shape": "64"}), ["net.pt"], id="bad-shape"),
]


@pytest.mark.parametrize(("write", "expected"), BROKEN_FILES)
def test_broken_checkpoint_is_one_line(tmp_path, write, expected):
    path = tmp_path / "net.pt"
    write(path)
    line = error_line(runner.invoke(app, ["info", str(path)]), exit_code=1)
    for text in expected:
        assert text in line, line


@pytest.mark.parametrize(
    ("net", "expected"),
    [
        pytest.param(
            nn.Sequential(nn.Linear(784, 8), nn.ReLU(), nn.Linear(8, 10)),
            "784",
            id="mnist-sized-input",
        ),
        pytest.param(
            nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 5)),
            "5 outputs",
            id="five-classes",
        ),
    ],
)
def test_network_that_does_not_fit_the_data_is_one_line(tmp_path, net, expected):
    for name in ("a.pt", "b.pt"):
        torch.save(net.state_dict(), tmp_path / name)
    args = ["interpolate", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--points", "3"]
    line = error_line(runner.invoke(app, [*args, "--params", PARAMS]), exit_code=1)
    assert "a.pt" in line and expected in line and "digits" in line


def test_name_too_long_for_output_is_one_line(tmp_path):
    src = mlp_file(tmp_path / "net.pt")
    out = tmp_path / ("x" * 300 + ".pt")
    line = error_line(runner.invoke(app, ["permute", str(src), "-o", str(out)]), exit_code=1)
    assert "xxxx" in line and "too long" in line.lower()


def test_output_under_an_unwritable_place_is_one_line(tmp_path):
    src = mlp_file(tmp_path / "net.pt")
    out = Path("/proc/self/no/such/out.pt")  # read-only for root too
    line = error_line(runner.invoke(app, ["permute", str(src), "-o", str(out)]), exit_code=1)
    assert "out.pt" in line


@pytest.mark.slow  # starts a process
def test_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    src = mlp_file(tmp_path / "net.pt")
    proc = run_limited("permute", str(src), "-o", str(tmp_path / "out.pt"), cwd=tmp_path, fsize=512)
    line = stderr_line(proc)
    assert "out.pt" in line and "cannot write" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.pt"]


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda p: p.mkdir(), id="folder"),
        pytest.param(lambda p: os.mkfifo(p), id="fifo"),
        pytest.param(lambda p: os.symlink(p.parent / "missing.pt", p), id="dangling-link"),
    ],
)
def test_an_input_that_is_no_regular_file_is_named_for_what_it_is(tmp_path, make):
    path = tmp_path / "net.pt"
    make(path)
    line = error_line(runner.invoke(app, ["info", str(path)]), exit_code=1)
    assert "net.pt" in line
    if path.is_dir():
        assert "folder" in line
    elif path.exists():
        assert "regular file" in line


def test_dev_zero_is_not_a_checkpoint():
    line = error_line(runner.invoke(app, ["info", "/dev/zero"]), exit_code=1)
    assert "/dev/zero" in line and "regular file" in line


@pytest.mark.slow  # starts a process
def test_wide_layer_beyond_memory_is_one_line_naming_its_group(tmp_path):
    for seed, name in enumerate(("a.pt", "b.pt")):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(8, 20_000), nn.ReLU(), nn.Linear(20_000, 2))
        torch.save(net.state_dict(), tmp_path / name)
    args = ["align", "a.pt", "b.pt", "-o", "out.pt", "--params", PARAMS]
    # room for the imports (a CUDA build of torch maps ~3 GB) plus 1.5 GB: the 3.2 GB
    # assignment matrix of the 20,000-wide group cannot fit
    proc = run_limited(*args, cwd=tmp_path, address_space=import_footprint() + 15 * 10**8)
    line = stderr_line(proc)
    assert "h0" in line and "20,000 units" in line and "memory" in line
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("name", ["net[bold].pt", "net[/].pt", "[red]x[/red].pt"])
def test_paths_with_brackets_are_printed_as_they_are(tmp_path, name):
    src = mlp_file(tmp_path / name)
    out = tmp_path / f"perm-{name}"
    result = runner.invoke(app, ["permute", str(src), "-o", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert out.exists() and str(out) in "".join(result.output.split("\n"))
    result = runner.invoke(app, ["info", str(src)], terminal_width=1000)
    assert result.exit_code == 0, (result.output, result.exception)
    assert str(src) in result.output


def test_newline_in_a_path_stays_on_one_line(tmp_path):
    path = tmp_path / "two\nlines.pt"
    path.write_bytes(b"nonsense")
    line = error_line(runner.invoke(app, ["info", str(path)]), exit_code=1)
    assert "two\\nlines.pt" in line


# --- D. params files that cannot hang or explode the loader ------------------------------------


def params_text(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "params.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


ALIAS_BOMB = "a: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 10)}]\n" for a, b in zip("abcdefgh", "bcdefghi")
)
MALFORMED = [
    pytest.param(b"zoo:\n  seed: \xff\xfe\n", "UTF-8", id="not-utf8"),
    pytest.param("? [a, b]\n: 1\n", "plain value", id="unhashable-key"),
    pytest.param("? {a: 1}\n: 1\n", "plain value", id="mapping-key"),
    pytest.param("zoo: " + "[" * 20_000 + "]" * 20_000, "nested", id="20000-levels"),
    pytest.param("zoo: " + "{a: " * 5000 + "1" + "}" * 5000, "nested", id="5000-mappings"),
    pytest.param(ALIAS_BOMB, "aliases", id="alias-bomb"),
    pytest.param("- 1\n- 2\n", "mapping of sections", id="a-list"),
    pytest.param("x" * (2 << 20), "bytes", id="two-megabytes"),
]


@pytest.mark.parametrize(("text", "expected"), MALFORMED)
def test_malformed_params_file_is_one_quick_error(tmp_path, text, expected):
    path = params_text(tmp_path, text)
    start = time.monotonic()
    with pytest.raises(DeepAlignError) as info:
        load_section("zoo", ZooCfg, path)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert str(path) in message and expected in message and len(message) < 500


def test_alias_bomb_in_a_value_does_not_print_the_value(tmp_path):
    params = yaml.safe_load(Path(PARAMS).read_text())
    text = yaml.safe_dump(params).replace("seed: 0\n", "seed: *i\n", 1)
    path = params_text(tmp_path, ALIAS_BOMB.replace("1,1", "1,1", 1) + text)
    start = time.monotonic()
    with pytest.raises(DeepAlignError):
        load_section("zoo", ZooCfg, path)
    assert time.monotonic() - start < 10


def edited(tmp_path: Path, dotted: str, value) -> Path:
    params = yaml.safe_load(Path(PARAMS).read_text())
    *parents, last = dotted.split(".")
    node = params
    for key in parents:
        node = node[key]
    node[last] = value
    return params_text(tmp_path, yaml.safe_dump(params))


BAD_NUMBERS = [
    pytest.param("zoo.archs.mlp.lr", float("inf"), "finite", id="lr-inf"),
    pytest.param("zoo.archs.mlp.lr", float("nan"), "finite", id="lr-nan"),
    pytest.param("zoo.archs.mlp.weight_decay", float("inf"), "finite", id="decay-inf"),
    pytest.param("zoo.archs.mlp.batch_size", 10**23, "<=", id="batch-size-1e23"),
    pytest.param("zoo.archs.mlp.batch_size", 1e23, "expected int", id="batch-size-float"),
    pytest.param("zoo.archs.mlp.epochs", 10**9, "<=", id="epochs-1e9"),
    pytest.param("zoo.archs.mlp.lr", 10**400, "finite", id="lr-400-digits"),
    pytest.param("zoo.archs.mlp.n_train", 10**12, "<=", id="n-train-1e12"),
]


@pytest.mark.parametrize(("key", "value", "expected"), BAD_NUMBERS)
def test_numbers_must_be_finite_and_bounded(tmp_path, key, value, expected):
    path = edited(tmp_path, key, value)
    with pytest.raises(DeepAlignError) as info:
        load_section("zoo", ZooCfg, path)
    assert key.removeprefix("zoo.") in str(info.value) and expected in str(info.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        pytest.param("align.sinkhorn.iterations", 10**9, id="sinkhorn-iterations-1e9"),
        pytest.param("align.weight_matching.max_iter", 10**9, id="wm-max-iter-1e9"),
        pytest.param("align.ste.steps", 10**9, id="ste-steps-1e9"),
    ],
)
def test_iterations_have_an_upper_bound(tmp_path, key, value):
    path = edited(tmp_path, key, value)
    with pytest.raises(DeepAlignError, match="must be <="):
        load_section("align", AlignCfg, path)


def test_yaml_merge_keys_work(tmp_path):
    text = (
        Path(PARAMS)
        .read_text()
        .replace(
            "  archs:\n    mlp:\n      kind: mlp\n",
            "  archs:\n    mlp: &mlp\n      kind: mlp\n",
            1,
        )
    )
    text = text.replace(
        "    cnn:\n      kind: cnn\n", "    cnn:\n      <<: *mlp\n      kind: cnn\n"
    )
    path = params_text(tmp_path, text)
    zoo = load_section("zoo", ZooCfg, path)
    assert zoo.archs["cnn"].kind == "cnn" and zoo.archs["cnn"].hidden == [16, 16, 16]


def test_a_diverged_zoo_names_the_learning_rate_and_writes_nothing(tmp_path, digits):
    from deepalign.zoo.build import planned, train_chunk

    net = net_cfg("mlp", hidden=[8], lr=1e30)
    data_cfg = DataCfg("digits", "data", False, 0, 0.1, 0.2)
    arch = mlp_arch(64, [8], 10, "relu")
    folder = tmp_path / "mlp"
    jobs, fps = planned(folder, net, 0, arch, data_cfg)
    with pytest.raises(DeepAlignError) as info:
        train_chunk(arch, jobs, digits, net, fps, torch.device("cpu"), progress=False)
    assert "zoo.archs.mlp.lr" in str(info.value) and "diverged" in str(info.value)
    assert not folder.exists() or not list(folder.iterdir())


# --- E. the command line: exit 2 for a bad option, one line for everything ----------------------


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["--method", "magic"], id="unknown-method"),
        pytest.param(["--method", "weight_matching+magic"], id="unknown-chain-step"),
        pytest.param(["--data", "imagenet"], id="unknown-data-set"),
    ],
)
def test_bad_option_values_exit_2(tmp_path, args):
    ref, other = pair(tmp_path)
    base = ["align", str(ref), str(other), "-o", str(tmp_path / "out.pt"), "--params", PARAMS]
    line = error_line(runner.invoke(app, [*base, *args]), exit_code=2)
    assert args[0] in line
    assert not (tmp_path / "out.pt").exists()


def test_even_points_exit_2(tmp_path):
    ref, other = pair(tmp_path)
    args = ["interpolate", str(ref), str(other), "--points", "4", "--params", PARAMS]
    assert "--points" in error_line(runner.invoke(app, args), exit_code=2)


@pytest.mark.slow  # starts a process
def test_console_script_exits_2_on_an_unknown_option(tmp_path):
    proc = run_main("info", str(mlp_file(tmp_path / "n.pt")), "--colour")
    assert proc.returncode == 2 and "--colour" in stderr_line(proc)


def test_sweep_values_may_be_lists():
    from flows.pipeline import parse_grid

    grid = parse_grid(["align.methods=[naive,weight_matching],[naive]", "align.pairs=2,3"])
    assert grid == {
        "align.methods": [["naive", "weight_matching"], ["naive"]],
        "align.pairs": [2, 3],
    }


@pytest.mark.slow  # starts a process
def test_sweep_checks_every_value_before_the_first_run(tmp_path):
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run_main("sweep", "align.pairs=10,-3", "--workdir", str(tmp_path))
    line = stderr_line(proc)
    assert "align.pairs" in line and "-3" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.slow  # starts a process
def test_sweep_outside_a_project_is_one_line(tmp_path):
    proc = run_main("sweep", "align.pairs=10", cwd=tmp_path)
    assert proc.returncode == 2 and "not a deepalign project" in stderr_line(proc)


@pytest.mark.slow  # starts a process
def test_torch_warnings_do_not_break_the_one_line_rule(tmp_path):
    path = tmp_path / "csr.pt"  # loading a CSR tensor makes torch warn "support is in beta"
    torch.save({"0.weight": torch.eye(4).to_sparse_csr(), "0.bias": torch.zeros(4)}, path)
    env = os.environ | {"PYTHONWARNINGS": "always"}
    line = stderr_line(run_main("info", str(path), env=env))
    assert "csr.pt" in line and "sparse" in line
