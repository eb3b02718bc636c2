"""A user's path through the CLI and the API: one function from a network to its architecture,
settings that are the command's own (a folder's params.yaml is never read, a partial file is
merged over the defaults), REPAIR on any traced network, and the third battery's bad inputs
of that path, each one line."""

from __future__ import annotations

import inspect
import os
import resource
import signal
import zipfile

import pytest
import torch
import yaml
from torch import nn

import deepalign
from deepalign.cli import app
from deepalign.core.arch import layer_outputs, producers
from deepalign.core.data import reset_images_of
from deepalign.core.weightspace import average
from deepalign.errors import DeepAlignError, one_line
from deepalign.merging import check_weights, repaired
from deepalign.settings import PIPELINE_SECTIONS, load_settings, methods_cfg
from deepalign.usermodel import network_arch
from tests.helpers import ROOT, error_line, runner

MLP = """
from torch import nn


def build():
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                         nn.Linear(12, 10))
"""


def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 10)
    )


class ResidualMLP(nn.Module):
    """A residual stream with LayerNorm: no plain Sequential, no BatchNorm."""

    def __init__(self, act: type[nn.Module] = nn.ReLU, residual: bool = True) -> None:
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(64, 16), nn.Linear(16, 16), nn.Linear(16, 10)
        self.norm, self.act, self.residual = nn.LayerNorm(16), act(), residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.inp(x))
        h = self.norm(h + self.act(self.mid(h))) if self.residual else self.act(self.mid(h))
        return self.out(h)


def residual(seed: int, **kw) -> ResidualMLP:
    torch.manual_seed(seed)
    return ResidualMLP(**kw)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """An empty folder with two MLP state_dicts and the module that builds them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nets.py").write_text(MLP)
    for seed in (0, 1):
        torch.save(mlp(seed).state_dict(), tmp_path / f"{seed}.pt")
    return tmp_path


def invoke(*args: str):
    return runner.invoke(app, list(args))


# --- one function from a network to its architecture ---------------------------------------------


def test_merge_repair_of_a_model_equals_merge_repair_of_its_bare_state_dicts(folder):
    common = ["merge", "0.pt", "1.pt", "--repair", "--data", "digits"]
    assert invoke(*common, "-o", "bare.pt").exit_code == 0
    done = invoke(*common, "-o", "model.pt", "--model", "nets.py:build")
    assert done.exit_code == 0, done.output
    bare, model = torch.load("bare.pt"), torch.load("model.pt")
    assert list(bare) == list(model)
    assert all(torch.equal(bare[k], model[k]) for k in bare)
    plain = invoke("merge", "0.pt", "1.pt", "--data", "digits", "-o", "plain.pt")
    assert plain.exit_code == 0
    assert not torch.equal(torch.load("plain.pt")["0.weight"], bare["0.weight"])  # REPAIR acts


def test_network_arch_takes_a_module_a_callable_a_reference_and_a_state_dict(folder):
    archs = [
        network_arch(mlp(0)),
        network_arch(lambda: mlp(1)),
        network_arch("nets.py:build"),
        network_arch(mlp(2).state_dict()),
    ]
    assert all(a == archs[0] for a in archs)
    assert network_arch(residual(0)).spec.sizes == {"h0": 16}


def repair_goals(arch, parents, weights, x):
    """Each producing layer's weighted-average per-unit mean and std over the parents."""
    nodes = tuple(p.node for p in producers(arch))
    goals = []
    for k in range(len(nodes)):
        outs = [layer_outputs(arch, p, x, nodes)[k].movedim(1, -1).flatten(0, -2) for p in parents]
        goals.append(
            (
                sum(w * o.mean(0) for w, o in zip(weights, outs)),
                sum(w * o.std(0) for w, o in zip(weights, outs)),
            )
        )
    return nodes, goals


