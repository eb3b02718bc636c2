"""Permutation specs traced from the module graph: function kept by every permutation the spec
allows, broken by one it does not; today's chain specs unchanged; unsafe graphs refused."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from deepalign.core.arch import ModuleArch, functional_forward
from deepalign.core.chain import Chain, cnn_arch, mlp_arch
from deepalign.core.permspec import Axis, PermSpec, apply_permutation, random_permutation
from deepalign.core.resnet import ResNetModule, resnet_arch
from deepalign.core.trace import trace
from deepalign.core.weightspace import WeightSpace, stack
from deepalign.errors import DeepAlignError
from deepalign.methods.deep_align.augment import check_rescalable
from deepalign.zoo.build import init_network


class VGG(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(12 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 5)
        )

    def forward(self, x: Tensor) -> Tensor:  # (N, 3, 8, 8) -> (N, 5)
        return self.head(self.features(x))


class LayerNormMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.ln1 = nn.Linear(10, 16), nn.LayerNorm(16)
        self.fc2, self.ln2 = nn.Linear(16, 12, bias=False), nn.LayerNorm(12)
        self.out = nn.Linear(12, 3)

    def forward(self, x: Tensor) -> Tensor:  # (N, 10) -> (N, 3)
        h = torch.nn.functional.gelu(self.ln1(self.fc1(x)))
        return self.out(torch.relu(self.ln2(self.fc2(h))))


class ResidualMLP(nn.Module):
    def __init__(self, width: int = 16, hidden: int = 24, depth: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(10, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(width), nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width)
            )
            for _ in range(depth)
        )
        self.out = nn.Linear(width, 3)

    def forward(self, x: Tensor) -> Tensor:  # (N, 10) -> (N, 3)
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


# name -> (module factory, input shape, groups expected, a block's keys that write the stream)
FAMILY = {
    "resnet-bn": (lambda: ResNetModule(1, (4, 6, 8), 2, 10), (1, 8, 8), 9, "blocks.1.bn2."),
    "vgg-bn": (VGG, (3, 8, 8), 3, None),
    "mlp-layernorm": (LayerNormMLP, (10,), 2, None),
    "residual-mlp": (ResidualMLP, (10,), 3, "blocks.1.3."),
    "torchvision-resnet18": (
        lambda: torchvision.models.resnet18(num_classes=7),
        (3, 32, 32),
        12,  # a stream per stage, an inner group per block
        "layer1.1.bn2.",
    ),
}


def randomised(module: nn.Module, seed: int) -> nn.Module:
    """`module` with random normalisation weights and running statistics (not 1 and 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            norm = isinstance(m, nn.modules.batchnorm._BatchNorm | nn.LayerNorm)
            if norm and m.weight is not None:
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    return module


def float_state(module: nn.Module) -> WeightSpace:
    return WeightSpace({k: v for k, v in module.state_dict().items() if v.is_floating_point()})


def loaded(module: nn.Module, ws: WeightSpace) -> nn.Module:
    out = copy.deepcopy(module)
    out.load_state_dict(ws.named, strict=False)
    return out


def outputs(module: nn.Module, x: Tensor, train: bool) -> Tensor:
    module = copy.deepcopy(module).train(train)
    with torch.no_grad():
        return module(x)


def permute_some(
    ws: WeightSpace, spec: PermSpec, perm: dict, group: str, prefix: str
) -> WeightSpace:
    """`perm[group]` applied only to the group's axes whose key starts with `prefix` (written
    out here, independently of the library's `apply_permutation`)."""
    tensors = dict(ws.named)
    for key, axis, block, _ in spec.acting(group):
        if key.startswith(prefix):
            index = (perm[group][:, None] * block + torch.arange(block)).flatten()
            tensors[key] = tensors[key].index_select(axis, index)
    return WeightSpace(tensors)


@pytest.fixture(scope="module")
def family() -> dict:
    built = {}
    for name, (make, shape, groups, stream) in FAMILY.items():
        torch.manual_seed(0)
        module = randomised(make(), 1).eval()
        built[name] = (module, shape, groups, stream, trace(module, torch.zeros(2, *shape)))
    return built


@pytest.mark.parametrize("name", list(FAMILY))
def test_traced_groups_cover_every_hidden_unit_once(family, name):
    module, _, groups, _, traced = family[name]
    spec = traced.spec
    assert len(spec.groups) == groups
    axes = [(key, axis) for g in spec.groups for key, axis, _, _ in spec.acting(g)]
    assert len(axes) == len(set(axes))  # each axis in one group only
    spec.check(float_state(module))


@pytest.mark.parametrize("name", list(FAMILY))
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), train=st.booleans())
def test_a_traced_permutation_keeps_the_function(family, name, seed, train):
    module, shape, _, _, traced = family[name]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, *shape, generator=gen)
    perm = random_permutation(traced.spec, gen)
    permuted = loaded(module, apply_permutation(float_state(module), perm, traced.spec))
    before, after = outputs(module, x, train), outputs(permuted, x, train)
    torch.testing.assert_close(after, before, atol=2e-4, rtol=2e-4)
    moved = [
        k
        for k in sorted(traced.spec.keys())  # noqa: SIM118 (a PermSpec, not a dict)
        if not torch.equal(permuted.state_dict()[k], module.state_dict()[k])
    ]
    assert moved  # the weights did change


