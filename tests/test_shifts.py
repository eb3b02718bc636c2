"""Shifted zoos: rotated and class-skewed data, the shifted recipes, and merging across skews."""

import dataclasses

import pytest
import torch

from deepalign.config import build
from deepalign.core.data import Dataset, Split
from deepalign.core.lmc import evaluate_networks, reset_statistics
from deepalign.core.permspec import apply_permutation, random_permutation
from deepalign.core.shifts import ShiftCfg, class_subset, rotate_images, shifted
from deepalign.core.weightspace import stack
from deepalign.errors import DeepAlignError
from deepalign.evaluation import disjoint, ood
from deepalign.evaluation.experiment import AlignCfg
from deepalign.zoo.build import NetCfg, init_network, make_arch, train_batched
from deepalign.zoo.store import Zoo
from tests.configs import net_cfg
from tests.tiny import tiny_params


def test_a_quarter_turn_is_torchs_rot90_and_no_turn_changes_nothing():
    x = torch.rand(3, 1, 8, 8)
    turned = rotate_images(x, torch.full((3,), 90.0))
    quarter = [torch.rot90(x, k, dims=(2, 3)) for k in (1, -1)]
    assert min((turned - q).abs().max().item() for q in quarter) < 1e-5
    assert torch.allclose(rotate_images(x, torch.zeros(3)), x, atol=1e-6)
    assert (turned - x).abs().max() > 0.1  # twin: a turn moves pixels


def test_rotation_shifts_every_split_and_class_fractions_only_train(digits):
    turned = shifted(digits, ShiftCfg(45.0, [], 0))
    for split in ("train", "val", "test"):
        before, after = getattr(digits, split), getattr(turned, split)
        assert torch.equal(before.y, after.y) and not torch.allclose(before.x, after.x)
    assert shifted(digits, ShiftCfg(0.0, [], 0)) is digits
    fractions = [0.95] * 5 + [0.05] * 5
    skewed = shifted(digits, ShiftCfg(0.0, fractions, 0))
    assert skewed.test is digits.test and skewed.val is digits.val
    for c, f in enumerate(fractions):
        have, had = int((skewed.train.y == c).sum()), int((digits.train.y == c).sum())
        assert have == max(1, round(f * had))


def test_class_subset_keeps_one_of_a_rare_class_and_is_seeded():
    split = Split(torch.rand(20, 1, 2, 2), torch.tensor([0] * 18 + [1] * 2))
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    kept = class_subset(split, [0.5, 0.01], gen())
    assert (kept.y == 1).sum() == 1 and (kept.y == 0).sum() == 9
    assert torch.equal(kept.x, class_subset(split, [0.5, 0.01], gen()).x)


def test_class_fractions_of_the_wrong_length_are_one_clear_error(digits):
    with pytest.raises(DeepAlignError, match="class_fractions: 3 values, but digits has 10"):
        shifted(digits, ShiftCfg(0.0, [0.5, 0.5, 0.5], 0))


def test_the_two_sides_are_mirrored_complements():
    cfg = build(disjoint.MergeCfg, tiny_params()["merge"], "merge")
    sides = disjoint.side_shifts(cfg, 10)
    a, b = sides["a"].class_fractions, sides["b"].class_fractions
    assert a[:5] == [cfg.skew] * 5 and b[5:] == [cfg.skew] * 5
    assert all(abs(x + y - 1) < 1e-12 for x, y in zip(a, b))


RESNET_MERGE = {
    "networks": 2,
    "seed": 1,
    "methods": ["naive"],
    "bn_reset_images": 8,
    "aligners": [],
}


