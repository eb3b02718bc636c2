"""Merging networks trained on disjoint data (DEEP-ALIGN's Figure 5): side A trains on most of
the training images of the first half of the classes and few of the rest, side B on the
mirror; each pair (A_k, B_k) is aligned by every method, averaged with `deepalign`'s merge
code, and the merged network is judged on the whole test split against both endpoints.

Two architectures: the default zoo's (`merge.arch`, every method) and the ResNet study's
recipe (`merge.resnet`), whose merged and interpolated networks get BatchNorm statistics of
their own, recomputed on training images (averaged running statistics describe neither
parent).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor
from tqdm import tqdm

from deepalign.config import Check, Count, GridPoints, Name, Positive, Seed, invalid
from deepalign.core.data import Dataset, reset_images_of
from deepalign.core.lmc import Curve, evaluate_networks, reset_statistics
from deepalign.core.permspec import apply_permutation
from deepalign.core.shifts import ShiftCfg
from deepalign.core.weightspace import stack
from deepalign.evaluation.experiment import AlignCfg, pair_curves
from deepalign.evaluation.pairs import MethodRun, align_pairs
from deepalign.merging import merged
from deepalign.methods import check_methods
from deepalign.methods.learned import DeepAlignCfg
from deepalign.zoo.kinds import NetCfg
from deepalign.zoo.store import Zoo

SIDES = ("a", "b")


def check_merge_methods(key: str, methods: list[str]) -> None:
    """Known methods, naive (the unaligned average) among them."""
    check_methods(key, methods)
    if "naive" not in methods:
        raise invalid(key, methods, "a list with naive (the unaligned average)")


@dataclass(frozen=True)
class ResNetMergeCfg:
    """`merge.resnet`: the same skews with the ResNet study's recipe (`resnets.zoo`)."""

    networks: Count  # per side; 0: no ResNet pairs
    seed: Seed  # A_k trains from seed + k, B_k from seed + networks + k
    methods: list[str]
    bn_reset_images: Positive  # training images for each merged or interpolated ResNet's
    # BatchNorm statistics
    aligners: list[str]  # DEEP-ALIGN's aligner files or folders for the ResNet pairs

    def __post_init__(self) -> None:
        check_merge_methods("resnet.methods", self.methods)


@dataclass(frozen=True)
class MergeCfg:
    """Section `merge` of params.yaml."""

    arch: Name  # the default zoo's architecture whose recipe both sides follow
    networks: Positive  # per side; pair k is (A_k, B_k)
    seed: Seed  # A_k trains from seed + k, B_k from seed + networks + k
    skew: Annotated[float, Check(lambda v: 0.5 < v < 1, "in (0.5, 1)")]  # the part of
    # its own classes' training images a side keeps (and 1 - skew of the other classes')
    methods: list[str]
    points: GridPoints  # lambda grid of each pair's line (merged: lambda = 0.5)
    resnet: ResNetMergeCfg

    def __post_init__(self) -> None:
        check_merge_methods("methods", self.methods)


@dataclass(frozen=True)
class Sides:
    """One architecture's pairs: the recipe both sides follow (all test networks), where
    their seeds start, the methods, the BatchNorm reset images (0: none), and DEEP-ALIGN's
    aligners (empty: `align.deep_align`'s)."""

    arch: str
    net: NetCfg
    seed: int
    methods: list[str]
    reset_images: int
    aligners: tuple[str, ...] = ()

    def settings(self, align: AlignCfg) -> AlignCfg:
        """`align` with this architecture's aligners for DEEP-ALIGN."""
        if not self.aligners:
            return align
        return dataclasses.replace(align, deep_align=DeepAlignCfg(list(self.aligners)))

    def seed_of(self, side: str) -> int:
        """A_k trains from seed + k, B_k from seed + networks + k."""
        return self.seed + SIDES.index(side) * self.net.n_test


def plan_sides(cfg: MergeCfg, default: NetCfg, resnet: NetCfg) -> list[Sides]:
    """The default zoo architecture's pairs, then the ResNets' (unless `resnet.networks` 0)."""
    plans = [Sides(cfg.arch, side_recipe(default, cfg.networks), cfg.seed, cfg.methods, 0)]
    r = cfg.resnet
    if r.networks:
        net = side_recipe(resnet, r.networks)
        plans.append(Sides("resnet", net, r.seed, r.methods, r.bn_reset_images, tuple(r.aligners)))
    return plans


