"""Runs of a permuted axis: concatenation (DenseNet, Inception) and splits back into its parts,
grouped and depthwise convolutions (ResNeXt, RegNet, MobileNet), channels-last blocks (ConvNeXt)
and per-example operations (stochastic depth). For random small networks of each kind a random
spec permutation keeps the function; a wrong one (a run moved across its boundary, a unit moved
between conv groups, a channels-last weight left out) changes it. Weight matching undoes planted
permutations; `deepalign merge` of two trained DenseNet-style networks beats their average."""

from __future__ import annotations

import copy
import importlib
import io
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torchvision.ops import stochastic_depth
from tqdm import tqdm

import deepalign
from deepalign.core.matching import Scorer
from deepalign.core.permspec import Axis, PermSpec, apply_permutation, random_permutation
from deepalign.core.trace import trace
from deepalign.core.weightspace import WeightSpace
from deepalign.errors import DeepAlignError
from deepalign.methods.problem import Problem
from deepalign.methods.weight_matching import (
    WeightMatchingCfg,
    objective,
    weight_matching,
    weight_matching_trace,
)
from deepalign.usermodel import network_arch

# --- small networks of each kind ---------------------------------------------------------------


class Dense(nn.Module):
    """A DenseNet-style block: each layer reads the concatenation of everything before it."""

    def __init__(self, width: int, growth: int, layers: int, norm: bool = True) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        norm_of = nn.BatchNorm2d if norm else (lambda c: nn.Identity())
        self.layers = nn.ModuleList(
            nn.Sequential(
                norm_of(width + k * growth),
                nn.ReLU(),
                nn.Conv2d(width + k * growth, growth, 3, padding=1),
            )
            for k in range(layers)
        )
        wide = width + layers * growth
        self.head = nn.Sequential(
            norm_of(wide), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(wide, 10)
        )

    def forward(self, x: Tensor) -> Tensor:  # (N, 1, 8, 8) -> (N, 10)
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return self.head(torch.cat(features, 1))


class Grouped(nn.Module):
    """A ResNeXt-style bottleneck: 1x1, grouped 3x3 (or depthwise), 1x1, with a shortcut."""

    def __init__(self, width: int, groups: int, depthwise: bool = False) -> None:
        super().__init__()
        inner = width * groups
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.reduce = nn.Sequential(nn.Conv2d(8, inner, 1), nn.BatchNorm2d(inner), nn.ReLU())
        self.mix = nn.Sequential(
            nn.Conv2d(inner, inner, 3, padding=1, groups=inner if depthwise else groups),
            nn.BatchNorm2d(inner),
            nn.ReLU(),
        )
        self.expand = nn.Sequential(nn.Conv2d(inner, 8, 1), nn.BatchNorm2d(8))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x: Tensor) -> Tensor:  # (N, 1, 8, 8) -> (N, 10)
        h = self.stem(x)
        h = torch.relu(h + self.expand(self.mix(self.reduce(h))))
        return self.head(h)


class ChannelsLast(nn.Module):
    """A ConvNeXt-style block: depthwise conv, to channels-last, LayerNorm and two Linears on
    the last axis, back, a learned per-channel scale read directly, stochastic depth, and a
    shortcut."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.dw = nn.Conv2d(width, width, 5, padding=2, groups=width)
        self.norm = nn.LayerNorm(width)
        self.up, self.down = nn.Linear(width, 3 * width), nn.Linear(3 * width, width)
        self.scale = nn.Parameter(torch.rand(width, 1, 1) + 0.5)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))

    def forward(self, x: Tensor) -> Tensor:  # (N, 1, 8, 8) -> (N, 10)
        h = self.stem(x)
        y = self.dw(h).permute(0, 2, 3, 1)  # (N, H, W, C)
        y = self.down(torch.nn.functional.gelu(self.up(self.norm(y)))).permute(0, 3, 1, 2)
        y = stochastic_depth(self.scale * y, 0.2, "row", self.training)
        return self.head(h + y)


class SplitBack(nn.Module):
    """Two branches concatenated, split back into them, one transformed, joined again."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, a), nn.Linear(6, b)
        self.f, self.head = nn.Linear(b, b), nn.Linear(a + b, 3)
        self.sizes = [a, b]

    def forward(self, x: Tensor) -> Tensor:  # (N, 6) -> (N, 3)
        h = torch.relu(torch.cat([self.a(x), self.b(x)], dim=1))
        p, q = torch.split(h, self.sizes, dim=1)
        return self.head(torch.cat([torch.tanh(self.f(q)), p], dim=1))


