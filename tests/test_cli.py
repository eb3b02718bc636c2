"""The `deepalign` command line on real checkpoints."""

import torch
from typer.testing import CliRunner

from deepalign.arch import forward
from deepalign.cli import app
from deepalign.io import load_checkpoint, save_checkpoint

runner = CliRunner()


def test_info_lists_permutation_groups(tmp_path, cnn):
    arch, ws = cnn
    save_checkpoint(tmp_path / "net.pt", arch, ws, {"seed": 4})
    result = runner.invoke(app, ["info", str(tmp_path / "net.pt")])
    assert result.exit_code == 0
    assert "conv(1->4" in result.output and "h2" in result.output and "w3[1] x4" in result.output


def test_permute_writes_same_function_other_weights(tmp_path, mlp):
    arch, ws = mlp
    src, dst = tmp_path / "net.pt", tmp_path / "perm.pt"
    save_checkpoint(src, arch, ws)
    result = runner.invoke(app, ["permute", str(src), "--seed", "3", "-o", str(dst)])
    assert result.exit_code == 0, result.output
    permuted = load_checkpoint(dst).ws
    x = torch.randn(32, 64)
    assert (forward(arch, permuted, x) - forward(arch, ws, x)).abs().max() <= 1e-5
    assert not torch.equal(permuted.weights[0], ws.weights[0])


def test_bad_file_gives_one_line_and_nonzero_exit(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_text("hello")
    result = runner.invoke(app, ["permute", str(bad), "-o", str(tmp_path / "out.pt")])
    assert result.exit_code == 1
    assert result.output.strip().startswith("error:") and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out.pt").exists()