@pytest.mark.parametrize("name", [n for n, f in FAMILY.items() if f[3]])
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_a_block_permuted_without_its_stream_breaks_the_function(family, name, seed):
    module, shape, _, prefix, traced = family[name]
    gen = torch.Generator().manual_seed(seed)
    group = next(
        g
        for g in traced.spec.groups
        if any(k.startswith(prefix) for k, *_ in traced.spec.acting(g))
    )
    n = traced.spec.sizes[group]
    perm = {group: torch.roll(torch.arange(n), 1 + int(torch.randint(n - 1, (1,), generator=gen)))}
    wrong = loaded(module, permute_some(float_state(module), traced.spec, perm, group, prefix))
    x = torch.randn(6, *shape, generator=gen)
    for train in (False, True):
        assert not torch.allclose(outputs(wrong, x, train), outputs(module, x, train), atol=1e-3)


@pytest.mark.parametrize("name", ["vgg-bn", "mlp-layernorm"])
def test_a_layer_permuted_without_its_consumer_breaks_the_function(family, name):
    module, shape, _, _, traced = family[name]
    group = traced.spec.groups[0]
    producer = next(iter(traced.spec.acting(group)))[0].rsplit(".", 1)[0] + "."
    n = traced.spec.sizes[group]
    wrong = loaded(
        module,
        permute_some(
            float_state(module),
            traced.spec,
            {group: torch.roll(torch.arange(n), 1)},
            group,
            producer,
        ),
    )
    x = torch.randn(6, *shape)
    assert not torch.allclose(outputs(wrong, x, False), outputs(module, x, False), atol=1e-3)


def test_a_resnet_stream_is_one_group_with_every_block_writing_into_it():
    traced = trace(ResNetModule(1, (4, 6), 2, 10), torch.zeros(2, 1, 8, 8))
    stream = next(
        g for g in traced.spec.groups if ("stem.0.weight", 0, 1, 0) in traced.spec.acting(g)
    )
    keys = {k for k, *_ in traced.spec.acting(stream)}
    assert {"blocks.0.bn2.weight", "blocks.1.bn2.running_mean", "blocks.1.conv1.weight"} <= keys
    assert "blocks.2.shortcut.0.weight" in keys  # the next stage's shortcut reads the stream
    assert len(traced.taps[stream]) >= 3  # the stem's ReLU and each block's output ReLU


# --- today's chains ------------------------------------------------------------------------------


def shape_spec(arch: Chain) -> PermSpec:
    """The spec as it used to be built for a chain: layer i's outputs and layer i+1's inputs
    (in blocks of h*w after a flatten)."""
    shapes = arch.weight_shapes()
    members, sizes = {}, {}
    for i, (idx, nxt) in enumerate(zip(arch.param_indices, arch.param_indices[1:])):
        n = shapes[i][0]
        block = shapes[i + 1][1] // n
        members[f"h{i}"] = (
            Axis(f"{idx}.weight", 0, 1),
            Axis(f"{idx}.bias", 0, 1),
            Axis(f"{nxt}.weight", 1, block),
        )
        sizes[f"h{i}"] = n
    return PermSpec(members, sizes)


@pytest.mark.parametrize(
    "arch",
    [
        mlp_arch(64, [12, 10], 10, "relu"),
        mlp_arch(64, [32, 32, 32], 10, "tanh"),
        cnn_arch((1, 8, 8), [4, 6, 5], [1, 2, 2], 10, "relu"),
        cnn_arch((1, 8, 8), [8, 8], [2, 1], 10, "gelu"),
    ],
    ids=["mlp", "mlp-tanh", "cnn", "cnn-gelu"],
)
def test_traced_chain_spec_is_the_one_built_from_shapes(arch):
    assert arch.spec == shape_spec(arch)


@pytest.mark.parametrize(
    "arch",
    [mlp_arch(64, [12, 10], 10, "relu"), cnn_arch((1, 8, 8), [4, 6, 5], [1, 2, 2], 10, "relu")],
    ids=["mlp", "cnn"],
)
def test_functional_forward_agrees_with_the_chains_batched_path(arch):
    nets = stack([init_network(arch, s) for s in range(3)])
    x = torch.randn(5, *arch.input_shape)
    fast = arch.forward_batched(nets, x)  # (3, 5, 10): batched matmul / grouped convolution
    torch.testing.assert_close(functional_forward(arch, nets, x), fast, atol=1e-5, rtol=1e-5)
    per_net = torch.randn(3, 5, *arch.input_shape)
    torch.testing.assert_close(
        functional_forward(arch, nets, per_net),
        arch.forward_batched(nets, per_net),
        atol=1e-5,
        rtol=1e-5,
    )


