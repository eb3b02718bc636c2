"""The `deepalign` command line on real checkpoints."""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from typer.testing import CliRunner

from deepalign.cli import app
from deepalign.config import load_section
from deepalign.core.chain import forward, mlp_arch
from deepalign.core.data import DataCfg, load_dataset
from deepalign.io import load_checkpoint, save_checkpoint
from deepalign.zoo.build import init_network

ROOT = Path(__file__).resolve().parents[1]

runner = CliRunner()


def test_info_lists_permutation_groups(tmp_path, cnn):
    arch, ws = cnn
    save_checkpoint(tmp_path / "net.pt", arch, ws, {"seed": 4})
    result = runner.invoke(app, ["info", str(tmp_path / "net.pt")], terminal_width=200)
    assert result.exit_code == 0
    assert "conv(1->4" in result.output and "h2" in result.output
    assert "4.weight[0], 4.bias[0], 7.weight[1] x4" in result.output  # Flatten: blocks of 2x2


def test_permute_writes_same_function_other_weights(tmp_path, mlp):
    arch, ws = mlp
    src, dst = tmp_path / "net.pt", tmp_path / "perm.pt"
    save_checkpoint(src, arch, ws)
    result = runner.invoke(app, ["permute", str(src), "--seed", "3", "-o", str(dst)])
    assert result.exit_code == 0, result.output
    permuted = load_checkpoint(dst).ws
    x = torch.randn(32, 64)
    assert (forward(arch, permuted, x) - forward(arch, ws, x)).abs().max() <= 1e-5
    assert not torch.equal(permuted.named["0.weight"], ws.named["0.weight"])


