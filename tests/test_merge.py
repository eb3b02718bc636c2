"""Merging and the Python API on modules: the evaluate stage's merged network reproduced,
MergeMany on three networks, BatchNorm statistics reset, REPAIR, and the README's example."""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import deepalign
from deepalign.cli import app
from deepalign.config import load_section
from deepalign.core.arch import forward_batched
from deepalign.core.lmc import evaluate_networks, planted_pair, recovery
from deepalign.core.permspec import apply_permutation, random_permutation
from deepalign.core.weightspace import average, stack
from deepalign.evaluation.experiment import AlignCfg, method_metrics, pair_curves, run_method
from deepalign.io import load_checkpoint, save_checkpoint
from deepalign.merging import merge_networks
from deepalign.methods import Problem, align
from deepalign.settings import DEFAULTS, load_settings, methods_cfg
from deepalign.zoo.build import init_network, make_arch, train_batched
from deepalign.zoo.store import Zoo
from tests.configs import net_cfg
from tests.helpers import ROOT, run_main, runner

PARAMS = ROOT / "params.yaml"


def trained(digits, kind: str, epochs: int = 4, n: int = 2, **shape):
    net = net_cfg(kind, **shape, n_train=n, epochs=epochs)
    arch = make_arch(net, digits)
    nets = stack([init_network(arch, s) for s in range(n)])
    seeds = list(range(n))
    return arch, train_batched(
        arch, nets, digits.train, net, seeds, torch.device("cpu"), progress=False
    )


@pytest.fixture(scope="module")
def mlps(digits):
    return trained(digits, "mlp", n=3, hidden=[32, 24])


@pytest.fixture(scope="module")
def resnets(digits):
    return trained(digits, "resnet", hidden=[8, 16, 32], blocks=1)


def accuracy(arch, ws, split) -> float:
    return float(evaluate_networks(arch, stack([ws]), split)[1][0])


def test_merge_reproduces_the_evaluate_stages_merged_accuracy(tmp_path, digits, mlps):
    arch, nets = mlps
    zoo = Zoo(arch, [{"split": "test"}] * 2, stack([nets[0], nets[1]]))
    cfg = load_section("align", AlignCfg, PARAMS)
    run = run_method("weight_matching", zoo, digits, cfg)
    _, rows = method_metrics(run, pair_curves(run, zoo, digits, 25))
    for i in (0, 1):
        save_checkpoint(tmp_path / f"{i}.pt", arch, nets[i])
    args = ["merge", str(tmp_path / "0.pt"), str(tmp_path / "1.pt"), "-o", str(tmp_path / "m.pt")]
    result = runner.invoke(app, [*args, "--params", str(PARAMS)])
    assert result.exit_code == 0, result.output
    got = accuracy(arch, load_checkpoint(tmp_path / "m.pt").ws, digits.test)
    assert abs(got - rows[0]["merged_acc"]) <= 1 / len(digits.test.y)  # lerp vs mean: ulps
    assert got > 0.5


def test_three_permuted_copies_merge_back_into_their_network(digits, mlps):
    arch, nets = mlps
    gen = torch.Generator().manual_seed(0)
    copies = [
        apply_permutation(nets[0], random_permutation(arch.spec, gen), arch.spec) for _ in range(3)
    ]
    cfg = methods_cfg(load_settings())
    merged = merge_networks(arch, copies, "weight_matching", cfg)
    x = digits.test.x.flatten(1)
    same = arch.forward_batched(stack([merged, nets[0]]), x)  # (2, N, 10)
    torch.testing.assert_close(same[0], same[1], atol=1e-5, rtol=1e-5)
    naive = average(copies)  # negative twin: averaging unaligned copies loses the function
    assert accuracy(arch, naive, digits.test) < accuracy(arch, nets[0], digits.test) - 0.2