def randomised(module: nn.Module, seed: int) -> nn.Module:
    """Random normalisation weights and running statistics (not 1 and 0), eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d | nn.LayerNorm):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    return module.eval()


def state(module: nn.Module) -> WeightSpace:
    return WeightSpace({k: v for k, v in module.state_dict().items() if v.is_floating_point()})


def run(module: nn.Module, ws: WeightSpace, x: Tensor) -> Tensor:
    out = copy.deepcopy(module)
    out.load_state_dict(ws.named, strict=False)
    with torch.no_grad():
        return out.eval()(x)


def keeps(module: nn.Module, spec: PermSpec, perm: dict, x: Tensor) -> bool:
    ws = state(module)
    return torch.allclose(
        run(module, apply_permutation(ws, perm, spec), x), run(module, ws, x), atol=1e-5
    )


def networks() -> st.SearchStrategy:
    dense = st.builds(Dense, st.integers(2, 5), st.integers(1, 4), st.integers(1, 3), st.booleans())
    grouped = st.builds(Grouped, st.integers(1, 4), st.sampled_from([2, 3, 4]), st.booleans())
    last = st.builds(ChannelsLast, st.integers(2, 6))
    return st.one_of(dense, grouped, last)


# --- a random spec permutation keeps the function, a wrong one changes it ----------------------


@settings(max_examples=25, deadline=None)
@given(net=networks(), seed=st.integers(0, 2**31 - 1))
def test_a_random_spec_permutation_keeps_every_kind_of_network(net, seed):
    module = randomised(net, seed)
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    spec = trace(module, x[:2]).spec
    assert keeps(module, spec, random_permutation(spec, torch.Generator().manual_seed(seed)), x)


def shifted(perm: dict) -> dict:
    """A permutation that moves every unit (a rotation by one)."""
    return {g: p.roll(1) for g, p in perm.items()}


def moved_run(spec: PermSpec, key: str) -> PermSpec:
    """The spec with `key`'s run at an offset moved one entry across its boundary."""
    members = {
        g: tuple(
            ax._replace(offset=ax.offset - 1) if ax.key == key and ax.offset else ax for ax in axes
        )
        for g, axes in spec.members.items()
    }
    return PermSpec(members, spec.sizes)


def test_a_concatenated_run_moved_across_its_boundary_breaks_the_function():
    module = randomised(Dense(3, 2, 2), 0)
    x = torch.randn(5, 1, 8, 8)
    spec = trace(module, x[:2]).spec
    perm = shifted(random_permutation(spec, torch.Generator().manual_seed(0)))
    assert keeps(module, spec, perm, x)
    assert any(ax.offset for g in spec.groups for ax in spec.acting(g))  # runs side by side
    assert not keeps(module, moved_run(spec, "layers.1.0.weight"), perm, x)  # twin


def whole_conv_groups(spec: PermSpec, key: str) -> PermSpec:
    """The spec a tracer that ignored conv groups would make: the groups inside the grouped
    convolution `key` joined into one, which moves units between conv groups."""
    inner = [
        g for g in spec.groups if any(ax.key == key and ax.block == 1 for ax in spec.acting(g))
    ]
    first = inner[0]
    axes = tuple(ax._replace(offset=0) for ax in spec.members[first])
    members = {g: a for g, a in spec.members.items() if g not in inner[1:]} | {first: axes}
    sizes = {g: n for g, n in spec.sizes.items() if g in members}
    sizes[first] = spec.sizes[first] * len(inner)
    return PermSpec(members, sizes)


def test_a_unit_moved_between_conv_groups_breaks_the_function():
    module = randomised(Grouped(3, 4), 0)
    x = torch.randn(5, 1, 8, 8)
    spec = trace(module, x[:2]).spec
    outer = [g for g in spec.groups if any(ax.block == 3 for ax in spec.acting(g))]
    assert len(outer) == 1 and spec.sizes[outer[0]] == 4  # whole conv groups move together
    assert sum(spec.sizes[g] == 3 for g in spec.groups) >= 4  # units inside each conv group
    gen = torch.Generator().manual_seed(0)
    assert keeps(module, spec, shifted(random_permutation(spec, gen)), x)
    wrong = whole_conv_groups(spec, "mix.0.weight")
    assert not keeps(module, wrong, shifted(random_permutation(wrong, gen)), x)  # twin


