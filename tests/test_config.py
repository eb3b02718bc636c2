"""params.yaml loading: the real file loads; typos and gaps are named."""

from pathlib import Path

import pytest
import yaml

from deepalign.config import load_section
from deepalign.core.data import DataCfg
from deepalign.errors import DeepAlignError
from deepalign.zoo.build import ZooCfg

ROOT = Path(__file__).resolve().parents[1]


def test_repository_params_load():
    cfg = load_section("zoo", ZooCfg, ROOT / "params.yaml")
    assert cfg.archs["mlp"].hidden == [32, 32, 32]
    assert load_section("data", DataCfg, ROOT / "params.yaml").name == "digits"


def edited(tmp_path, edit):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_misspelt_key_is_named_with_suggestion(tmp_path):
    path = edited(
        tmp_path,
        lambda p: p["zoo"]["archs"]["mlp"].update(epoch=p["zoo"]["archs"]["mlp"].pop("epochs")),
    )
    with pytest.raises(
        DeepAlignError, match=r"zoo\.archs\.mlp\.epoch: unknown key \(did you mean 'epochs'\?\)"
    ):
        load_section("zoo", ZooCfg, path)


def test_missing_key_and_wrong_type_are_named(tmp_path):
    path = edited(tmp_path, lambda p: p["zoo"].pop("seed"))
    with pytest.raises(DeepAlignError, match="zoo: missing key 'seed'"):
        load_section("zoo", ZooCfg, path)
    path = edited(tmp_path, lambda p: p["zoo"].update(chunk_size="big"))
    with pytest.raises(DeepAlignError, match=r"zoo\.chunk_size: expected int, got 'big'"):
        load_section("zoo", ZooCfg, path)


def test_missing_section_is_named(tmp_path):
    path = edited(tmp_path, lambda p: p.pop("zoo"))
    with pytest.raises(DeepAlignError, match="missing section 'zoo'"):
        load_section("zoo", ZooCfg, path)