def test_bad_file_gives_one_line_and_nonzero_exit(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_text("hello")
    result = runner.invoke(app, ["permute", str(bad), "-o", str(tmp_path / "out.pt")])
    assert result.exit_code == 1
    assert result.output.strip().startswith("error:") and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out.pt").exists()


def test_align_writes_other_in_ref_basis(tmp_path, mlp):
    arch, ref = mlp
    other_ws = init_network(arch, 7)
    save_checkpoint(tmp_path / "ref.pt", arch, ref)
    save_checkpoint(tmp_path / "other.pt", arch, other_ws)
    out = tmp_path / "aligned.pt"
    args = [
        "align",
        str(tmp_path / "ref.pt"),
        str(tmp_path / "other.pt"),
        "--method",
        "weight_matching",
        "-o",
        str(out),
        "--params",
        str(ROOT / "params.yaml"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "objective" in result.output and "weight distance to REF" in result.output
    aligned = load_checkpoint(out).ws
    x = torch.randn(32, 64)
    assert (forward(arch, aligned, x) - forward(arch, other_ws, x)).abs().max() <= 1e-5
    dist = lambda ws: (ws.flatten() - ref.flatten()).norm()  # noqa: E731
    assert dist(aligned) < dist(other_ws)


def test_align_rejects_mismatch_and_unknown_method(tmp_path, mlp, cnn):
    save_checkpoint(tmp_path / "a.pt", *mlp)
    narrower = mlp_arch(64, [12, 9, 8], 10, "relu")
    save_checkpoint(tmp_path / "b.pt", narrower, init_network(narrower, 0))
    base = [
        "align",
        str(tmp_path / "a.pt"),
        str(tmp_path / "b.pt"),
        "-o",
        str(tmp_path / "o.pt"),
        "--params",
        str(ROOT / "params.yaml"),
    ]
    result = runner.invoke(app, base)
    assert result.exit_code == 1
    assert (
        "'2.weight'" in result.output and "(10, 12)" in result.output and "(9, 12)" in result.output
    )
    result = runner.invoke(app, [*base, "--method", "magic"])
    assert result.exit_code == 2 and "known: naive, weight_matching" in result.output
    assert not (tmp_path / "o.pt").exists()


def test_interpolate_json_on_plain_state_dicts(tmp_path):
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)) for _ in range(2)]
    train = load_dataset(load_section("data", DataCfg, ROOT / "params.yaml")).train
    for net in nets:  # trained, so that the straight line between them has a barrier
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(150):
            opt.zero_grad()
            F.cross_entropy(net(train.x.flatten(1)), train.y).backward()
            opt.step()
    for i, net in enumerate(nets):
        torch.save(net.state_dict(), tmp_path / f"n{i}.pt")
    result = runner.invoke(
        app,
        [
            "interpolate",
            str(tmp_path / "n0.pt"),
            str(tmp_path / "n1.pt"),
            "--points",
            "5",
            "--json",
            "--params",
            str(ROOT / "params.yaml"),
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert metrics["lambda"] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    # cross-check against torch's own modules: the endpoints are the two networks' test losses
    test = load_dataset(load_section("data", DataCfg, ROOT / "params.yaml")).test
    with torch.no_grad():
        ends = [F.cross_entropy(net(test.x.flatten(1)), test.y).item() for net in nets]
        mid = copy.deepcopy(nets[0])
        for p, q in zip(mid.parameters(), nets[1].parameters()):
            p.mul_(0.5).add_(0.5 * q)
        midpoint = F.cross_entropy(mid(test.x.flatten(1)), test.y).item()
    assert metrics["loss"][0] == pytest.approx(ends[0], rel=1e-5)
    assert metrics["loss"][-1] == pytest.approx(ends[1], rel=1e-5)
    assert metrics["loss"][2] == pytest.approx(midpoint, rel=1e-5)
    expected = max(
        0.0,
        max(
            metrics["loss"][k] - (1 - t) * ends[0] - t * ends[1]
            for k, t in enumerate(metrics["lambda"])
        ),
    )
    assert metrics["loss_barrier"] == pytest.approx(expected, abs=1e-6)
    assert expected > 0.01  # trained, unaligned networks: a real barrier to get right
    assert ends[0] != pytest.approx(ends[1])  # twin: two different networks


def test_curve_command_fits_and_reports(tmp_path, mlp):
    arch, ref = mlp
    save_checkpoint(tmp_path / "ref.pt", arch, ref)
    save_checkpoint(tmp_path / "other.pt", arch, init_network(arch, 3))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["curves"]["fit"]["epochs"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "curve.pt"
    args = [
        "curve",
        str(tmp_path / "ref.pt"),
        str(tmp_path / "other.pt"),
        "-o",
        str(out),
        "--params",
        str(tmp_path / "params.yaml"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "min_acc" in result.output and "curve_barrier" in result.output
    blob = torch.load(out, weights_only=True)
    assert blob["metrics"]["curve_barrier"] <= blob["metrics"]["linear_curve_barrier"] + 1e-6
    assert torch.equal(blob["endpoints"][0]["0.weight"], ref.named["0.weight"])


HEAVY = ("torch", "prefect", "mlflow", "dvc", "matplotlib", "scipy")


@pytest.mark.parametrize(
    "command", ["", "info", "permute", "align", "merge", "interpolate", "curve", "sweep"]
)
@pytest.mark.slow  # starts a process
def test_help_lists_every_option_without_loading_the_heavy_libraries(command):
    """`deepalign [COMMAND] --help` prints its options from the parsed signature alone: none
    of torch, Prefect or MLflow is imported (what made `--help` take seconds)."""
    import subprocess
    import sys

    probe = (
        "import sys; from deepalign.cli import main; sys.argv = ['deepalign', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit as done:\n    code = done.code\n"
        f"print('LOADED', [m for m in {HEAVY!r} if m in sys.modules], code)"
    )
    args = [command, "--help"] if command else ["--help"]
    done = subprocess.run(
        [sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120
    )
    assert done.stdout.rstrip().endswith("LOADED [] 0"), done.stdout[-500:] + done.stderr[-500:]
    assert "--help" in done.stdout
    if command in ("align", "merge", "sweep"):
        assert "--debug" in done.stdout or "--model" in done.stdout  # its own options listed


def test_no_arguments_print_the_help_not_an_error(monkeypatch, capsys):
    from deepalign.cli import main

    monkeypatch.setattr(sys, "argv", ["deepalign"])
    with pytest.raises(SystemExit) as done:
        main()
    out, err = capsys.readouterr()
    assert done.value.code == 0 and out.startswith("Usage: ") and "Commands:" in out
    assert err == ""
    monkeypatch.setattr(sys, "argv", ["deepalign", "--no-such-option"])  # twin: a bad one
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 2 and capsys.readouterr().err.startswith("error:")