@pytest.mark.parametrize(
    "section,change,key",
    [
        ("merge", {"skew": 0.5}, "merge.skew"),
        ("merge", {"skew": 1.0}, "merge.skew"),
        ("merge", {"methods": ["weight_matching"]}, "naive"),
        ("merge", {"resnet": RESNET_MERGE | {"methods": ["weight_matching"]}}, "resnet.methods"),
        ("merge", {"resnet": RESNET_MERGE | {"methods": ["naive", "wm"]}}, "resnet.methods"),
        ("merge", {"resnet": RESNET_MERGE | {"bn_reset_images": 0}}, "resnet.bn_reset_images"),
        ("merge", {"resnet": RESNET_MERGE | {"networks": -1}}, "resnet.networks"),
        ("ood", {"zoos": {}}, "zoos"),
        ("ood", {"networks": 1}, "networks"),
    ],
)
def test_bad_study_settings_name_their_key(section, change, key):
    values = tiny_params()[section] | change
    cls = disjoint.MergeCfg if section == "merge" else ood.OodCfg
    with pytest.raises(DeepAlignError, match=key):
        build(cls, values, section)


def test_shifted_recipe_changes_only_the_training_settings():
    params = tiny_params()
    base = build(NetCfg, params["zoo"]["archs"]["mlp"], "zoo.archs.mlp")
    cfg = build(ood.OodCfg, params["ood"], "ood")
    net = ood.recipe(base, cfg, cfg.zoos["sgd"])
    assert (net.optimizer, net.momentum, net.n_test, net.n_train) == ("sgd", 0.9, cfg.networks, 0)
    assert (net.hidden, net.activation) == (base.hidden, base.activation)


RECIPES = {
    "mlp": net_cfg("mlp", hidden=[16], epochs=8),
    "resnet": net_cfg("resnet", hidden=[4, 8], blocks=1, epochs=3),
}


def _planted_side(digits: Dataset, kind: str) -> tuple[tuple[Zoo, list], Dataset]:
    """Two trained networks of side A (skewed data) and their planted, permuted copies as
    side B."""
    net = RECIPES[kind]
    arch = make_arch(net, digits)
    skewed = shifted(digits, ShiftCfg(0.0, [0.95] * 5 + [0.05] * 5, 0))
    start = stack([init_network(arch, s) for s in (0, 1)])
    trained = train_batched(arch, start, skewed.train, net, [0, 1], torch.device("cpu"), False)
    gen = torch.Generator().manual_seed(0)
    copies = [
        apply_permutation(trained[k], random_permutation(arch.spec, gen), arch.spec) for k in (0, 1)
    ]
    records = [{"split": "test"}] * 2
    a, b = Zoo(arch, records, trained), Zoo(arch, records, stack(copies))
    return disjoint.paired(a, b), digits


@pytest.fixture(scope="module")
def side(digits: Dataset) -> tuple[tuple[Zoo, list], Dataset]:
    return _planted_side(digits, "mlp")


@pytest.fixture(scope="module")
def resnet_side(digits: Dataset) -> tuple[tuple[Zoo, list], Dataset]:
    return _planted_side(digits, "resnet")


def _sides(arch: str, methods: list[str], reset_images: int) -> disjoint.Sides:
    return disjoint.Sides(arch, RECIPES[arch], 0, methods, reset_images)


def test_merging_a_network_with_its_permuted_copy_gives_it_back_only_when_aligned(side):
    (zoo, pairs), data = side
    assert pairs == [(0, 2), (1, 3)]
    align = build(AlignCfg, tiny_params()["align"], "align")
    sides = _sides("mlp", ["naive", "weight_matching"], 0)
    summary, lines = disjoint.merge_pairs(zoo, pairs, data, sides, 7, align)
    _, acc = evaluate_networks(zoo.arch, zoo.nets[0:2], data.test)
    aligned = summary["weight_matching"]
    assert aligned["merged_acc"] == pytest.approx(acc.mean().item(), abs=1e-6)
    assert aligned["a_acc"] == pytest.approx(aligned["b_acc"], abs=1e-6)
    assert summary["naive"]["merged_acc"] < aligned["merged_acc"] - 0.05  # twin: unaligned
    assert summary["naive"]["merged_loss"] > aligned["merged_loss"]
    assert len(lines["naive"]) == 2 and lines["naive"][0].acc.shape == (7,)