def test_a_channels_last_weight_left_out_breaks_the_function():
    module = randomised(ChannelsLast(4), 0)
    x = torch.randn(5, 1, 8, 8)
    spec = trace(module, x[:2]).spec
    stream = next(g for g in spec.groups if ("norm.weight", 0, 1, 0) in spec.acting(g))
    keys = {ax.key for ax in spec.acting(stream)}
    assert {"scale", "norm.weight", "up.weight", "down.weight", "dw.weight"} <= keys
    perm = shifted(random_permutation(spec, torch.Generator().manual_seed(0)))
    assert keeps(module, spec, perm, x)
    for left_out in ("scale", "norm.weight"):  # twins
        members = dict(spec.members)
        members[stream] = tuple(ax for ax in spec.acting(stream) if ax.key != left_out)
        assert not keeps(module, PermSpec(members, spec.sizes), perm, x), left_out


def test_stochastic_depth_passes_through_in_training_too():
    module = randomised(ChannelsLast(4), 1)
    spec = trace(module.train(), torch.zeros(2, 1, 8, 8)).spec
    assert spec == trace(module.eval(), torch.zeros(2, 1, 8, 8)).spec


def test_a_split_of_a_concatenation_reads_each_part_as_its_group():
    module = SplitBack(3, 4)
    x = torch.randn(7, 6)
    spec = trace(module, x[:2]).spec
    head = sorted(
        (ax.offset, spec.sizes[g])
        for g in spec.groups
        for ax in spec.acting(g)
        if ax.key == "head.weight"
    )
    assert head == [(0, 4), (4, 3)]  # f's 4 units first, then a's 3
    perm = shifted(random_permutation(spec, torch.Generator().manual_seed(0)))
    assert keeps(module, spec, perm, x)
    assert not keeps(module, moved_run(spec, "head.weight"), perm, x)  # twin


class Uneven(SplitBack):
    def __init__(self) -> None:
        super().__init__(3, 4)
        self.sizes, self.f = [2, 5], nn.Linear(5, 5)  # cuts a's 3 units apart


def test_a_split_that_cuts_a_group_is_refused_naming_the_operation():
    with pytest.raises(DeepAlignError, match=r"^torch.split in the top-level module \(Uneven\)"):
        trace(Uneven(), torch.zeros(2, 6))


def test_a_channel_shuffle_is_refused_by_name():
    class Shuffle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(1, 4, 1), nn.Conv2d(1, 4, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x: Tensor) -> Tensor:
            h = torch.cat([self.a(x), self.b(x)], 1)
            n, c, hh, ww = h.shape
            h = h.view(n, 2, c // 2, hh, ww).transpose(1, 2).reshape(n, c, hh, ww)
            return self.c(h)

    with pytest.raises(DeepAlignError, match="channel shuffle"):
        trace(Shuffle(), torch.zeros(2, 1, 4, 4))


# --- weight matching undoes planted permutations ------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [lambda: Dense(4, 3, 3), lambda: Grouped(4, 4), lambda: Grouped(3, 3, True)],
    ids=["densenet-style", "resnext-style", "depthwise"],
)
def test_weight_matching_undoes_a_planted_permutation(make):
    torch.manual_seed(0)
    module = randomised(make(), 0)
    arch = network_arch(module, (1, 8, 8))
    ws = arch.weightspace(module.state_dict())
    planted = random_permutation(arch.spec, torch.Generator().manual_seed(1))
    other = apply_permutation(ws, planted, arch.spec)
    cfg = WeightMatchingCfg(max_iter=100, restarts=0, seed=0)
    found = weight_matching(Problem.of(ws, other, arch, None), cfg)
    back = apply_permutation(other, found, arch.spec)
    assert all(torch.equal(back.named[k], ws.named[k]) for k in ws.named)  # recovery 1.0
    assert not all(torch.equal(other.named[k], ws.named[k]) for k in ws.named)  # it was moved