def test_repair_on_a_traced_residual_network_matches_every_layers_statistics(digits):
    arch = network_arch(residual(0), data=digits)
    parents = [arch.weightspace(residual(s).state_dict()) for s in (0, 1)]
    x = reset_images_of(digits.train, 256).flatten(1)
    mean = average(parents)
    nodes, goals = repair_goals(arch, parents, [0.5, 0.5], x)
    fixed = repaired(arch, parents, [0.5, 0.5], mean, x)
    for ws, should_match in ((fixed, True), (mean, False)):  # twin: the plain average does not
        outs = layer_outputs(arch, ws, x, nodes)
        close = [
            torch.allclose(o.mean(0), m, atol=1e-4) and torch.allclose(o.std(0), s, atol=1e-4)
            for o, (m, s) in zip(outs, goals)
        ]
        assert all(close) if should_match else not all(close)


class BnResNet(nn.Module):
    """A residual network with BatchNorm on digits' 1x8x8 images."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.stem(x)))
        h = torch.relu(h + self.bn2(self.conv(h)))
        return self.head(h.mean((2, 3)))


def test_repair_runs_on_a_resnet_with_batchnorm():
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(BnResNet().train())
        nets[-1](torch.randn(16, 1, 8, 8))  # running statistics of its own
    repaired_net = deepalign.merge(*nets, data="digits", repair=True).state_dict()
    reset = deepalign.merge(*nets, data="digits").state_dict()  # REPAIR with BatchNorm: reset
    kept = deepalign.merge(*nets, data="digits", reset_bn=False).state_dict()
    assert all(torch.equal(repaired_net[k], reset[k]) for k in reset)
    assert not torch.allclose(kept["bn.running_var"], reset["bn.running_var"])  # twin


# --- settings of the command itself -------------------------------------------------------------


def test_a_foreign_params_yaml_in_the_folder_is_not_read(folder):
    (folder / "params.yaml").write_text("train: {lr: 0.01}\n")
    done = invoke("align", "0.pt", "1.pt", "-o", "a.pt")
    assert done.exit_code == 0, done.output
    aligned = deepalign.align(mlp(0), mlp(1))
    assert isinstance(aligned, nn.Sequential)


def test_a_partial_params_file_changes_only_its_keys(tmp_path):
    (tmp_path / "p.yaml").write_text("align: {weight_matching: {restarts: 3}}\n")
    given, shipped = methods_cfg(load_settings(tmp_path / "p.yaml")), methods_cfg(load_settings())
    assert given.weight_matching.restarts == 3 and shipped.weight_matching.restarts != 3
    assert given.weight_matching.max_iter == shipped.weight_matching.max_iter
    assert given.sinkhorn == shipped.sinkhorn


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("algin: {weight_matching: {seed: 1}}\n", "algin: unknown section (did you mean 'align'"),
        ("align: {weight_matchin: {seed: 1}}\n", "align.weight_matchin: unknown key"),
        ("align: {weight_matching: {sed: 1}}\n", "align.weight_matching.sed: unknown key"),
        ("batchnorm: {reset_images: -1}\n", "batchnorm.reset_images"),
    ],
)
def test_a_misspelt_params_key_or_section_is_named(tmp_path, text, words):
    (tmp_path / "p.yaml").write_text(text)
    settings = load_settings(tmp_path / "p.yaml") if "algin" not in text else None
    with pytest.raises(DeepAlignError, match="p.yaml") as e:
        if settings is None:
            load_settings(tmp_path / "p.yaml")
        elif text.startswith("batchnorm"):
            from deepalign.settings import bn_reset_images

            bn_reset_images(settings)
        else:
            methods_cfg(settings)
    assert words in str(e.value)


def test_a_bad_curves_key_does_not_stop_a_merge(folder):
    (folder / "p.yaml").write_text("curves: {pam_from: nonsense}\n")
    done = invoke("merge", "0.pt", "1.pt", "--params", "p.yaml", "-o", "m.pt")
    assert done.exit_code == 0, done.output
    bad = invoke("curve", "0.pt", "1.pt", "--params", "p.yaml", "-o", "c.pt")
    assert "curves.pam_from" in error_line(bad, 1)  # twin: the curve command does read it


def test_a_fifo_given_as_params_is_refused_at_once(folder):
    os.mkfifo(folder / "fifo")
    line = error_line(invoke("align", "0.pt", "1.pt", "-o", "a.pt", "--params", "fifo"), 1)
    assert "fifo: not a regular file" in line


# --- the API ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(lambda: residual(1, residual=False), id="no-residual-connection"),
        pytest.param(lambda: residual(1, act=nn.Tanh), id="tanh"),
    ],
)
def test_the_api_refuses_an_other_of_another_graph_or_activation(other):
    with pytest.raises(DeepAlignError, match="architectures differ: ref vs other"):
        deepalign.align(residual(0), other())
    aligned = deepalign.align(residual(0), residual(1))  # twin: the same architecture aligns
    x = torch.randn(5, 64)
    assert torch.allclose(aligned(x), residual(1)(x), atol=1e-5)


def test_the_api_takes_state_dicts_and_gives_one_back():
    aligned = deepalign.align(mlp(0).state_dict(), mlp(1).state_dict())
    assert isinstance(aligned, dict) and list(aligned) == list(mlp(1).state_dict())
    module = mlp(9)
    module.load_state_dict(aligned)
    x = torch.randn(5, 64)
    assert torch.allclose(module(x), mlp(1)(x), atol=1e-5)
    assert not torch.allclose(aligned["0.weight"], mlp(1).state_dict()["0.weight"])


def test_the_api_merge_is_the_average_of_the_aligned_networks():
    a, b = mlp(0), mlp(1)
    aligned = deepalign.align(a, b)
    by_hand = {k: (v + aligned.state_dict()[k]) / 2 for k, v in a.state_dict().items()}
    merged = deepalign.merge(a, b).state_dict()
    assert all(torch.allclose(merged[k], by_hand[k], atol=1e-6) for k in by_hand)
    naive = {k: (v + b.state_dict()[k]) / 2 for k, v in a.state_dict().items()}
    assert not torch.allclose(merged["0.weight"], naive["0.weight"])  # twin: aligned first


@pytest.mark.parametrize("weights", [[float("nan"), 1.0], [float("inf"), 1.0], [-1.0, 2.0], [0, 0]])
def test_the_api_refuses_weights_that_are_not_finite_and_non_negative(weights):
    with pytest.raises(DeepAlignError, match="weights"):
        deepalign.merge(mlp(0), mlp(1), weights=weights)


def test_huge_equal_weights_are_equal_weights():
    assert check_weights([1e308, 1e308], 2) == [0.5, 0.5]


# --- the command line ---------------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["nan,1", "inf,1", "1,-1", "0,0", "1"])
def test_bad_merge_weights_exit_2_and_write_nothing(folder, weights):
    line = error_line(invoke("merge", "0.pt", "1.pt", "--weights", weights, "-o", "m.pt"), 2)
    assert "--weights" in line and not (folder / "m.pt").exists()


def test_merge_weights_change_the_result(folder):
    for name, weights in (("even.pt", "1,1"), ("skew.pt", "3,1"), ("huge.pt", "1e308,1e308")):
        assert invoke("merge", "0.pt", "1.pt", "--weights", weights, "-o", name).exit_code == 0
    even, skew, huge = (
        torch.load(folder / n)["0.weight"] for n in ("even.pt", "skew.pt", "huge.pt")
    )
    assert torch.equal(even, huge)
    assert not torch.allclose(even, skew)


def test_output_onto_a_dotted_model_source_is_refused(folder):
    (folder / "mynets.py").write_text(MLP)
    line = error_line(invoke("align", "0.pt", "1.pt", "--model", "mynets:build", "-o", "mynets.py"))
    assert "mynets.py" in line and "--model" in line
    assert (folder / "mynets.py").read_text() == MLP


def test_a_dotted_model_is_imported_from_the_current_folder(folder):
    (folder / "mynets.py").write_text(MLP)
    done = invoke("align", "0.pt", "1.pt", "--model", "mynets:build", "-o", "a.pt")
    assert done.exit_code == 0, done.output


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("def build(:\n", "syntax error at line 1"),
        ("import no_such_module_here\n", "ModuleNotFoundError"),
        ("raise RuntimeError('boom')\n", "RuntimeError: boom"),
    ],
)
def test_a_model_file_that_fails_to_import_is_one_line(folder, source, words):
    (folder / "broken.py").write_text(source)
    line = error_line(invoke("info", "0.pt", "--model", "broken.py:build"), 1)
    assert words in line and "broken" in line


def test_an_output_that_is_a_symbolic_link_is_written_through(folder):
    (folder / "target.pt").write_bytes(b"old")
    (folder / "link.pt").symlink_to(folder / "target.pt")
    assert invoke("align", "0.pt", "1.pt", "-o", "link.pt").exit_code == 0
    assert (folder / "link.pt").is_symlink()
    assert set(torch.load(folder / "target.pt")) == set(mlp(0).state_dict())


def test_a_wrongly_shaped_num_batches_tracked_is_refused(folder):
    net = nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10))
    state = net.state_dict()
    state["1.num_batches_tracked"] = torch.zeros(3, dtype=torch.long)
    torch.save(state, folder / "bn.pt")
    (folder / "bn.py").write_text(
        "from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Linear(64, 8), "
        "nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10))\n"
    )
    line = error_line(invoke("info", "bn.pt", "--model", "bn.py:build"), 1)
    assert "1.num_batches_tracked" in line and "(3,)" in line


def test_a_checkpoint_with_a_damaged_zip_directory_is_one_line(folder):
    blob = bytearray((folder / "0.pt").read_bytes())
    end = blob.rfind(b"PK\x01\x02")  # the last central directory entry: "version needed" 9.0
    blob[end + 6 : end + 8] = (90).to_bytes(2, "little")
    (folder / "bad.pt").write_bytes(bytes(blob))
    with pytest.raises(NotImplementedError, match="zip file version 9.0"):
        zipfile.ZipFile(folder / "bad.pt")  # the damage is what zipfile refuses
    assert "bad.pt" in error_line(invoke("info", "bad.pt"), 1)


def test_a_right_to_left_override_in_a_name_is_escaped():
    assert one_line("net\u202egp.pt") == "net\\u202egp.pt"
    assert "\u202e" not in one_line("a\u2066b\u200fc")


def test_a_full_disk_names_the_operating_systems_reason(folder):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))  # writes past 1 kB fail: EFBIG
    try:
        line = error_line(invoke("align", "0.pt", "1.pt", "-o", "a.pt"), 1)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    assert "a.pt: cannot write (File too large)" in line
    assert not list(folder.glob("*a.pt*"))


# --- guessed input shapes -----------------------------------------------------------------------


class ToImages(nn.Module):
    """Reshapes its flat input to 8x8 images: the first layer is a Linear-free conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 6, 3, padding=1), nn.Linear(6 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x.view(x.size(0), 1, 8, 8)))
        return self.head(h.flatten(1))