def test_activations_are_keyed_by_group_with_every_tap_of_a_residual_group():
    module = randomised(ResNetModule(1, (4, 6), 1, 10), 0).eval()
    arch = ModuleArch(module, (1, 8, 8), "resnet")
    ws = float_state(module)
    acts = arch.activations(ws, torch.randn(5, 1, 8, 8))
    assert set(acts) == set(arch.spec.groups)
    for group, taps in acts.items():
        assert all(t.shape[:2] == (5, arch.spec.sizes[group]) for t in taps)
    assert max(len(t) for t in acts.values()) >= 2


# --- symmetries beyond permutations depend on the activation -----------------------------------


def rescaled(module: nn.Module, spec: PermSpec, scale: float) -> nn.Module:
    """Every hidden unit's incoming weights scaled by `scale`, outgoing by 1/`scale`."""
    state = dict(module.state_dict())
    for group in spec.groups:
        for key, axis, _, _ in spec.acting(group):
            state[key] = state[key] * (scale if axis == 0 else 1 / scale)
    out = copy.deepcopy(module)
    out.load_state_dict(state)
    return out


class Sine(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(30 * x)


@pytest.mark.parametrize(
    ("activation", "keeps"),
    [
        (nn.ReLU(), True),
        (nn.LeakyReLU(0.1), True),
        (nn.Tanh(), False),
        (nn.GELU(), False),
        (nn.SiLU(), False),
        (nn.Sigmoid(), False),
        (Sine(), False),
    ],
    ids=["relu", "leaky_relu", "tanh", "gelu", "silu", "sigmoid", "siren-sine"],
)
def test_rescaling_is_allowed_exactly_where_it_keeps_the_function(activation, keeps):
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Linear(4, 8), activation, nn.Linear(8, 8), copy.deepcopy(activation), nn.Linear(8, 2)
    )
    arch = ModuleArch(module, (4,), "net")
    x = torch.randn(16, 4)
    with torch.no_grad():
        same = torch.allclose(rescaled(module, arch.spec, 3.0)(x), module(x), atol=1e-5)
    assert same is keeps and arch.traced.rescalable is keeps
    if not keeps:
        with pytest.raises(DeepAlignError, match="augment.rescale"):
            check_rescalable(arch)


def test_batchnorm_undoes_a_rescaling_so_it_is_refused():
    arch = resnet_arch((1, 8, 8), [4, 6], 1, 10)
    assert arch.traced.activations == {"relu"} and not arch.traced.rescalable
    with pytest.raises(DeepAlignError, match="normalisation"):
        check_rescalable(arch)


# --- what cannot be permuted safely stops with one line naming it -------------------------------


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj, self.attn = nn.Linear(8, 8), nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.attn(self.proj(x), x, x)[0]


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.cat([self.a(x), self.b(x)], dim=1)
        p, q = torch.split(h, [2, 4], dim=1)  # cuts a's three units apart
        return self.out(torch.cat([q, p], dim=1))


def GroupedTwice() -> nn.Sequential:  # noqa: N802 (a module, named like one)
    """A grouped convolution reading another one's output (groups inside groups)."""
    return nn.Sequential(
        nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 8, 3, groups=4)
    )


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) if x.sum() > 0 else x


@pytest.mark.parametrize(
    ("module", "shape", "named"),
    [
        (Attention(), (8,), "module 'attn' (MultiheadAttention)"),  # one sequence of N tokens
        (Concat(), (4,), "torch.split in the top-level module (Concat)"),
        (GroupedTwice(), (4, 6, 6), "module '2' (Conv2d)"),
        (Branchy(), (4,), "Branchy"),
        (nn.Sequential(nn.Linear(4, 4), nn.Bilinear(4, 4, 2)), (4,), "module '1' (Bilinear)"),
    ],
    ids=[
        "attention",
        "split-cutting-a-group",
        "grouped-conv-twice",
        "control-flow",
        "unknown-module",
    ],
)
def test_unsafe_graphs_stop_with_one_line_naming_the_module(module, shape, named):
    with pytest.raises(DeepAlignError) as info:
        trace(module, torch.zeros(2, *shape))
    assert named in str(info.value) and "\n" not in str(info.value)


def test_tracing_a_spec_leaves_the_global_random_state_alone():
    """A seeded run must draw the same numbers whether or not a spec was traced first."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    arch = mlp_arch(64, [20, 18], 10, "relu")  # a new record: traced on first use here
    assert arch.spec.sizes == {"h0": 20, "h1": 18}
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)
    torch.manual_seed(0)
    arch.build()  # twin: building a module does draw from it
    assert not torch.equal(torch.rand(3), expected)
