"""DEEP-ALIGN trained on a user's own checkpoints (`deepalign train-aligner`,
`deepalign.train_aligner`), then used through the CLI and the API."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import deepalign
from deepalign.api import align, train_aligner
from deepalign.cli import app
from deepalign.core.permspec import apply_permutation, random_permutation
from deepalign.core.resnet import ResNet
from deepalign.core.weightspace import stack
from deepalign.errors import DeepAlignError
from deepalign.zoo.build import init_network, make_arch, train_batched
from tests.configs import net_cfg
from tests.helpers import error_line, runner
from tests.user_nets import small_resnet

N, HIDDEN, EPOCHS = 60, [16, 16], 20


def sequential(state: dict[str, torch.Tensor] | None = None) -> nn.Sequential:
    """The users' network: 64 -> 16 -> 16 -> 10, ReLU."""
    net = nn.Sequential(
        nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10)
    )
    if state is not None:
        net.load_state_dict(state)
    return net


@pytest.fixture(scope="module")
def folder(tmp_path_factory, digits) -> Path:
    """60 MLPs trained on digits for 3 epochs, written as bare state_dicts of `sequential`."""
    cfg = net_cfg("mlp", hidden=HIDDEN, n_train=N, epochs=3)
    arch = make_arch(cfg, digits)
    nets = stack([init_network(arch, s) for s in range(N)])
    nets = train_batched(
        arch, nets, digits.train, cfg, list(range(N)), torch.device("cpu"), progress=False
    )
    out = tmp_path_factory.mktemp("networks")
    for k in range(N):  # the chain's keys are `sequential`'s (0.weight, 2.weight, ...)
        state = {key: t.clone() for key, t in nets[k].named.items()}
        torch.save(sequential(state).state_dict(), out / f"net{k:02d}.pt")
    return out


def planted(net: nn.Sequential, seed: int) -> nn.Sequential:
    """`net` with its hidden units shuffled: the same function, another unit order."""
    gen = torch.Generator().manual_seed(seed)
    out = sequential(net.state_dict())
    for first, second in ((out[0], out[2]), (out[2], out[4])):
        perm = torch.randperm(first.out_features, generator=gen)
        first.weight.data, first.bias.data = first.weight.data[perm], first.bias.data[perm]
        second.weight.data = second.weight.data[:, perm]
    return out


def recovered(ref: nn.Sequential, aligned: nn.Sequential) -> float:
    """The share of hidden units that sit where REF has them (their incoming rows equal)."""
    rows = [
        (a.weight - b.weight).abs().amax(1) < 1e-6
        for a, b in ((ref[0], aligned[0]), (ref[2], aligned[2]))
    ]
    return float(torch.cat(rows).float().mean())