def test_merge_of_three_files_runs_merge_many_and_refuses_other_methods(tmp_path, mlps):
    arch, nets = mlps
    files = [tmp_path / f"{i}.pt" for i in range(3)]
    for f, i in zip(files, range(3)):
        save_checkpoint(f, arch, nets[i])
    out = tmp_path / "m.pt"
    result = runner.invoke(app, ["merge", *map(str, files), "-o", str(out), "--weights", "1,1,2"])
    assert result.exit_code == 0 and "MergeMany" in result.output, result.output
    assert load_checkpoint(out).ws.shapes() == nets[0].shapes()
    bad = [
        "merge",
        *map(str, files),
        "-o",
        str(tmp_path / "x.pt"),
        "--method",
        "activation_matching",
    ]
    result = runner.invoke(app, [*bad, "--data", "digits"])
    assert result.exit_code == 2 and "MergeMany" in result.output


def test_planted_permutations_of_a_resnet_are_recovered_by_weight_matching(resnets):
    arch, nets = resnets
    copy_, truth = planted_pair(nets[0], arch.spec, 0.0, torch.Generator().manual_seed(3))
    found = align(
        "weight_matching", Problem.of(nets[0], copy_, arch), methods_cfg(load_settings())
    ).perm
    assert recovery(found, truth) == 1.0
    back = apply_permutation(copy_, found, arch.spec)
    assert all(torch.equal(back.named[k], nets[0].named[k]) for k in nets[0].named)  # buffers too


@pytest.mark.parametrize("method", ["sinkhorn", "ste"])
def test_the_gradient_methods_align_resnets_with_batchnorm(digits, resnets, method):
    """Sinkhorn re-basin and STE descend through BatchNorm (batch statistics on the line, as
    evaluation recomputes them): OTHER keeps its function, and the midpoint beats naive's."""
    arch, nets = resnets
    cfg = methods_cfg(load_settings())
    steps = {"sinkhorn": dataclasses.replace(cfg.sinkhorn, steps=30)}
    steps["ste"] = dataclasses.replace(cfg.ste, steps=30)
    cfg = dataclasses.replace(cfg, **{method: steps[method]})
    perm = align(method, Problem.of(nets[0], nets[1], arch, digits.train), cfg).perm
    moved = apply_permutation(nets[1], perm, arch.spec)
    x = digits.test.x[:16]
    out = forward_batched(arch, stack([moved, nets[1]]), x.reshape(16, *arch.input_shape))
    assert torch.allclose(out[0], out[1], atol=1e-4)
    pair = [nets[0], nets[1]]
    merged = {
        name: accuracy(arch, merge_networks(arch, pair, name, cfg, train=digits.train), digits.test)
        for name in ("naive", method)
    }
    assert merged[method] > merged["naive"] + 0.05, merged


def test_resnet_merge_with_batchnorm_reset_beats_the_averaged_statistics(digits, resnets):
    arch, nets = resnets
    cfg = methods_cfg(load_settings())
    pair = [nets[0], nets[1]]
    reset = accuracy(
        arch, merge_networks(arch, pair, "weight_matching", cfg, train=digits.train), digits.test
    )
    kept = merge_networks(arch, pair, "weight_matching", cfg, train=digits.train, reset_images=0)
    assert reset > accuracy(arch, kept, digits.test) + 0.05
    with pytest.raises(deepalign.errors.DeepAlignError, match="--data"):
        merge_networks(arch, pair, "weight_matching", cfg)  # BatchNorm, no images: refused


def test_repair_moves_a_merged_chain_towards_its_parents(digits, mlps):
    arch, nets = mlps
    cfg = methods_cfg(load_settings())
    pair = [nets[0], nets[1]]
    plain = merge_networks(arch, pair, "weight_matching", cfg, train=digits.train)
    repaired = merge_networks(arch, pair, "weight_matching", cfg, train=digits.train, repair=True)
    perm = align("weight_matching", Problem.of(*pair, arch), cfg).perm
    parents = [pair[0], apply_permutation(pair[1], perm, arch.spec)]
    x = digits.train.x[:1024].flatten(1)
    for group in arch.spec.groups:  # each unit's pre-activation std is the parents' average
        goal = 0.5 * sum(arch.preactivations(n, x)[group].std(0) for n in parents)
        torch.testing.assert_close(
            arch.preactivations(repaired, x)[group].std(0), goal, atol=1e-3, rtol=1e-3
        )
    assert not torch.allclose(plain.flatten(), repaired.flatten())


