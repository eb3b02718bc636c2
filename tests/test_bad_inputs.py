"""Bad inputs from the issue: each gets one clear error line, and no input is ever clobbered.

"One clear line": a non-zero exit, no traceback, and a single line starting with `error:` that
names the culprit (a file, a key, a value or an option).
"""

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import prefect._vendor.croniter  # noqa: F401  (imported here: its import runs `file`, a process)
import pytest
import torch
import yaml
from torch import nn

from deepalign.cli import app
from deepalign.config import load_section
from deepalign.core.chain import arch_of, forward, mlp_arch
from deepalign.core.data import DataCfg
from deepalign.errors import DeepAlignError
from deepalign.evaluation.curves import CurvesCfg
from deepalign.evaluation.experiment import AlignCfg, EvaluateCfg
from deepalign.io import load_checkpoint, save_checkpoint, write_json
from deepalign.methods.deep_align.checkpoint import load_aligner, save_aligner
from deepalign.methods.deep_align.model import ModelCfg, aligner_for
from deepalign.methods.deep_align.train import AlignerCfg
from deepalign.zoo.build import ZooCfg, init_network
from flows.common import RunnerCfg
from flows.schedule import ScheduleCfg
from tests.helpers import error_line, run_main, runner, stderr_line

ROOT = Path(__file__).resolve().parents[1]
PARAMS = str(ROOT / "params.yaml")
ARCH = mlp_arch(64, [12, 10, 8], 10, "relu")


# --- helpers ------------------------------------------------------------------------------


def leftover_tmp(root: Path) -> list[Path]:
    return sorted(root.rglob("*.tmp"))


def mlp_checkpoint(path: Path, seed: int = 0) -> Path:
    save_checkpoint(path, ARCH, init_network(ARCH, seed))
    return path


def small_sequential() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 10)
    )


def bare_state(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in small_sequential().to(dtype).state_dict().items()}


def strided_cnn(stride: int = 2) -> nn.Sequential:
    side = 8 // stride
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=1, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=stride, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * side * side, 10),
    )


def curve_params(tmp_path: Path) -> str:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["curves"]["fit"]["epochs"] = 1
    path = tmp_path / "curve_params.yaml"
    path.write_text(yaml.safe_dump(params))
    return str(path)


# --- A. outputs never clobber inputs ------------------------------------------------------


def clobber_align_ref(tmp_path):
    ref, other = mlp_checkpoint(tmp_path / "ref.pt"), mlp_checkpoint(tmp_path / "other.pt", 7)
    return ["align", str(ref), str(other), "-o", str(ref), "--params", PARAMS], ref, [ref, other]


def clobber_align_other(tmp_path):
    ref, other = mlp_checkpoint(tmp_path / "ref.pt"), mlp_checkpoint(tmp_path / "other.pt", 7)
    args = ["align", str(ref), str(other), "-o", str(other), "--params", PARAMS]
    return args, other, [ref, other]


def clobber_permute_same(tmp_path):
    src = mlp_checkpoint(tmp_path / "net.pt")
    return ["permute", str(src), "-o", str(src)], src, [src]


def clobber_permute_symlink(tmp_path):
    src = mlp_checkpoint(tmp_path / "net.pt")
    link = tmp_path / "alias.pt"
    os.symlink(src, link)
    return ["permute", str(src), "-o", str(link)], link, [src]


def clobber_permute_hardlink(tmp_path):
    src = mlp_checkpoint(tmp_path / "net.pt")
    link = tmp_path / "twin.pt"
    os.link(src, link)
    return ["permute", str(src), "-o", str(link)], link, [src]


def clobber_align_symlink(tmp_path):
    ref, other = mlp_checkpoint(tmp_path / "ref.pt"), mlp_checkpoint(tmp_path / "other.pt", 7)
    link = tmp_path / "alias.pt"
    os.symlink(other, link)
    args = ["align", str(ref), str(other), "-o", str(link), "--params", PARAMS]
    return args, link, [ref, other]


