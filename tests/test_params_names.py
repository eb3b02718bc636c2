"""Names from params.yaml that become folders and files (zoos, architectures) are plain names,
and a recipe without layers is refused: each one line naming the key, before anything runs."""

import importlib
import os
import sys
from pathlib import Path

import pytest
import yaml

from deepalign.config import load_section
from deepalign.errors import DeepAlignError
from deepalign.zoo.build import ZooCfg
from tests.tiny import ROOT, configs, tiny_params

BAD_NAMES = [
    pytest.param("../victim", id="parent"),
    pytest.param("a/b", id="slash"),
    pytest.param("/tmp/victim", id="absolute"),
    pytest.param("", id="empty"),
    pytest.param(".", id="dot"),
    pytest.param("..", id="dot-dot"),
    pytest.param("a\\b", id="backslash"),
    pytest.param("line\nbreak", id="newline"),
    pytest.param("esc\x1b[31m", id="escape"),
    pytest.param("rtl\u202egnp.exe", id="right-to-left-override"),
    pytest.param("-rf", id="option-like"),
]


def renamed(mapping: dict, old: str, new: str) -> None:
    """Key `old` of `mapping` renamed to `new`, in place and in order."""
    items = [(new if k == old else k, v) for k, v in mapping.items()]
    mapping.clear()
    mapping.update(items)