def side_shifts(cfg: MergeCfg, n_classes: int) -> dict[str, ShiftCfg]:
    """The class fractions of each side: A keeps `skew` of the first half's images, B of the
    second half's, each 1 - skew of the other half's."""
    half = n_classes // 2
    fractions = {
        "a": [cfg.skew if c < half else 1 - cfg.skew for c in range(n_classes)],
        "b": [1 - cfg.skew if c < half else cfg.skew for c in range(n_classes)],
    }
    return {s: ShiftCfg(0.0, fractions[s], cfg.seed + i) for i, s in enumerate(SIDES)}


def side_recipe(base: NetCfg, networks: int) -> NetCfg:
    """The recipe, every network a test one."""
    return dataclasses.replace(base, n_train=0, n_val=0, n_test=networks)


def paired(a: Zoo, b: Zoo) -> tuple[Zoo, list[tuple[int, int]]]:
    """One zoo holding side A then side B, and the pairs (A_k, B_k)."""
    both = Zoo(a.arch, a.records + b.records, stack([*a.nets.unbind(), *b.nets.unbind()]))
    n = len(a.records)
    return both, [(k, n + k) for k in range(min(n, len(b.records)))]


def merge_pairs(
    zoo: Zoo,
    pairs: list[tuple[int, int]],
    data: Dataset,
    sides: Sides,
    points: int,
    align: AlignCfg,
) -> tuple[dict[str, dict], dict[str, list[Curve]]]:
    """Every method on every pair: merge metrics (means over pairs) and the lines behind."""
    summary, lines = {}, {}
    ends = _endpoints(zoo, pairs, data)  # the same for every method
    label, settings = f"merge {sides.arch}", sides.settings(align)
    for method in tqdm(sides.methods, desc=label, unit="method", mininterval=5.0):
        perms, seconds, objective = align_pairs(method, zoo, pairs, data.train, settings)
        run = MethodRun(method, pairs, perms, seconds, objective, torch.zeros(0))
        lines[method] = pair_curves(run, zoo, data, points, sides.reset_images)
        summary[method] = _merged_metrics(zoo, run, data, lines[method], ends, sides.reset_images)
    return summary, lines


def _endpoints(zoo: Zoo, pairs: list[tuple[int, int]], data: Dataset) -> tuple[Tensor, Tensor]:
    """Test loss and accuracy of both endpoints as trained (their own statistics): (K, 2) each."""
    order = torch.tensor([index for pair in pairs for index in pair])  # A_0, B_0, A_1, ...
    loss, acc = evaluate_networks(zoo.arch, zoo.nets[order], data.test)  # (2K,), (2K,)
    return loss.view(-1, 2), acc.view(-1, 2)


def _merged_metrics(
    zoo: Zoo,
    run: MethodRun,
    data: Dataset,
    lines: list[Curve],
    ends: tuple[Tensor, Tensor],
    reset_images: int,
) -> dict:
    """The merged networks (equal-weight averages by `merging.merged`; with `reset_images`,
    BatchNorm statistics recomputed on that many training images) on the whole test split
    against the endpoints as trained (`ends`: loss, accuracy), and the best point of each line
    (whose networks, ends included, have recomputed statistics): means over pairs."""
    spec = zoo.arch.spec
    nets = [
        merged(
            zoo.arch, [zoo.nets[i], apply_permutation(zoo.nets[j], run.perm(k), spec)], [0.5] * 2
        )
        for k, (i, j) in enumerate(run.pairs)
    ]
    reset = reset_images_of(data.train, reset_images)
    merged_nets = reset_statistics(zoo.arch, stack(nets), reset)
    loss, acc = evaluate_networks(zoo.arch, merged_nets, data.test)  # (K,), (K,)
    end_loss, end_acc = ends  # (K, 2), (K, 2)
    best = torch.stack([c.acc.max() for c in lines])  # (K,)
    best_at = torch.stack([c.lambdas[c.acc.argmax()] for c in lines])  # (K,)
    return {
        "merged_acc": acc.mean().item(),
        "merged_loss": loss.mean().item(),
        "a_acc": end_acc[:, 0].mean().item(),
        "b_acc": end_acc[:, 1].mean().item(),
        "a_loss": end_loss[:, 0].mean().item(),
        "b_loss": end_loss[:, 1].mean().item(),
        "merged_minus_best_end": (acc - end_acc.max(1).values).mean().item(),
        "best_line_acc": best.mean().item(),
        "best_lambda": best_at.mean().item(),
        "seconds_per_pair": run.seconds.mean().item(),
    }