def test_a_merged_resnet_is_scored_with_batchnorm_statistics_recomputed(resnet_side):
    (zoo, pairs), data = resnet_side
    assert zoo.arch.has_batchnorm
    align = build(AlignCfg, tiny_params()["align"], "align")
    sides = _sides("resnet", ["naive", "weight_matching"], 256)
    summary, _ = disjoint.merge_pairs(zoo, pairs, data, sides, 5, align)
    # aligned, the merge is the network itself, with statistics recomputed on 256 images
    own = reset_statistics(zoo.arch, zoo.nets[0:2], data.train.x[:256])
    loss, acc = evaluate_networks(zoo.arch, own, data.test)
    aligned = summary["weight_matching"]
    assert aligned["merged_acc"] == pytest.approx(acc.mean().item(), abs=1e-6)
    assert aligned["merged_loss"] == pytest.approx(loss.mean().item(), rel=1e-5)
    kept_loss, kept_acc = evaluate_networks(zoo.arch, zoo.nets[0:2], data.test)
    assert abs(kept_loss.mean().item() - aligned["merged_loss"]) > 1e-4  # twin: stats kept
    assert aligned["a_acc"] == pytest.approx(kept_acc.mean().item(), abs=1e-6)  # as trained
    assert aligned["a_loss"] == pytest.approx(kept_loss.mean().item(), rel=1e-5)
    assert summary["naive"]["merged_loss"] > aligned["merged_loss"]  # twin: unaligned


def test_the_resnet_pairs_follow_the_resnet_recipe_and_can_be_left_out():
    params = tiny_params()
    cfg = build(disjoint.MergeCfg, params["merge"], "merge")
    default = build(NetCfg, params["zoo"]["archs"]["mlp"], "zoo.archs.mlp")
    resnet = build(NetCfg, params["resnets"]["zoo"], "resnets.zoo")
    mlp, res = disjoint.plan_sides(cfg, default, resnet)
    assert (mlp.arch, mlp.net.kind, mlp.net.n_test, mlp.reset_images) == (
        "mlp",
        "mlp",
        cfg.networks,
        0,
    )
    assert (res.net.kind, res.net.hidden, res.net.n_test) == ("resnet", resnet.hidden, 2)
    assert res.seed_of("b") == cfg.resnet.seed + 2 and res.reset_images > 0
    none = dataclasses.replace(cfg, resnet=dataclasses.replace(cfg.resnet, networks=0))
    assert [s.arch for s in disjoint.plan_sides(none, default, resnet)] == ["mlp"]


def test_a_study_asking_for_an_unknown_architecture_names_its_key():
    from deepalign.zoo.build import ZooCfg, recipe_of

    zoo = build(ZooCfg, tiny_params()["zoo"], "zoo")
    assert recipe_of(zoo, "mlp", "ood.arch").kind == "mlp"
    with pytest.raises(DeepAlignError, match=r"ood.arch: 'rnn' is not in zoo.archs \(known: mlp"):
        recipe_of(zoo, "rnn", "ood.arch")


def test_resnet_pairs_use_their_own_aligners_and_the_others_align_deep_align():
    from deepalign.config import build, read_params
    from deepalign.evaluation.experiment import AlignCfg
    from deepalign.methods.learned import DeepAlignCfg

    align = build(AlignCfg, read_params()["align"], "align")
    cfg = build(disjoint.MergeCfg, read_params()["merge"], "merge")
    plans = {s.arch: s for s in disjoint.plan_sides(cfg, RECIPES["mlp"], RECIPES["resnet"])}
    assert plans["mlp"].settings(align) is align
    found = plans["resnet"].settings(align).deep_align
    assert found == DeepAlignCfg(list(cfg.resnet.aligners)) != align.deep_align
    assert plans["resnet"].settings(align).sinkhorn == align.sinkhorn  # nothing else moves