def one_line_error(fn, *args) -> str:
    with pytest.raises(DeepAlignError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message and "\x1b" not in message and "\u202e" not in message
    return message


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_zoo_name_that_is_not_a_plain_name_is_refused(tmp_path, name):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    renamed(params["zoo"]["archs"], "cnn", name)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    message = one_line_error(load_section, "zoo", ZooCfg, path)
    assert "zoo.archs key" in message and "a plain name" in message


def test_a_zoo_name_that_is_no_string_is_refused(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    renamed(params["zoo"]["archs"], "cnn", 7)  # YAML `7:` is an int, no folder name
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    assert "zoo.archs key: expected str, got 7" in one_line_error(load_section, "zoo", ZooCfg, path)


@pytest.mark.parametrize("name", ["cnn", "mlp_2", "wide-64", "v1.2"])
def test_plain_names_load(tmp_path, name):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    renamed(params["zoo"]["archs"], "cnn", name)  # twin: names that are one path component
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    assert name in load_section("zoo", ZooCfg, path).archs


def rename_key(dotted: str, new: str):
    """An edit renaming the first key of the mapping at `dotted`."""

    def edit(params: dict) -> None:
        node = params
        for key in dotted.split("."):
            node = node[key]
        renamed(node, next(iter(node)), new)

    return edit


def set_key(dotted: str, value):
    def edit(params: dict) -> None:
        *parents, last = dotted.split(".")
        node = params
        for key in parents:
            node = node[key]
        node[last] = value

    return edit


def case(stage: str, edit, *expected: str, id: str):
    return pytest.param(stage, edit, expected, id=id)


VICTIM = "../victim"
STAGE_CASES = [
    case("zoo", rename_key("zoo.archs", VICTIM), "zoo.archs key", id="zoo.archs"),
    case("ood", rename_key("ood.zoos", VICTIM), "ood.zoos key", id="ood.zoos"),
    case("inr", rename_key("inr.zoos", VICTIM), "inr.zoos key", id="inr.zoos"),
    case("ood", set_key("ood.arch", VICTIM), "ood.arch", id="ood.arch"),
    case("merge", set_key("merge.arch", VICTIM), "merge.arch", id="merge.arch"),
    case("study", set_key("study.arch", VICTIM), "study.arch", id="study.arch"),
    case("scale", set_key("scale.arch", VICTIM), "scale.arch", id="scale.arch"),
    case("align", set_key("align.archs", [VICTIM]), "align.archs[0]", id="align.archs"),
    case(
        "train_aligner", set_key("aligner.archs", [VICTIM]), "aligner.archs[0]", id="aligner.archs"
    ),
    case("curves", set_key("curves.archs", [VICTIM]), "curves.archs[0]", id="curves.archs"),
    case("converge", set_key("converge.archs", [VICTIM]), "converge.archs[0]", id="converge"),
    # recipes without layers, of every kind
    case("zoo", set_key("zoo.archs.mlp.hidden", []), "zoo.archs.mlp.hidden", id="mlp-hidden"),
    case("zoo", set_key("zoo.archs.cnn.hidden", []), "zoo.archs.cnn.hidden", id="cnn-hidden"),
    case("resnets", set_key("resnets.zoo.hidden", []), "resnets.zoo.hidden", id="resnet-hidden"),
    case("merge", set_key("resnets.zoo.hidden", []), "resnets.zoo.hidden", id="merge-resnet"),
    case("inr", set_key("inr.zoos.sine.net.hidden", []), "sine.net.hidden", id="siren-hidden"),
    # keys a kind does not have, and a recipe without a kind
    case("resnets", set_key("resnets.zoo.strides", []), "resnets.zoo.strides: unknown", id="strd"),
    case("zoo", set_key("zoo.archs.mlp.blocks", 0), "zoo.archs.mlp.blocks: unknown", id="blocks"),
    case("inr", set_key("inr.zoos.sine.net.activation", "sine"), "net.activation", id="siren-act"),
    case("zoo", set_key("zoo.archs.mlp.activation", "sine"), "mlp.activation", id="mlp-sine"),
    case("zoo", lambda p: p["zoo"]["archs"]["mlp"].pop("kind"), "missing key 'kind'", id="nokind"),
    case("zoo", set_key("zoo.archs.mlp.kind", ["mlp"]), "zoo.archs.mlp.kind", id="kind-list"),
    # DEEP-ALIGN on the ResNet zoo: a comparison of a method it does not run, ReLU rescaling
    # of BatchNorm networks, an encoder that is not one
    case(
        "resnets_learned",
        set_key("resnets_learned.compare", [["deep_align", "ste"]]),
        "resnets_learned.compare[0]",
        id="learned-compare",
    ),
    case(
        "resnets_learned",
        set_key("resnets_learned.aligner.augment.rescale", 0.1),
        "aligner.augment.rescale",
        "BatchNorm",
        id="learned-rescale",
    ),
    case(
        "resnets_learned",
        set_key("resnets_learned.aligner.model.encoder", "graph"),
        "resnets_learned.aligner.model.encoder",
        id="learned-encoder",
    ),
    # DEEP-ALIGN's quality experiments and options: what a stage could not score or run
    case(
        "coupling",
        set_key("quality.methods", ["weight_matching"]),
        "quality.methods",
        "deep_align",
        id="quality-methods",
    ),
    case(
        "semi_amortised",
        set_key("quality.stages.semi_amortised", ["nope"]),
        "quality.stages.semi_amortised",
        id="quality-stage-variant",
    ),
    case(
        "widths",
        set_key("quality.widths", {"widths": [6], "nowhere": [8]}),
        "quality.widths.nowhere",
        id="quality-widths-stage",
    ),
    case(
        "coupling",
        set_key("quality.variants.coupling.coupling", -1),
        "quality.variants.coupling.coupling",
        id="quality-variant-coupling",
    ),
    case("coupling", set_key("aligner.unroll_steps", -1), "aligner.unroll_steps", id="unroll"),
    case("coupling", set_key("aligner.unroll_lr", 0), "aligner.unroll_lr", id="unroll-lr"),
    case(
        "train_aligner",
        set_key("aligner.model.coupling", -2),
        "aligner.model.coupling",
        id="model-coupling",
    ),
    case(
        "align", set_key("align.sinkhorn.scores_lr", 0), "align.sinkhorn.scores_lr", id="scores-lr"
    ),
    case(
        "merge",
        lambda p: p["merge"]["resnet"].pop("aligners"),
        "missing key 'aligners'",
        id="merge-aligners",
    ),
]


@pytest.mark.parametrize(("stage", "edit", "expected"), STAGE_CASES)
def test_the_stage_refuses_in_one_line_naming_the_key(stage, edit, expected):
    params = tiny_params()
    edit(params)
    flow = getattr(importlib.import_module(f"flows.{stage}"), stage)
    message = one_line_error(configs, flow, params)
    assert all(text in message for text in expected), message


def test_the_tiny_params_load_in_every_stage_of_these_cases():
    for stage in dict.fromkeys(p.values[0] for p in STAGE_CASES):  # twin: unedited, they load
        configs(getattr(importlib.import_module(f"flows.{stage}"), stage), tiny_params())


def test_a_zoo_named_out_of_its_folder_writes_nothing_there(tmp_path, capsys):
    """The zoo stage with a zoo named '../victim': one line, and the victim folder's manifest
    (what the name would have overwritten) untouched."""
    from flows.common import cli
    from flows.zoo import zoo

    (tmp_path / "victim").mkdir()
    manifest = tmp_path / "victim" / "manifest.json"
    manifest.write_text('{"mine": true}')
    params = tiny_params()
    rename_key("zoo.archs", VICTIM)(params)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "params.yaml").write_text(yaml.safe_dump(params))
    argv, here = sys.argv, Path.cwd()
    sys.argv, _ = ["flows/zoo.py", "--params", "params.yaml"], os.chdir(tmp_path / "work")
    try:
        with pytest.raises(SystemExit) as done:
            cli(zoo)
    finally:
        sys.argv, _ = argv, os.chdir(here)
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 1 and len(err) == 1 and "zoo.archs key" in err[0], err
    assert manifest.read_text() == '{"mine": true}'
    assert sorted(p.name for p in (tmp_path / "victim").iterdir()) == ["manifest.json"]
