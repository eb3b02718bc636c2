"""Users' own modules on the command line: `--model path/to/file.py:callable` or
`pkg.module:callable`; the output keeps every key, shape, dtype and buffer of the input."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

from deepalign.cli import app
from tests.helpers import error_line, run_main, runner

MODEL = '''
import torch
from torch import nn


class Net(nn.Module):
    """A residual network with BatchNorm and a bias-free layer: no plain Sequential."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 10)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        h = torch.relu(h + self.bn2(self.conv(h)))
        return self.head(h.mean((2, 3)))


def build():
    return Net()
'''


def load_net(folder):
    import importlib.util

    spec = importlib.util.spec_from_file_location("user_model", folder / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build


@pytest.fixture
def project(tmp_path):
    (tmp_path / "model.py").write_text(MODEL)
    build = load_net(tmp_path)
    for seed, name in ((0, "a.pt"), (1, "b.pt")):
        torch.manual_seed(seed)
        net = build().double()  # float64 kept in the output
        net.train()(torch.randn(32, 1, 8, 8, dtype=torch.float64))  # running statistics
        torch.save(net.state_dict(), tmp_path / name)
    return tmp_path, build


def same_layout(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(
        a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a
    )


@pytest.mark.slow  # starts a process
def test_every_command_takes_a_model_from_a_python_file(project):
    folder, build = project
    model = ["--model", "model.py:build"]
    runs = {
        "info": ["info", "a.pt", *model],
        "permute": ["permute", "a.pt", "-o", "p.pt", *model],
        "align": ["align", "a.pt", "b.pt", "-o", "aligned.pt", *model],
        "merge": ["merge", "a.pt", "b.pt", "-o", "merged.pt", "--data", "digits", *model],
        "interpolate": ["interpolate", "a.pt", "aligned.pt", "--json", "--points", "5", *model],
    }
    for name, args in runs.items():
        proc = run_main(*args, cwd=folder)
        assert proc.returncode == 0, (name, proc.stderr)
    source = torch.load(folder / "b.pt", weights_only=True)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    reference = build().double().eval()
    reference.load_state_dict(source)
    for name in ("p.pt", "aligned.pt", "merged.pt"):
        state = torch.load(folder / name, weights_only=True)
        assert same_layout(state, source), name
    for name, like in (("aligned.pt", "b.pt"), ("p.pt", "a.pt")):  # the same function
        net, want = build().double().eval(), build().double().eval()
        net.load_state_dict(torch.load(folder / name, weights_only=True))
        want.load_state_dict(torch.load(folder / like, weights_only=True))
        torch.testing.assert_close(net(x), want(x))
    line = json.loads(run_main(*runs["interpolate"], cwd=folder).stdout)
    assert len(line["acc"]) == 5


def test_a_state_dict_with_batchnorm_asks_for_the_model(project):
    folder, _ = project
    line = error_line(runner.invoke(app, ["info", str(folder / "a.pt")]), 1)
    assert "--model" in line and "a.pt" in line


@pytest.mark.slow  # starts a process
def test_bad_model_references_are_one_line(project):
    folder, _ = project
    for ref, words in (
        ("model.py:nothing", "has no callable 'nothing'"),
        ("missing.py:build", "no such Python file"),
        ("no_such_package_x:build", "cannot import"),
    ):
        proc = run_main("info", "a.pt", "--model", ref, cwd=folder)
        assert proc.returncode != 0 and words in proc.stderr and len(proc.stderr.splitlines()) == 1


@pytest.mark.slow  # starts a process
def test_torchvision_resnet18_aligns_from_the_command_line(tmp_path):
    for seed, name in ((0, "a.pt"), (1, "b.pt")):
        torch.manual_seed(seed)
        torch.save(torchvision.models.resnet18().state_dict(), tmp_path / name)
    args = ["align", "a.pt", "b.pt", "--method", "weight_matching", "-o", "out.pt"]
    proc = run_main(*args, "--model", "torchvision.models:resnet18", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out, other = torchvision.models.resnet18().eval(), torchvision.models.resnet18().eval()
    out.load_state_dict(torch.load(tmp_path / "out.pt", weights_only=True))
    other.load_state_dict(torch.load(tmp_path / "b.pt", weights_only=True))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(out(x), other(x), atol=1e-4, rtol=1e-4)
        assert not torch.equal(out.conv1.weight, other.conv1.weight)  # permuted, not copied


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--weights", "1,x"], "--weights"),
        (["--weights", "1,-1"], "weights"),
        (["--weights", "1,1,1"], "one finite, non-negative weight per network"),
        (["--input-shape", "3,-2"], "--input-shape"),
    ],
    ids=["weights-not-numbers", "weights-negative", "weights-count", "input-shape"],
)
@pytest.mark.slow  # starts a process
def test_bad_merge_options_are_one_line_and_write_nothing(project, extra, words):
    folder, _ = project
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    args = ["merge", "a.pt", "b.pt", "-o", "m.pt", "--model", "model.py:build", "--data", "digits"]
    proc = run_main(*args, *extra, cwd=folder)
    assert proc.returncode != 0 and words in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == {
        k: v for k, v in before.items() if (folder / k).is_file()
    }


MYNETS = """
import torch


def build():
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
"""


@pytest.mark.slow  # starts a process
def test_the_readme_command_line_tour_runs_as_written(tmp_path):
    """The README's tour, line by line in a shell, on two MLPs and two resnet18s of a user's."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    tour = re.search(r"own networks:\n\n```bash\n(.*?)```", readme, re.DOTALL).group(1)
    lines = [line.split("#")[0].strip() for line in tour.splitlines() if line.strip()]
    assert len(lines) >= 5 and all(line.startswith("deepalign ") for line in lines)
    (tmp_path / "mynets.py").write_text(MYNETS)
    for seed, name in enumerate(("A.pt", "B.pt")):
        torch.manual_seed(seed)
        torch.save(load_mynets(tmp_path)().state_dict(), tmp_path / name)
    for seed, name in enumerate(("R1.pt", "R2.pt")):
        torch.manual_seed(seed)
        torch.save(torchvision.models.resnet18().state_dict(), tmp_path / name)
    bin_dir = Path(sys.executable).parent
    for line in lines:
        done = subprocess.run(
            line, shell=True, cwd=tmp_path, capture_output=True, text=True,
            env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)},
        )  # fmt: skip
        assert done.returncode == 0, (line, done.stderr[-800:])
    for out in ("aligned.pt", "merged.pt", "r2_aligned.pt"):
        assert (tmp_path / out).is_file(), out
    nets = {}
    for name in ("B.pt", "aligned.pt", "merged.pt"):
        nets[name] = load_mynets(tmp_path)()
        nets[name].load_state_dict(torch.load(tmp_path / name, weights_only=True))
    x = torch.randn(16, 64)
    assert torch.allclose(nets["aligned.pt"](x), nets["B.pt"](x), atol=1e-5)  # B's function
    a = torch.load(tmp_path / "A.pt", weights_only=True)
    aligned = nets["aligned.pt"].state_dict()
    for key, value in nets["merged.pt"].state_dict().items():  # A and aligned B, averaged
        torch.testing.assert_close(value, (a[key] + aligned[key]) / 2, atol=1e-6, rtol=0)
    assert not torch.allclose(nets["merged.pt"](x), nets["B.pt"](x), atol=1e-3)


def load_mynets(folder):
    import importlib.util

    spec = importlib.util.spec_from_file_location("mynets", folder / "mynets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build