def test_an_aligner_trained_on_your_checkpoints_aligns_them_from_the_cli_and_the_api(
    folder, tmp_path
):
    aligner = tmp_path / "aligner.pt"
    args = ["train-aligner", str(folder), "-o", str(aligner), "--epochs", str(EPOCHS)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "trained DEEP-ALIGN on 60 networks" in result.output
    first = aligner.read_bytes()
    a, b = folder / "net00.pt", folder / "net01.pt"
    out = tmp_path / "b_aligned.pt"
    cli = [
        "align",
        str(a),
        str(b),
        "--method",
        "deep_align",
        "--aligner",
        str(aligner),
        "-o",
        str(out),
    ]
    result = runner.invoke(app, cli)
    assert result.exit_code == 0, result.output
    ref = sequential(torch.load(a, weights_only=True))
    other = sequential(torch.load(b, weights_only=True))
    x = torch.randn(8, 64)
    with torch.no_grad():
        assert torch.allclose(
            sequential(torch.load(out, weights_only=True))(x), other(x), atol=1e-5
        )
        shuffled = planted(ref, seed=3)
        assert recovered(ref, shuffled) < 0.5  # the twin: shuffled units are not in place
        found = align(ref, shuffled, method="deep_align", aligner=aligner)
        assert recovered(ref, found) >= 0.99
    # run again with the same settings: resumed from its state at the end, the same bytes
    result = runner.invoke(app, [*args, "--force"])
    assert result.exit_code == 0, result.output
    assert aligner.read_bytes() == first


def test_the_api_trains_from_modules_and_from_a_glob(folder, tmp_path):
    """Modules or paths: the same networks, the same aligner bytes."""
    modules = [
        sequential(torch.load(p, weights_only=True)) for p in sorted(folder.glob("net0*.pt"))
    ]
    numbers = train_aligner(modules, tmp_path / "from_modules.pt", epochs=2, progress=False)
    # the top-level name is the same function
    deepalign.train_aligner(
        str(folder / "net0*.pt"), tmp_path / "from_glob.pt", epochs=2, progress=False
    )
    assert (tmp_path / "from_modules.pt").read_bytes() == (tmp_path / "from_glob.pt").read_bytes()
    assert 0.0 <= numbers["best_val_planted_recovery"] <= 1.0


def test_an_aligner_written_beside_the_networks_is_not_read_as_one(tmp_path):
    """The second run reads the same 4 networks (not its own aligner or state) and resumes:
    the same bytes."""
    for k in range(4):
        torch.manual_seed(k)
        torch.save(sequential().state_dict(), tmp_path / f"n{k}.pt")
    args = ["train-aligner", str(tmp_path), "-o", str(tmp_path / "al.pt"), "--epochs", "1"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0 and "on 4 networks" in first.output, first.output
    written = (tmp_path / "al.pt").read_bytes()
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "on 4 networks" in again.output, again.output
    assert (tmp_path / "al.pt").read_bytes() == written


def test_too_few_networks_or_none_found_is_one_line(tmp_path):
    for k in range(3):
        torch.manual_seed(k)
        torch.save(sequential().state_dict(), tmp_path / f"n{k}.pt")
    line = error_line(
        runner.invoke(app, ["train-aligner", str(tmp_path), "-o", str(tmp_path / "al.pt")]), 1
    )
    assert "at least 4 networks" in line and "got 3" in line
    named = [str(tmp_path / f"n{k}.pt") for k in range(3)]
    line = error_line(runner.invoke(app, ["train-aligner", *named, "-o", named[0]]), 2)
    assert "n0.pt" in line and "--force" in line  # a network named as the output is kept
    (tmp_path / "p.yaml").write_text("aligner:\n  epochz: 3\n")
    args = ["train-aligner", *named, "--params", str(tmp_path / "p.yaml")]
    line = error_line(runner.invoke(app, args), 1)
    assert "p.yaml" in line and "epochz" in line
    result = runner.invoke(app, ["train-aligner", *named, "--epochs", "0"])
    assert result.exit_code == 2 and "--epochs" in result.output
    line = error_line(runner.invoke(app, ["train-aligner", str(tmp_path / "x*.pt")]), 1)
    assert "x*.pt: no checkpoint files" in line
    assert not (tmp_path / "al.pt").exists()
    with pytest.raises(DeepAlignError, match="objects or as paths"):
        train_aligner([sequential(), tmp_path / "n0.pt"], tmp_path / "al.pt")


def test_an_architecture_deep_align_cannot_read_is_refused_before_training(tmp_path):
    """Concatenated branches: one line naming the tensor and the groups side by side, nothing
    written."""

    class Concat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = nn.Linear(64, 8), nn.Linear(64, 8), nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.cat([torch.relu(self.a(x.flatten(1))), torch.relu(self.b(x.flatten(1)))], 1)
            return self.head(h)

    nets = []
    for k in range(4):
        torch.manual_seed(k)
        nets.append(Concat())
    with pytest.raises(DeepAlignError, match="'head.weight' axis 1 holds runs of"):
        train_aligner(nets, tmp_path / "al.pt", epochs=1, progress=False)
    assert not (tmp_path / "al.pt").exists()


RESNET = ResNet((1, 8, 8), (4, 8), 1, 10)  # tests.user_nets:small_resnet's record


@pytest.fixture(scope="module")
def resnets(tmp_path_factory, digits) -> Path:
    """60 small ResNets with BatchNorm trained on digits for 3 epochs (statistics recomputed
    after training), written as bare state_dicts of `tests.user_nets:small_resnet`."""
    cfg = net_cfg("resnet", hidden=[4, 8], blocks=1, n_train=N, epochs=3)
    nets = stack([init_network(RESNET, s) for s in range(N)])
    nets = train_batched(
        RESNET, nets, digits.train, cfg, list(range(N)), torch.device("cpu"), progress=False
    )
    out = tmp_path_factory.mktemp("resnets")
    for k in range(N):
        torch.save(RESNET.state_dict(nets[k]), out / f"r{k:02d}.pt")
    return out


def in_place(ref: nn.Module, other: nn.Module) -> float:
    """The share of conv/linear output rows (units) of `other` equal to `ref`'s."""
    rows = [
        (a.weight - b.weight).flatten(1).abs().amax(1) < 1e-6
        for a, b in zip(ref.modules(), other.modules())
        if isinstance(a, nn.Conv2d)
    ]
    return float(torch.cat(rows).float().mean())


@pytest.mark.slow
def test_an_aligner_for_your_resnets_with_batchnorm_given_by_model(resnets, tmp_path):
    """train-aligner and align with `--model`: the spec encoder reads the residual streams and
    BatchNorm; the aligned network keeps its function and a planted shuffle is undone."""
    model = ["--model", "tests.user_nets:small_resnet", "--input-shape", "1,8,8"]
    aligner = tmp_path / "resnet_aligner.pt"
    args = ["train-aligner", str(resnets), "-o", str(aligner), "--epochs", str(EPOCHS), *model]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert torch.load(aligner, weights_only=True)["encoder"] == "spec"
    a, b, out = resnets / "r00.pt", resnets / "r01.pt", tmp_path / "r01_aligned.pt"
    cli = ["align", str(a), str(b), "--method", "deep_align", "--aligner", str(aligner)]
    result = runner.invoke(app, [*cli, *model, "-o", str(out)])
    assert result.exit_code == 0, result.output
    nets = {}
    for name, path in (("a", a), ("b", b), ("out", out)):
        nets[name] = small_resnet().eval()
        nets[name].load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(nets["out"](x), nets["b"](x), atol=1e-5)
        gen = torch.Generator().manual_seed(3)
        perm = random_permutation(RESNET.spec, gen)
        ws = RESNET.weightspace(nets["a"].state_dict())
        shuffled = small_resnet().eval()
        shuffled.load_state_dict(RESNET.state_dict(apply_permutation(ws, perm, RESNET.spec)))
        assert torch.allclose(shuffled(x), nets["a"](x), atol=1e-5)
        assert in_place(nets["a"], shuffled) < 0.5  # the twin: shuffled units are not in place
        found = align(nets["a"], shuffled, method="deep_align", aligner=aligner)
        assert in_place(nets["a"], found) >= 0.99


def test_a_bad_encoder_choice_is_one_line_naming_the_key_or_the_network(tmp_path):
    """`aligner.model.encoder`: an unknown name, and the chain encoder asked for a residual
    network, are each one line; nothing is written."""
    nets = []
    for k in range(4):
        torch.manual_seed(k)
        nets.append(small_resnet())
    for value, expected in (("graph", "aligner.model.encoder"), ("chain", "chains")):
        (tmp_path / "p.yaml").write_text(f"aligner:\n  model:\n    encoder: {value}\n")
        args = [tmp_path / f"n{k}.pt" for k in range(4)]
        for net, path in zip(nets, args):
            torch.save(net.state_dict(), path)
        cli = ["train-aligner", *map(str, args), "--params", str(tmp_path / "p.yaml")]
        cli += ["--model", "tests.user_nets:small_resnet", "--input-shape", "1,8,8"]
        cli += ["-o", str(tmp_path / "al.pt"), "--epochs", "1"]
        line = error_line(runner.invoke(app, cli), 1)
        assert expected in line, line
        assert not (tmp_path / "al.pt").exists()
