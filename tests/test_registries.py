"""One declaration per aligner and per zoo kind: a toy of each, defined here and added by one
registry line, runs through the library and appears in every list derived from its registry."""

import dataclasses
import json
import math
from dataclasses import dataclass

import pytest
import torch

from deepalign.cli import _method
from deepalign.config import Positive, build, read_params
from deepalign.core.arch import Arch
from deepalign.core.assignment import Answer
from deepalign.core.chain import mlp_arch
from deepalign.core.data import Dataset
from deepalign.core.permspec import apply_permutation
from deepalign.errors import DeepAlignError, UsageError
from deepalign.methods import (
    ALIGNERS,
    Aligner,
    Method,
    MethodsCfg,
    Problem,
    align,
    check_methods,
    settings_class,
    settings_keys,
)
from deepalign.zoo.build import ZooCfg, make_arch, train_zoo
from deepalign.zoo.kinds import ZOO_KINDS, NetCfg
from tests.conftest import DIGITS
from tests.helpers import ROOT

# --- a toy aligner: its module's content, then its registry line ---------------------------------


@dataclass(frozen=True)
class ReverseCfg:
    """The toy's settings, section `align.reverse`."""

    reverse: bool  # False: the identity


def reverse_units(problem: Problem, cfg: ReverseCfg, init: Answer | None = None) -> Answer:
    """Every group's units in reverse order (or as they are)."""
    order = {g: torch.arange(n) for g, n in problem.spec.sizes.items()}
    return Answer(hard={g: p.flip(0) if cfg.reverse else p for g, p in order.items()})


@pytest.fixture
def toy_aligner(monkeypatch):
    assert "reverse" not in ALIGNERS and "align.reverse" not in settings_keys()
    monkeypatch.setitem(ALIGNERS, "reverse", Aligner(reverse_units, ReverseCfg))  # the one line


def align_section(**toy) -> dict:
    """params.yaml's `align` section with the toy's sub-section."""
    return read_params(ROOT / "params.yaml")["align"] | {"reverse": toy}


def test_a_toy_aligner_runs_through_the_registry(toy_aligner, mlp):
    arch, ref = mlp
    reversed_ = {g: torch.arange(n).flip(0) for g, n in arch.spec.sizes.items()}
    other = apply_permutation(ref, reversed_, arch.spec)  # ref with every group reversed
    cfg = build(settings_class(), align_section(reverse=True), "align", allow_extra=True)
    assert cfg.reverse == ReverseCfg(True)  # its params section loads into its dataclass
    problem = Problem.of(ref, other, arch)
    aligned = apply_permutation(other, align("reverse", problem, cfg).perm, arch.spec)
    assert all(torch.equal(aligned.named[k], ref.named[k]) for k in ref.named)
    chained = align(Method.parse("reverse+weight_matching"), problem, cfg)
    assert all(torch.equal(chained.perm[g], reversed_[g]) for g in reversed_)
    kept = dataclasses.replace(cfg, reverse=ReverseCfg(False))  # twin: its settings are read
    unaligned = apply_permutation(other, align("reverse", problem, kept).perm, arch.spec)
    assert not all(torch.equal(unaligned.named[k], ref.named[k]) for k in ref.named)


def test_a_toy_aligner_is_in_every_derived_list(toy_aligner):
    assert "align.reverse" in settings_keys()
    assert "reverse" in [f.name for f in dataclasses.fields(settings_class())]
    check_methods("methods", ["reverse", "deep_align+reverse"])  # the params lists take it
    with pytest.raises(UsageError, match=r"--method: unknown method 'nope' \(known: .*reverse"):
        _method("nope")  # the command line's --method: an unknown name lists the registry
    with pytest.raises(DeepAlignError, match="missing key 'reverse'"):  # twin: its section
        build(settings_class(), read_params(ROOT / "params.yaml")["align"], "align", True)


def test_the_registry_is_where_the_lists_come_from():
    import flows.ood

    with_settings = [name for name, a in ALIGNERS.items() if a.settings is not None]
    assert [f.name for f in dataclasses.fields(MethodsCfg)] == with_settings
    assert settings_keys() == tuple(f"align.{name}" for name in with_settings)
    assert flows.ood.ALIGN_KEYS[: len(with_settings)] == settings_keys()
    assert "naive" not in with_settings and "naive" in ALIGNERS  # twin: no settings, no section


# --- a toy zoo kind: its settings dataclass and architecture, then its registry line -------------


@dataclass(frozen=True)
class OneLayerCfg(NetCfg):
    """One hidden layer of `width` tanh units."""

    width: Positive

    def arch(self, data: Dataset) -> Arch:
        return mlp_arch(math.prod(data.image_shape), [self.width], data.n_classes, "tanh")


TRAINING = {"n_train": 2, "n_val": 0, "n_test": 1, "epochs": 1, "batch_size": 64, "lr": 3e-3}
TOY_ZOO = {
    "seed": 0,
    "chunk_size": 3,
    "device": "cpu",
    "archs": {
        "tiny": {"kind": "one_layer", "width": 6, "weight_decay": 0.0, "optimizer": "adam"}
        | TRAINING
        | {"momentum": 0.0}
    },
}


@pytest.fixture
def toy_kind(monkeypatch):
    assert "one_layer" not in ZOO_KINDS
    monkeypatch.setitem(ZOO_KINDS, "one_layer", OneLayerCfg)  # the one line


def test_a_toy_zoo_kind_loads_from_params_and_trains(toy_kind, digits, tmp_path):
    net = build(ZooCfg, TOY_ZOO, "zoo").archs["tiny"]
    assert isinstance(net, OneLayerCfg) and (net.kind, net.width) == ("one_layer", 6)
    assert dict(make_arch(net, digits).spec.sizes) == {"h0": 6}
    records, trained = train_zoo(tmp_path / "tiny", "tiny", net, 0, (digits, DIGITS))
    manifest = json.loads((tmp_path / "tiny" / "manifest.json").read_text())
    assert trained == len(records) == 3 and len(manifest["networks"]) == 3


def test_a_toy_zoo_kind_has_only_its_own_keys(toy_kind):
    bad = json.loads(json.dumps(TOY_ZOO))
    bad["archs"]["tiny"]["strides"] = []  # a cnn's key
    with pytest.raises(DeepAlignError, match=r"zoo\.archs\.tiny\.strides: unknown key"):
        build(ZooCfg, bad, "zoo")
    del bad["archs"]["tiny"]["strides"], bad["archs"]["tiny"]["width"]
    with pytest.raises(DeepAlignError, match=r"zoo\.archs\.tiny: missing key 'width'"):
        build(ZooCfg, bad, "zoo")


def test_an_unregistered_kind_names_the_key_and_the_known_kinds():
    with pytest.raises(DeepAlignError) as info:  # twin: without its registry line
        build(ZooCfg, TOY_ZOO, "zoo")
    assert str(info.value) == (
        "zoo.archs.tiny.kind: 'one_layer' is not allowed (must be one of: mlp, cnn, resnet, siren)"
    )