def test_the_spec_records_each_run_as_key_axis_offset_and_block():
    spec = trace(Dense(3, 2, 2, norm=False), torch.zeros(2, 1, 8, 8)).spec
    runs = sorted(
        (ax.offset, spec.sizes[g], ax.block)
        for g in spec.groups
        for ax in spec.acting(g)
        if ax.key == "head.4.weight"
    )
    assert runs == [(0, 3, 1), (3, 2, 1), (5, 2, 1)]  # stem, layer 0, layer 1
    assert Axis("head.4.weight", 1, 1, 3) in [ax for g in spec.groups for ax in spec.acting(g)]


# --- merging two trained DenseNet-style networks -----------------------------------------------


def trained_dense(digits, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = Dense(8, 8, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = digits.train.x, digits.train.y
    for _ in range(15):
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net.eval()


def accuracy(net: nn.Module, split) -> float:
    with torch.no_grad():
        return (net.eval()(split.x).argmax(1) == split.y).float().mean().item()


def test_merging_two_trained_densenet_style_networks_beats_their_average(digits):
    a, b = trained_dense(digits, 0), trained_dense(digits, 1)
    ends = (accuracy(a, digits.test), accuracy(b, digits.test))
    assert min(ends) > 0.85, ends
    aligned = deepalign.merge(a, b, method="weight_matching", data="digits")
    average = deepalign.merge(a, b, method="naive", data="digits")
    found = (accuracy(aligned, digits.test), accuracy(average, digits.test))
    assert found[0] > found[1] + 0.05, found


# --- weight matching's scores are exact on runs side by side and nested ------------------------


@pytest.mark.parametrize(
    "make",
    [lambda: Grouped(3, 4), lambda: Dense(3, 2, 3), lambda: ChannelsLast(4)],
    ids=["nested", "side-by-side", "channels-last"],
)
def test_each_groups_scores_predict_the_objective_of_any_permutation_of_it(make):
    """Brute force: for every group g and random permutations s of it, the objective of
    `other` permuted by perm | {g: s} moves by sum_u score[u, s(u)] - score[u, perm(u)]."""
    torch.manual_seed(0)
    net = randomised(make(), 0)
    arch = network_arch(net, (1, 8, 8))
    ref = arch.weightspace(net.state_dict())
    other = arch.weightspace(randomised(make(), 1).state_dict())
    gen = torch.Generator().manual_seed(2)
    perm = random_permutation(arch.spec, gen)
    scorer = Scorer(arch.spec, ref, other)
    base = objective(ref, apply_permutation(other, perm, arch.spec))
    for g in arch.spec.groups:
        score, rows = scorer.score(perm, g), torch.arange(arch.spec.sizes[g])
        for s in random_permutation(arch.spec, gen, batch=3)[g]:
            moved = objective(ref, apply_permutation(other, perm | {g: s}, arch.spec))
            predicted = score[rows, s].sum() - score[rows, perm[g]].sum()
            assert moved - base == pytest.approx(predicted.item(), abs=1e-8), g


def test_weight_matching_never_lowers_its_objective_on_grouped_convolutions():
    torch.manual_seed(0)
    ref, other = randomised(Grouped(3, 4), 0), randomised(Grouped(3, 4), 1)
    arch = network_arch(ref, (1, 8, 8))
    problem = Problem.of(
        arch.weightspace(ref.state_dict()), arch.weightspace(other.state_dict()), arch, None
    )
    _, traces = weight_matching_trace(problem, WeightMatchingCfg(max_iter=50, restarts=2, seed=0))
    for history in traces:
        assert all(b >= a - 1e-9 for a, b in zip(history, history[1:])), history


def test_kept_shares_updated_from_the_moved_units_equal_fresh_ones(monkeypatch):
    """Every share kept (as for a VGG's 4096-unit layers) and updated from the units that
    moved gives the scores a fresh computation gives, as weight matching's steps go by."""
    monkeypatch.setattr(Scorer, "CACHED", 0)
    torch.manual_seed(0)
    net = randomised(Grouped(3, 4), 0)
    arch = network_arch(net, (1, 8, 8))
    ref = arch.weightspace(net.state_dict())
    other = arch.weightspace(randomised(Grouped(3, 4), 1).state_dict())
    gen = torch.Generator().manual_seed(3)
    perm, kept = random_permutation(arch.spec, gen), Scorer(arch.spec, ref, other)
    updates = []
    monkeypatch.setattr(kept, "_moved_inputs", _spy(kept._moved_inputs, updates))
    for step in range(4 * len(arch.spec.groups)):
        g = arch.spec.groups[step % len(arch.spec.groups)]
        fresh = Scorer(arch.spec, ref, other).score(perm, g)
        torch.testing.assert_close(kept.score(perm, g), fresh, rtol=1e-5, atol=1e-5)
        if step % 3 == 2:  # every unit moves: the share is recomputed, not updated
            perm[g] = perm[g][torch.randperm(len(perm[g]), generator=gen)]
            continue
        swap = torch.randperm(len(perm[g]), generator=gen)[:2]  # move two, as a LAP step might
        perm[g] = perm[g].clone()
        perm[g][swap] = perm[g][swap.flip(0)]
    assert updates  # the update path was taken


def _spy(method, calls: list):
    def spied(*args, **kwargs):
        calls.append(args)
        return method(*args, **kwargs)

    return spied


# --- what else reads or moves the permuted axis ------------------------------------------------


class Masked(nn.Module):
    """A per-channel constant outside the state_dict (a non-persistent buffer) fixes the
    channels it multiplies; a module's own per-channel tensor is permuted with them."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(1, 4, 3), nn.Conv2d(1, 5, 3), nn.Linear(9, 2)
        self.register_buffer("mask", torch.tensor([1.0, 2.0, 3.0, 4.0]).view(4, 1, 1), False)
        self.gain = nn.Parameter(torch.rand(5, 1, 1) + 0.5)

    def forward(self, x: Tensor) -> Tensor:  # (N, 1, 4, 4) -> (N, 2)
        h = torch.cat([self.a(x) * self.mask, self.gain * self.b(x)], 1)
        return self.head(h.mean((2, 3)))


def test_a_constant_fixes_what_it_multiplies_and_a_parameter_is_permuted_with_it():
    module, x = Masked(), torch.randn(5, 1, 4, 4)
    spec = trace(module, x[:2]).spec
    keys = {ax.key for g in spec.groups for ax in spec.acting(g)}
    assert "a.weight" not in keys and {"gain", "b.weight"} <= keys
    perm = shifted(random_permutation(spec, torch.Generator().manual_seed(0)))
    assert keeps(module, spec, perm, x)
    members = {g: tuple(ax for ax in axes if ax.key != "gain") for g, axes in spec.members.items()}
    assert not keeps(module, PermSpec(members, spec.sizes), perm, x)  # twin: gain left out


class Stacked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:  # (N, 3) -> (2N, 2): both along the batch
        return self.head(torch.relu(torch.cat([self.a(x), self.b(x)], 0)))


def test_a_concatenation_along_the_batch_permutes_its_inputs_alike():
    module, x = Stacked(), torch.randn(5, 3)
    spec = trace(module, x[:2]).spec
    assert spec.groups == ("h0",) and {ax.key for ax in spec.acting("h0")} >= {
        "a.weight",
        "b.weight",
    }
    assert keeps(module, spec, shifted(random_permutation(spec)), x)


class WrongAxis(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv1d(2, 4, 1), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:  # (N, 2, 6): a Linear over length, channels kept
        return self.fc(self.conv(x))


def test_a_linear_over_another_axis_than_the_permuted_one_is_refused_in_one_line():
    with pytest.raises(DeepAlignError, match=r"^module 'fc' \(Linear\) .* axis 1 is permuted"):
        trace(WrongAxis(), torch.zeros(2, 2, 6))


# --- progress on long alignments -----------------------------------------------------------------


weight_matching_module = importlib.import_module("deepalign.methods.weight_matching")


class _Terminal(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty", [True, False], ids=["terminal", "log"])
def test_weight_matching_shows_a_bar_with_an_estimate_on_a_terminal_only(monkeypatch, tty):
    shown_at_once = lambda *a, **k: tqdm(*a, **(k | {"delay": 0}))  # noqa: E731 (as if long)
    monkeypatch.setattr(weight_matching_module, "tqdm", shown_at_once)
    err = _Terminal(tty)
    monkeypatch.setattr(sys, "stderr", err)
    net = randomised(Grouped(3, 4), 0)
    arch = network_arch(net, (1, 8, 8))
    ws = arch.weightspace(net.state_dict())
    problem = Problem.of(ws, ws, arch, None)
    weight_matching(problem, WeightMatchingCfg(max_iter=5, restarts=0, seed=0))
    shown = err.getvalue()
    total = 5 * len(arch.spec.groups)
    assert ("weight matching" in shown and f"/{total} " in shown) is tty