def test_a_module_that_reshapes_its_input_aligns_with_the_input_shape_given():
    torch.manual_seed(0)
    ref, other = ToImages(), ToImages()
    aligned = deepalign.align(ref, other, input_shape=(64,))
    x = torch.randn(4, 64)
    assert torch.allclose(aligned(x), other(x), atol=1e-5)
    with pytest.raises(DeepAlignError, match="was guessed from the first layer.*input_shape="):
        deepalign.align(ref, other)  # guessed 1x32x32: the reshape to 8x8 cannot hold


class Tied(nn.Module):
    """One Linear used twice (tied weights): the state_dict holds it under one key, and a
    second Linear shares the first one's weight under another key."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.a, self.b, self.out = (
            nn.Linear(64, 12),
            nn.Linear(12, 12),
            nn.Linear(12, 12),
            nn.Linear(12, 10),
        )
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        return self.out(torch.relu(self.b(torch.relu(self.a(h)))))


def test_tied_weights_are_permuted_once_and_keep_the_function():
    torch.manual_seed(0)
    ref = Tied()
    torch.manual_seed(1)
    other = Tied()
    aligned = deepalign.align(ref, other)
    x = torch.randn(8, 64)
    assert torch.allclose(aligned(x), other(x), atol=1e-5)
    assert aligned.a.weight is aligned.b.weight  # still one tensor
    assert not torch.equal(aligned.a.weight, other.a.weight)  # and it was permuted


def test_the_pipeline_sections_a_params_file_may_hold_are_params_yamls():
    assert set(PIPELINE_SECTIONS) == set(yaml.safe_load((ROOT / "params.yaml").read_text()))
    settings = load_settings(ROOT / "params.yaml")  # the project's own file is accepted whole
    assert methods_cfg(settings).weight_matching.restarts == 1


class _Versioned(nn.Module):
    """A module that, like torchvision's MNASNet, refuses a state_dict without its version."""

    _version = 2

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))

    def _load_from_state_dict(self, state, prefix, local_metadata, *args):
        if local_metadata.get("version") not in (1, 2):
            raise ValueError("version should be set to 1 or 2")
        super()._load_from_state_dict(state, prefix, local_metadata, *args)