def clobber_curve_other(tmp_path):
    ref, other = mlp_checkpoint(tmp_path / "ref.pt"), mlp_checkpoint(tmp_path / "other.pt", 3)
    args = ["curve", str(ref), str(other), "-o", str(other), "--params", curve_params(tmp_path)]
    return args, other, [ref, other]


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(clobber_align_ref, id="align-out-is-ref"),
        pytest.param(clobber_align_other, id="align-out-is-other"),
        pytest.param(clobber_permute_same, id="permute-out-is-input"),
        pytest.param(clobber_permute_symlink, id="permute-out-symlink-to-input"),
        pytest.param(clobber_permute_hardlink, id="permute-out-hardlink-to-input"),
        pytest.param(clobber_align_symlink, id="align-out-symlink-to-other"),
        pytest.param(clobber_curve_other, id="curve-out-is-other"),
    ],
)
def test_output_onto_an_input_is_refused(tmp_path, build):
    args, out, inputs = build(tmp_path)
    before = {p: p.read_bytes() for p in inputs}
    line = error_line(runner.invoke(app, args), exit_code=2)
    assert out.name in line
    assert {p: p.read_bytes() for p in inputs} == before
    assert leftover_tmp(tmp_path) == []


def test_force_permutes_a_checkpoint_in_place(tmp_path):
    path = tmp_path / "net.pt"
    original = init_network(ARCH, 0)
    save_checkpoint(path, ARCH, original)
    result = runner.invoke(app, ["permute", str(path), "--seed", "3", "-o", str(path), "--force"])
    assert result.exit_code == 0, (result.output, result.exception)
    permuted = load_checkpoint(path).ws
    assert not torch.equal(permuted.named["0.weight"], original.named["0.weight"])
    x = torch.randn(32, 64)
    assert (forward(ARCH, permuted, x) - forward(ARCH, original, x)).abs().max() <= 1e-5
    assert leftover_tmp(tmp_path) == []