# --- the Python API on modules -------------------------------------------------------------------


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.fc, self.norm, self.out = (
            nn.Linear(64, 32),
            nn.Linear(32, 32),
            nn.BatchNorm1d(32),
            nn.Linear(32, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        return self.out(h + torch.relu(self.norm(self.fc(h))))


def test_api_align_returns_a_copy_with_the_others_function_and_every_buffer(digits):
    torch.manual_seed(0)
    ref, other = Residual().double(), Residual().double()
    other.train()(torch.randn(64, 64, dtype=torch.float64))  # running statistics not 0 and 1
    aligned = deepalign.align(ref, other, method="weight_matching")
    assert type(aligned) is Residual and aligned is not other
    assert {k: (v.shape, v.dtype) for k, v in aligned.state_dict().items()} == {
        k: (v.shape, v.dtype) for k, v in other.state_dict().items()
    }
    x = torch.randn(8, 64, dtype=torch.float64)
    torch.testing.assert_close(aligned.eval()(x), other.eval()(x))
    assert not torch.equal(aligned.state_dict()["fc.weight"], other.state_dict()["fc.weight"])
    distance = sum((aligned.state_dict()[k] - ref.state_dict()[k]).norm() for k in ("inp.weight",))
    assert distance < sum(
        (other.state_dict()[k] - ref.state_dict()[k]).norm() for k in ("inp.weight",)
    )


def test_api_merge_and_interpolate_on_modules(digits):
    torch.manual_seed(0)
    mods = [Residual() for _ in range(2)]
    merged = deepalign.merge(*mods, data="digits")
    assert type(merged) is Residual and merged.state_dict().keys() == mods[0].state_dict().keys()
    report = deepalign.interpolate(mods[0], copy.deepcopy(mods[0]), data="digits", points=5)
    assert report["loss_barrier"] == 0.0 and len(report["acc"]) == 5


@pytest.mark.slow  # ~20 s: aligns and merges torchvision resnet18s
def test_the_readme_python_example_runs_from_an_empty_folder(tmp_path):
    text = (ROOT / "README.md").read_text()
    code = text.split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) < 15
    here = Path.cwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, "README.md", "exec"), {})
    finally:
        os.chdir(here)
    assert list(tmp_path.iterdir()) == []


def test_defaults_shipped_with_the_package_equal_the_projects_params():
    import yaml

    shipped = yaml.safe_load(DEFAULTS.read_text())
    project = yaml.safe_load(PARAMS.read_text())
    assert shipped["data"] == project["data"]
    assert {k: v for k, v in shipped["curves"].items()} == project["curves"]
    assert shipped["aligner"] == project["aligner"]  # train-aligner trains as the zoo stage does
    for method, settings in shipped["align"].items():
        if method != "deep_align":
            assert settings == project["align"][method], method


# --- the command line from a folder that is no project ------------------------------------------


@pytest.mark.slow  # starts a process
def test_align_merge_interpolate_work_outside_a_project_without_params(tmp_path):
    torch.manual_seed(0)
    for name in ("a.pt", "b.pt"):
        net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
        torch.save(net.state_dict(), tmp_path / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for args in (
        ["align", "a.pt", "b.pt", "-o", "aligned.pt"],
        ["merge", "a.pt", "b.pt", "-o", "merged.pt", "--data", "digits"],
        ["interpolate", "a.pt", "aligned.pt", "--data", "digits", "--json"],
    ):
        proc = run_main(*args, cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "aligned.pt", "b.pt", "merged.pt"]
    merged = torch.load(tmp_path / "merged.pt", weights_only=True)
    assert list(merged) == ["0.weight", "0.bias", "2.weight", "2.bias"]