def test_a_result_keeps_the_module_versions_its_network_came_with(tmp_path):
    torch.manual_seed(0)
    ref, other = _Versioned(), _Versioned()
    aligned = deepalign.align(ref, other, input_shape=(4,))
    state = aligned.state_dict()
    assert state._metadata[""]["version"] == 2
    torch.save(state, tmp_path / "aligned.pt")
    back = _Versioned()
    back.load_state_dict(torch.load(tmp_path / "aligned.pt", weights_only=True))
    x = torch.randn(5, 4)
    assert torch.allclose(back(x), other(x), atol=1e-5)
    assert not torch.equal(back.a.weight, other.a.weight)  # it was permuted
    with pytest.raises(ValueError, match="version"):  # twin: the same tensors, versions dropped
        _Versioned().load_state_dict(dict(state))


def test_the_cli_writes_the_module_versions_a_versioned_module_checks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = "import torch\nfrom torch import nn\n\n\n" + inspect.getsource(_Versioned)
    (tmp_path / "vnets.py").write_text(source)  # the module above, as a user's file
    monkeypatch.syspath_prepend(str(tmp_path))
    from vnets import _Versioned as Versioned

    torch.manual_seed(0)
    nets = [Versioned(), Versioned()]
    for i, net in enumerate(nets):
        torch.save(net.state_dict(), f"{i}.pt")
    done = invoke("align", "0.pt", "1.pt", "--model", "vnets.py:_Versioned", "-o", "a.pt")
    assert done.exit_code == 0, done.output
    state = torch.load("a.pt", weights_only=True)
    back = Versioned()
    back.load_state_dict(state)
    x = torch.randn(5, 4)
    assert torch.allclose(back(x), nets[1](x), atol=1e-5)
    assert not torch.equal(back.a.weight, nets[1].a.weight)  # it was permuted
    with pytest.raises(ValueError, match="version"):  # twin: the same tensors, versions dropped
        Versioned().load_state_dict(dict(state))


def test_a_state_dict_result_keeps_the_versions_the_state_dict_came_with():
    torch.manual_seed(0)
    ref, other = (nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)) for _ in range(2))
    given = other.state_dict()
    aligned = deepalign.align(ref.state_dict(), given)
    assert aligned._metadata == given._metadata and aligned._metadata["0"]["version"] == 1
    assert list(aligned) == list(given) and not torch.equal(aligned["0.weight"], given["0.weight"])