def fifo_target(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path, path.name


def directory_target(tmp_path):
    path = tmp_path / "outdir"
    path.mkdir()
    return path, path.name


def file_as_parent_target(tmp_path):
    parent = tmp_path / "file.pt"
    parent.write_bytes(b"not a directory")
    return parent / "x.pt", parent.name


def permute_into(tmp_path, out):
    src = mlp_checkpoint(tmp_path / "net.pt")
    return ["permute", str(src), "-o", str(out)], [src]


def align_into(tmp_path, out):
    ref, other = mlp_checkpoint(tmp_path / "ref.pt"), mlp_checkpoint(tmp_path / "other.pt", 7)
    return ["align", str(ref), str(other), "-o", str(out), "--params", PARAMS], [ref, other]


TARGETS = [
    pytest.param(fifo_target, id="fifo"),
    pytest.param(directory_target, id="directory"),
    pytest.param(file_as_parent_target, id="regular-file-as-parent-dir"),
]
COMMANDS = [pytest.param(permute_into, id="permute"), pytest.param(align_into, id="align")]


@pytest.mark.parametrize("make_target", TARGETS)
@pytest.mark.parametrize("command", COMMANDS)
def test_output_that_is_no_regular_file_is_refused(tmp_path, command, make_target):
    out, culprit = make_target(tmp_path)
    args, inputs = command(tmp_path, out)
    before = {p: p.read_bytes() for p in inputs}
    # a reader on the FIFO keeps a wrongly opened writer from blocking the test forever
    reader = os.open(out, os.O_RDONLY | os.O_NONBLOCK) if out.name == "fifo" else None
    try:
        line = error_line(runner.invoke(app, args), exit_code=1)
        if reader is not None:
            try:
                written = os.read(reader, 1 << 20)
            except BlockingIOError:
                written = b""
            assert written == b""
    finally:
        if reader is not None:
            os.close(reader)
    assert culprit in line
    if make_target is fifo_target:
        assert stat.S_ISFIFO(os.lstat(out).st_mode)
    elif make_target is directory_target:
        assert out.is_dir() and list(out.iterdir()) == []
    else:
        assert out.parent.is_file() and out.parent.read_bytes() == b"not a directory"
    assert {p: p.read_bytes() for p in inputs} == before
    assert leftover_tmp(tmp_path) == []


def write_checkpoint(path: Path) -> None:
    save_checkpoint(path, ARCH, init_network(ARCH, 0))


def write_some_json(path: Path) -> None:
    write_json(path, {"loss": [1.0, 2.0]})


@pytest.mark.parametrize(
    "writer",
    [
        pytest.param(write_checkpoint, id="save_checkpoint"),
        pytest.param(write_some_json, id="json"),
    ],
)
@pytest.mark.parametrize(
    ("umask", "mode"),
    [pytest.param(0o022, 0o644, id="umask022"), pytest.param(0o077, 0o600, id="umask077")],
)
def test_written_files_honour_the_umask(tmp_path, writer, umask, mode):
    old = os.umask(umask)
    try:
        writer(tmp_path / "out")
    finally:
        os.umask(old)
    assert oct(stat.S_IMODE(os.stat(tmp_path / "out").st_mode)) == oct(mode)


# --- B. checkpoints and weights -----------------------------------------------------------


def ours_without_arch(path):
    torch.save({"format": "deepalign/1", "state_dict": bare_state(), "meta": {}}, path)


def unknown_module_kind(path):
    mlp_checkpoint(path)
    blob = torch.load(path, weights_only=True)
    blob["arch"]["modules"][1]["kind"] = "swish2"
    torch.save(blob, path)


def sparse_weight(path):
    sd = bare_state()
    sd["0.weight"] = sd["0.weight"].to_sparse()
    torch.save(sd, path)


def zero_width_layer(path):
    net = nn.Sequential(nn.Linear(64, 0), nn.ReLU(), nn.Linear(0, 10))
    torch.save(net.state_dict(), path)


def retyped_weight(dtype):
    def write(path):
        sd = bare_state()
        sd["0.weight"] = sd["0.weight"].to(dtype)
        torch.save(sd, path)

    return write


@pytest.mark.parametrize(
    ("write", "expected"),
    [
        pytest.param(ours_without_arch, ["arch"], id="deepalign-checkpoint-without-arch"),
        pytest.param(unknown_module_kind, ["swish2"], id="unknown-module-kind"),
        pytest.param(sparse_weight, ["0.weight", "sparse"], id="sparse-tensor"),
        pytest.param(zero_width_layer, ["0.weight"], id="zero-width-layer"),
        pytest.param(retyped_weight(torch.complex64), ["0.weight", "complex"], id="complex"),
        pytest.param(retyped_weight(torch.bool), ["0.weight", "bool"], id="bool"),
        pytest.param(retyped_weight(torch.int64), ["0.weight", "int64"], id="int64"),
    ],
)
def test_bad_checkpoint_gives_one_line_naming_file_and_fault(tmp_path, write, expected):
    path = tmp_path / "broken.pt"
    write(path)
    line = error_line(runner.invoke(app, ["info", str(path)]), exit_code=1)
    for text in [path.name, *expected]:
        assert text in line


def aligner_without_layout(path: Path) -> Path:
    blob = {"format": "deepalign-aligner/1", "arch": ARCH.to_dict(), "state_dict": {}, "meta": {}}
    torch.save(blob, path)
    return path


def test_aligner_without_layout_is_a_clear_error(tmp_path):
    path = aligner_without_layout(tmp_path / "aligner.pt")
    with pytest.raises(DeepAlignError) as info:
        load_aligner(path)
    assert path.name in str(info.value) and "layout" in str(info.value)


def test_align_with_aligner_without_layout_gives_one_line(tmp_path):
    aligner = aligner_without_layout(tmp_path / "aligner.pt")
    ref, other = mlp_checkpoint(tmp_path / "ref.pt"), mlp_checkpoint(tmp_path / "other.pt", 7)
    args = ["align", str(ref), str(other), "--method", "deep_align", "--aligner", str(aligner)]
    args += ["-o", str(tmp_path / "out.pt"), "--params", PARAMS]
    line = error_line(runner.invoke(app, args), exit_code=1)
    assert aligner.name in line
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("command", ["align", "merge"])
def test_deep_align_without_an_aligner_says_how_to_give_one(tmp_path, command):
    """The packaged settings name no aligner: one line saying to give --aligner, not a list of
    layer widths; nothing written. With one given the same command runs (the twin)."""
    ref, other = mlp_checkpoint(tmp_path / "ref.pt"), mlp_checkpoint(tmp_path / "other.pt", 7)
    args = [command, str(ref), str(other), "--method", "deep_align", "-o", str(tmp_path / "o.pt")]
    line = error_line(runner.invoke(app, args), exit_code=1)
    assert "needs a trained DEEP-ALIGN aligner" in line and "--aligner" in line
    assert not (tmp_path / "o.pt").exists()
    cfg = ModelCfg(8, 1, 2, 8, 10.0, 0, "auto", 0)
    model = aligner_for(ARCH, cfg, ARCH.shapes(), torch.ones(len(ARCH.keys())))
    save_aligner(tmp_path / "aligner.pt", model, ARCH, {})
    result = runner.invoke(app, [*args, "--aligner", str(tmp_path / "aligner.pt")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o.pt").exists()


def test_old_non_zip_torch_file_loads(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save(bare_state(), path, _use_new_zipfile_serialization=False)
    result = runner.invoke(app, ["info", str(path)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "linear(64->" in result.output


@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float16, id="float16"), pytest.param(torch.float64, id="float64")]
)
def test_permute_keeps_the_dtype(tmp_path, dtype):
    sd = bare_state(dtype)
    src, dst = tmp_path / "net.pt", tmp_path / "perm.pt"
    torch.save(sd, src)
    result = runner.invoke(app, ["permute", str(src), "--seed", "3", "-o", str(dst)])
    assert result.exit_code == 0, (result.output, result.exception)
    out = torch.load(dst, weights_only=True)
    assert sorted(out) == sorted(sd)
    assert {k: v.dtype for k, v in out.items()} == {k: dtype for k in sd}


def test_permute_of_float64_is_exact(tmp_path):
    sd = bare_state(torch.float64)
    src, dst = tmp_path / "net.pt", tmp_path / "perm.pt"
    torch.save(sd, src)
    result = runner.invoke(app, ["permute", str(src), "--seed", "3", "-o", str(dst)])
    assert result.exit_code == 0, (result.output, result.exception)
    out = torch.load(dst, weights_only=True)
    assert all(v.dtype == torch.float64 for v in out.values())
    for key, value in sd.items():
        assert torch.equal(out[key].flatten().sort().values, value.flatten().sort().values), key
    assert any(not torch.equal(out[k], sd[k]) for k in sd)
    before, after = small_sequential().double(), small_sequential().double()
    before.load_state_dict(sd)
    after.load_state_dict(out)
    x = torch.randn(32, 64, dtype=torch.float64)
    with torch.no_grad():
        assert (after(x) - before(x)).abs().max() <= 1e-12


def test_interpolate_refuses_non_finite_results(tmp_path):
    ref, other = bare_state(), bare_state()
    ref["0.weight"].fill_(1e38)
    torch.save(ref, tmp_path / "huge.pt")
    torch.save(other, tmp_path / "other.pt")
    args = ["interpolate", str(tmp_path / "huge.pt"), str(tmp_path / "other.pt")]
    result = runner.invoke(app, [*args, "--points", "5", "--json", "--params", PARAMS])
    line = error_line(result, exit_code=1)
    assert "finite" in line
    assert "NaN" not in result.stdout and "Infinity" not in result.stdout


def save_strided_pair(tmp_path: Path, stride: int) -> tuple[str, str]:
    paths = []
    for name in ("a.pt", "b.pt"):
        torch.save(strided_cnn(stride).state_dict(), tmp_path / name)
        paths.append(str(tmp_path / name))
    return paths[0], paths[1]


def test_interpolate_of_bare_strided_cnn_asks_for_model(tmp_path):
    a, b = save_strided_pair(tmp_path, 2)
    args = ["interpolate", a, b, "--points", "3", "--params", PARAMS]
    assert "--model" in error_line(runner.invoke(app, args), exit_code=1)


def test_info_of_bare_strided_cnn_does_not_claim_stride_one(tmp_path):
    a, _ = save_strided_pair(tmp_path, 2)
    result = runner.invoke(app, ["info", a])
    assert result.exit_code == 0, (result.output, result.exception)
    # rich wraps lines at the console width: compare without whitespace and without the path
    flat = "".join(result.output.split()).replace(a, "")
    assert "s2" in flat or "s?" in flat
    assert "conv(4->6,k3s1" not in flat


def test_interpolate_of_bare_strided_cnn_with_model(tmp_path):
    a, b = save_strided_pair(tmp_path, 2)
    arch = arch_of(strided_cnn(2), (1, 8, 8))
    model = tmp_path / "model.pt"
    save_checkpoint(model, arch, init_network(arch, 0))
    args = ["interpolate", a, b, "--model", str(model), "--points", "3", "--json"]
    result = runner.invoke(app, [*args, "--params", PARAMS])
    assert result.exit_code == 0, (result.output, result.exception)
    assert len(json.loads(result.stdout)["loss"]) == 3


def test_interpolate_of_bare_stride_one_cnn_needs_no_model(tmp_path):
    a, b = save_strided_pair(tmp_path, 1)
    args = ["interpolate", a, b, "--points", "3", "--json", "--params", PARAMS]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    assert len(json.loads(result.stdout)["loss"]) == 3


# --- C. option values ---------------------------------------------------------------------


@pytest.fixture
def pair(tmp_path):
    for name in ("a.pt", "b.pt"):
        torch.save(bare_state(), tmp_path / name)
    return str(tmp_path / "a.pt"), str(tmp_path / "b.pt")


@pytest.mark.parametrize(
    "points", [pytest.param("10000001", id="ten-million-and-one"), pytest.param("1e20", id="1e20")]
)
@pytest.mark.slow  # starts a process
def test_bad_points_is_a_usage_error(pair, points):
    start = time.monotonic()
    proc = run_main("interpolate", *pair, "--points", points, "--params", PARAMS)
    assert time.monotonic() - start < 30
    assert proc.returncode == 2, proc.stderr
    assert "--points" in stderr_line(proc)


@pytest.mark.parametrize(
    "seed",
    [pytest.param("1e20", id="1e20"), pytest.param("100000000000000000000", id="twenty-digits")],
)
@pytest.mark.slow  # starts a process
def test_bad_seed_is_refused_in_one_line(tmp_path, pair, seed):
    proc = run_main("permute", pair[0], "--seed", seed, "-o", str(tmp_path / "out.pt"))
    assert "--seed" in stderr_line(proc)
    assert not (tmp_path / "out.pt").exists()


# --- D. params.yaml validated by meaning ----------------------------------------------------

SECTIONS = {
    "data": DataCfg,
    "zoo": ZooCfg,
    "align": AlignCfg,
    "aligner": AlignerCfg,
    "evaluate": EvaluateCfg,
    "curves": CurvesCfg,
    "runner": RunnerCfg,
    "schedule": ScheduleCfg,
}


def repo_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def set_key(params: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        params = params[key]
    params[last] = value


def case(edits: dict, *expected: str, id: str):
    return pytest.param(edits, expected, id=id)


BAD_VALUES = [
    case({"data.val_fraction": 1.5}, "data.val_fraction", "1.5", id="data.val_fraction=1.5"),
    case({"data.test_fraction": -0.1}, "data.test_fraction", "-0.1", id="data.test_fraction=-0.1"),
    case(
        {"data.val_fraction": 0.5, "data.test_fraction": 0.6},
        "val_fraction",
        id="data.fractions-sum-over-1",
    ),
    case({"data.name": "imagenet"}, "data.name", "imagenet", id="data.name=imagenet"),
    case({"zoo.archs.mlp.n_train": -5}, "zoo.archs.mlp.n_train", "-5", id="zoo.mlp.n_train=-5"),
    case({"zoo.chunk_size": 0}, "zoo.chunk_size", "0", id="zoo.chunk_size=0"),
    case({"zoo.chunk_size": -1}, "zoo.chunk_size", "-1", id="zoo.chunk_size=-1"),
    case({"zoo.device": "tpu"}, "zoo.device", "tpu", id="zoo.device=tpu"),
    case({"zoo.archs.mlp.kind": "rnn"}, "zoo.archs.mlp.kind", "rnn", id="zoo.mlp.kind=rnn"),
    case({"zoo.archs.mlp.lr": -0.1}, "zoo.archs.mlp.lr", "-0.1", id="zoo.mlp.lr=-0.1"),
    case(
        {"zoo.archs.mlp.optimizer": "rmsprop"},
        "zoo.archs.mlp.optimizer",
        "rmsprop",
        id="zoo.mlp.optimizer=rmsprop",
    ),
    case({"zoo.archs.mlp.momentum": 0.9}, "zoo.archs.mlp.momentum", "adam", id="adam+momentum"),
    case({"zoo.archs.mlp.momentum": 1.0}, "zoo.archs.mlp.momentum", "1.0", id="momentum=1"),
    case(
        {"align.weight_matching.max_iter": -1},
        "align.weight_matching.max_iter",
        "-1",
        id="align.weight_matching.max_iter=-1",
    ),
    case({"align.pairs": -3}, "align.pairs", "-3", id="align.pairs=-3"),
    case({"align.methods": ["weight_matching", "magic"]}, "magic", id="align.methods+magic"),
    case(
        {"align.activation_matching.statistic": "cosine"},
        "align.activation_matching.statistic",
        "cosine",
        id="align.activation_matching.statistic=cosine",
    ),
    case({"align.sinkhorn.tau": 0}, "align.sinkhorn.tau", "0", id="align.sinkhorn.tau=0"),
    case({"align.sinkhorn.loss": "l3"}, "align.sinkhorn.loss", "l3", id="align.sinkhorn.loss=l3"),
    case({"align.ste.lam": "middle"}, "align.ste.lam", "middle", id="align.ste.lam=middle"),
    case({"aligner.device": "tpu"}, "aligner.device", "tpu", id="aligner.device=tpu"),
    case({"aligner.lr": -0.001}, "aligner.lr", "-0.001", id="aligner.lr=-0.001"),
    case({"evaluate.points": 0}, "evaluate.points", "0", id="evaluate.points=0"),
    case({"evaluate.bootstrap": 0}, "evaluate.bootstrap", "0", id="evaluate.bootstrap=0"),
    case({"evaluate.compare": [["deep_align", "magic"]]}, "magic", id="evaluate.compare+magic"),
    case({"curves.points": -1}, "curves.points", "-1", id="curves.points=-1"),
    case({"curves.fit.kind": "spline"}, "curves.fit.kind", "spline", id="curves.fit.kind=spline"),
    case({"runner.workers": 0}, "runner.workers", "0", id="runner.workers=0"),
    case({"runner.kind": "mpi"}, "runner.kind", "mpi", id="runner.kind=mpi"),
    case({"schedule.cron": "not a cron"}, "schedule.cron", id="schedule.cron=not-a-cron"),
]


@pytest.mark.parametrize(("edits", "expected"), BAD_VALUES)
def test_bad_param_value_names_key_and_value(tmp_path, edits, expected):
    params = repo_params()
    for dotted, value in edits.items():
        set_key(params, dotted, value)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    section = next(iter(edits)).split(".")[0]
    with pytest.raises(DeepAlignError, match=re.escape(expected[0])) as info:
        load_section(section, SECTIONS[section], path)
    rest = str(info.value).replace(str(path), "")  # the value must not just come from the path
    for text in expected[1:]:
        assert text in rest


def test_valid_params_load_every_section(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(repo_params()))
    for source in (ROOT / "params.yaml", path):
        loaded = {name: load_section(name, cls, source) for name, cls in SECTIONS.items()}
        assert all(isinstance(loaded[name], cls) for name, cls in SECTIONS.items())


def test_duplicated_key_is_named(tmp_path):
    text = (ROOT / "params.yaml").read_text()
    doubled = text.replace("\nzoo:\n", "\nzoo:\n  seed: 5\n", 1)
    assert doubled != text
    path = tmp_path / "params.yaml"
    path.write_text(doubled)
    with pytest.raises(DeepAlignError, match=re.escape("seed")) as info:
        load_section("zoo", ZooCfg, path)
    assert "duplicate" in str(info.value).lower()


def bad_cron(params: dict) -> None:
    params["schedule"]["cron"] = "61 * * * *"


def no_schedule(params: dict) -> None:
    del params["schedule"]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        pytest.param(bad_cron, "schedule.cron", id="cron-minute-61"),
        pytest.param(no_schedule, "schedule", id="schedule-section-missing"),
    ],
)
@pytest.mark.slow  # starts a process
def test_schedule_entry_point_gives_one_line(tmp_path, edit, expected):
    params = repo_params()
    edit(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    proc = subprocess.run(
        [sys.executable, "-m", "flows.schedule", "--params", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert expected in stderr_line(proc)
