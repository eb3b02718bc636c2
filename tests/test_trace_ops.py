"""The tracer is never silently wrong: every binary operation of two labelled tensors merges
their groups (a spec permutation keeps the function; one branch permuted alone breaks it);
every way of flattening an example reads alike and reshapes of unpermuted tensors are followed;
tied weights are permuted alike under both keys; what cannot be read stops in one line naming
the operation and its module, never inside torch."""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from deepalign.core.permspec import PermSpec, apply_permutation, random_permutation
from deepalign.core.trace import Traced, python_name, trace
from deepalign.core.weightspace import WeightSpace
from deepalign.errors import DeepAlignError

# op(a, b) of two (N, 6) branches; b lies in (0.5, 1.5) (a base for powers, a divisor), a mostly
# in (-2, 2)
BINARY = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
    "//": operator.floordiv,
    "%": operator.mod,
    "**": lambda a, b: b**a,
    "+=": operator.iadd,
    "/=": operator.itruediv,
    "<": lambda a, b: (a < b).type_as(a),
    "<=": lambda a, b: (a <= b).type_as(a),
    ">": lambda a, b: (a > b).type_as(a),
    ">=": lambda a, b: (a >= b).type_as(a),
    "==": lambda a, b: ((2 * a).floor() == (2 * b).floor()).type_as(a),
    "!=": lambda a, b: ((2 * a).floor() != (2 * b).floor()).type_as(a),
    "torch.add": torch.add,
    "torch.sub": torch.sub,
    "torch.mul": torch.mul,
    "torch.div": torch.div,
    "torch.true_divide": torch.true_divide,
    "torch.floor_divide": torch.floor_divide,
    "torch.remainder": torch.remainder,
    "torch.fmod": torch.fmod,
    "torch.pow": lambda a, b: torch.pow(b, a),
    "torch.maximum": torch.maximum,
    "torch.minimum": torch.minimum,
    "torch.fmax": torch.fmax,
    "torch.atan2": torch.atan2,
    "torch.hypot": torch.hypot,
    "torch.where": lambda a, b: torch.where(a > b, a, b),
    "torch.where-mask": lambda a, b: torch.where(b > 1, a, -a),
    "torch.clamp": lambda a, b: torch.clamp(a, min=-b, max=b),
    "torch.lerp": lambda a, b: torch.lerp(a, b, 0.3),
    "torch.addcmul": lambda a, b: torch.addcmul(a, a, b),
    "torch.logaddexp": torch.logaddexp,
    "Tensor.add": lambda a, b: a.add(b),
    "Tensor.div": lambda a, b: a.div(b),
    "Tensor.mul_": lambda a, b: a.mul_(b),
    "Tensor.add_": lambda a, b: a.add_(b),
    "Tensor.div_": lambda a, b: a.div_(b),
    "Tensor.maximum": lambda a, b: a.maximum(b),
    "Tensor.where": lambda a, b: a.where(a > b, b),
    "Tensor.lt": lambda a, b: a.lt(b).type_as(a),
}


class Branches(nn.Module):
    def __init__(self, op) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 3)
        self.op = op

    def forward(self, x: Tensor) -> Tensor:  # (N, 4) -> (N, 3)
        return self.head(self.op(3 * self.a(x), torch.sigmoid(self.b(x)) + 0.5))


def float_state(module: nn.Module) -> WeightSpace:
    return WeightSpace({k: v for k, v in module.state_dict().items() if v.is_floating_point()})


def loaded(module: nn.Module, tensors: dict[str, Tensor]) -> nn.Module:
    out = copy.deepcopy(module)
    out.load_state_dict(tensors, strict=False)
    return out


def run(module: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return copy.deepcopy(module).eval()(x)


def permuted(module: nn.Module, spec: PermSpec, perm: dict) -> nn.Module:
    return loaded(module, dict(apply_permutation(float_state(module), perm, spec).named))


def permute_keys(module: nn.Module, spec: PermSpec, perm: dict, keys: set[str]) -> nn.Module:
    """`perm` applied only to the axes of `keys` (written out here, not by the library)."""
    tensors = dict(module.state_dict())
    for group in spec.groups:
        for key, axis, block, _ in spec.acting(group):
            if key in keys:
                index = (perm[group][:, None] * block + torch.arange(block)).flatten()
                tensors[key] = tensors[key].index_select(axis, index)
    return loaded(module, tensors)


def shifted(spec: PermSpec) -> dict[str, Tensor]:
    """A permutation that moves every unit (no group left as it was)."""
    return {g: torch.roll(torch.arange(n), 1) for g, n in spec.sizes.items()}


def refusal(module: nn.Module, shape: tuple[int, ...]) -> str:
    """The one-line message tracing `module` stops with."""
    with pytest.raises(DeepAlignError) as info:
        trace(module, torch.zeros(2, *shape))
    message = str(info.value)
    assert "\n" not in message and " at 0x" not in message
    return message


_TRACED: dict[str, tuple[nn.Module, Traced]] = {}


def branches(name: str) -> tuple[nn.Module, Traced]:
    """The two-branch network of one binary operation (float64), traced once."""
    if name not in _TRACED:
        torch.manual_seed(0)
        module = Branches(BINARY[name]).double()
        _TRACED[name] = (module, trace(module, torch.zeros(2, 4, dtype=torch.float64)))
    return _TRACED[name]


# --- binary operations ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BINARY))
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_a_binary_operation_merges_its_operands_groups(name, seed):
    module, traced = branches(name)
    spec = traced.spec
    assert spec.groups == ("h0",)  # a, b and the head's inputs: one group
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    perm = random_permutation(spec, gen)
    torch.testing.assert_close(run(permuted(module, spec, perm), x), run(module, x))
    # twin: branch a's units permuted (with the head's inputs) but not branch b's, on fixed
    # inputs of a wide spread (a comparison of few, small inputs can come out all equal)
    alone = permute_keys(module, spec, shifted(spec), {"a.weight", "a.bias", "head.weight"})
    wide = 3 * torch.randn(64, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert not torch.allclose(run(alone, wide), run(module, wide), atol=1e-6)


class Divided(nn.Module):
    """The issue's case: a(x) / sigmoid(b(x)), read as two groups before."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:  # (N, 4) -> (N, 3)
        return self.head(self.a(x) / torch.sigmoid(self.b(x)))


def test_division_twin():
    torch.manual_seed(0)
    module = Divided()
    spec = trace(module, torch.zeros(2, 4)).spec
    assert spec.groups == ("h0",)
    x = torch.randn(16, 4)
    perm = shifted(spec)
    torch.testing.assert_close(run(permuted(module, spec, perm), x), run(module, x))
    alone = permute_keys(module, spec, perm, {"a.weight", "a.bias", "head.weight"})
    assert not torch.allclose(run(alone, x), run(module, x), atol=1e-3)


class Scaled(nn.Module):
    """A tensor scaled by a Python number and by a per-example scalar (N, 1) keeps its group."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.s, self.head = nn.Linear(4, 6), nn.Linear(4, 1), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:  # (N, 4) -> (N, 3)
        h = self.a(x) / 3.0
        return self.head(h / torch.sigmoid(self.s(x)) + h.norm(dim=1, keepdim=True))


def test_a_scalar_per_example_keeps_the_label_and_joins_no_group():
    torch.manual_seed(0)
    module = Scaled()
    spec = trace(module, torch.zeros(2, 4)).spec
    keys = {g: {k for k, *_ in spec.acting(g)} for g in spec.groups}
    assert {"a.weight", "a.bias", "head.weight"} in keys.values()
    assert spec.sizes == {"h0": 6, "h1": 1}  # s's one unit is a group of its own
    x = torch.randn(16, 4)
    torch.testing.assert_close(run(permuted(module, spec, shifted(spec)), x), run(module, x))
    alone = permute_keys(module, spec, shifted(spec), {"a.weight", "a.bias"})  # head left out
    assert not torch.allclose(run(alone, x), run(module, x), atol=1e-3)


class Mixed(nn.Module):
    """Two tensors whose channels line up with different units: (N, 4) broadcast onto the
    last axis of (N, 4, 2, 4), or a flatten's blocks (one unit of 8) against 8 features."""

    def __init__(self, broadcast: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4 if broadcast else 1, 3, padding=1)
        self.fc, self.broadcast = nn.Linear(8, 4 if broadcast else 8), broadcast

    def forward(self, x: Tensor) -> Tensor:  # (N, 1, 2, 4)
        h = self.conv(x)  # (N, 4, 2, 4), or (N, 1, 2, 4)
        return (h if self.broadcast else h.flatten(1)) + self.fc(x.flatten(1))


def test_operands_with_misaligned_permuted_axes_are_refused():
    message = refusal(Mixed(broadcast=True), (1, 2, 4))
    assert message.startswith("operator.add in the top-level module (Mixed)")
    assert "broadcasts a permuted axis" in message
    assert "units of [1, 8] entries" in refusal(Mixed(broadcast=False), (1, 2, 4))


# --- reshapes -----------------------------------------------------------------------------------


class Flattened(nn.Module):
    """The input (N, 64) viewed as images, a conv, then one way of flattening each example."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.conv, self.flat, self.head = (
            nn.Conv2d(1, 3, 3, padding=1),
            nn.Flatten(),
            nn.Linear(192, 5),
        )
        self.how = how

    def forward(self, x: Tensor) -> Tensor:  # (N, 64) -> (N, 5)
        h = torch.relu(self.conv(x.view(-1, 1, 8, 8)))  # (N, 3, 8, 8)
        if self.how == "view":
            h = h.view(h.size(0), -1)
        elif self.how == "reshape-len":
            h = h.reshape(len(h), -1)
        elif self.how == "torch.flatten":
            h = torch.flatten(h, 1)
        elif self.how == "method":
            h = h.flatten(1)
        elif self.how == "shape":
            h = h.view(h.shape[0], 3, 64).unsqueeze(-1).transpose(2, 3).squeeze(2).flatten(1)
        else:
            h = self.flat(h)
        return self.head(h)


HOWS = ["view", "reshape-len", "torch.flatten", "method", "shape", "nn.Flatten"]


def test_every_flatten_of_an_example_gives_the_same_spec():
    specs = [trace(Flattened(how), torch.zeros(2, 64)).spec for how in HOWS]
    assert all(spec == specs[0] for spec in specs)
    assert list(specs[0].acting("h0"))[-1] == ("head.weight", 1, 64, 0)
    assert "len" not in Flattened.forward.__globals__  # the tracer's `len` is put back


@pytest.mark.parametrize("how", HOWS)
def test_a_network_that_reshapes_its_input_keeps_its_function(how):
    torch.manual_seed(0)
    module = Flattened(how)
    spec = trace(module, torch.zeros(2, 64)).spec
    x = torch.randn(8, 64)
    torch.testing.assert_close(run(permuted(module, spec, shifted(spec)), x), run(module, x))
    alone = permute_keys(module, spec, shifted(spec), {"conv.weight", "conv.bias"})
    assert not torch.allclose(run(alone, x), run(module, x), atol=1e-3)


class Reshaped(nn.Module):
    def __init__(self, op) -> None:
        super().__init__()
        self.conv, self.op = nn.Conv2d(1, 4, 3, padding=1), op

    def forward(self, x: Tensor) -> Tensor:  # (N, 1, 4, 4)
        return self.op(self.conv(x))


@pytest.mark.parametrize(
    ("op", "named"),
    [
        (lambda h: h.view(-1, 4), "Tensor.view"),
        (lambda h: h.permute(1, 0, 2, 3), "Tensor.permute"),
        (lambda h: h.transpose(0, 1), "Tensor.transpose"),
        (lambda h: torch.flatten(h), "torch.flatten"),
        (lambda h: h.unsqueeze(1), "Tensor.unsqueeze"),
        (lambda h: h.mean(0), "Tensor.mean"),
        (lambda h: torch.cumsum(h, 1), "torch.cumsum"),
        (lambda h: F.pad(h, (0, 0, 0, 0, 1, 1)), "torch.nn.functional.pad"),
    ],
    ids=["view", "permute", "transpose", "flatten-all", "unsqueeze", "mean-batch", "cumsum", "pad"],
)
def test_moving_the_permuted_axis_is_refused_naming_the_operation(op, named):
    message = refusal(Reshaped(op), (1, 4, 4))
    assert message.startswith(f"{named} in the top-level module (Reshaped)")


class Gated(nn.Module):
    """Channels gated by a map made of channel statistics (no permuted axis) through
    operations the tracer does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # (N, 1, 4, 4) -> (N, 2, 4, 4)
        h = torch.relu(self.c1(x))
        s = torch.cat([h.mean(1, keepdim=True), h.amax(1, keepdim=True)], 1)  # (N, 2, 4, 4)
        gate = torch.sigmoid(F.pad(s, (1, 1)).cumsum(1)[:, :1, :, 1:-1])  # (N, 1, 4, 4)
        return self.c2(h * gate)


def test_operations_of_unpermuted_tensors_are_followed():
    torch.manual_seed(0)
    module = Gated()
    spec = trace(module, torch.zeros(2, 1, 4, 4)).spec
    assert spec.sizes == {"h0": 4}
    x = torch.randn(6, 1, 4, 4)
    torch.testing.assert_close(run(permuted(module, spec, shifted(spec)), x), run(module, x))
    alone = permute_keys(module, spec, shifted(spec), {"c1.weight", "c1.bias"})
    assert not torch.allclose(run(alone, x), run(module, x), atol=1e-3)


# --- naming what is refused ----------------------------------------------------------------------


def test_python_names_of_torch_builtins():
    assert python_name(torch.cat) == "torch.cat"
    assert python_name(F.interpolate) == "torch.nn.functional.interpolate"
    assert python_name(F.gelu) == "torch.nn.functional.gelu"  # torch._C._nn
    assert python_name(F.max_pool2d) == "torch.nn.functional.max_pool2d"  # boolean_dispatch
    assert python_name(operator.truediv) == "operator.truediv"
    assert python_name(torch.Tensor.add) == "Tensor.add"
    assert python_name(len) == "len"


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([self.a(x), self.b(x)], dim=1).flatten(1)


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block()])
        self.out = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:  # (N, 4) -> (N, 2)
        return self.out(self.blocks[0](x))


def test_a_refusal_names_the_function_and_the_module_it_sits_in():
    message = refusal(Stack(), (4,))
    assert message.startswith("torch.stack in module 'blocks.0' (Block) cannot be permuted safely")


# --- modules the tracer cannot read --------------------------------------------------------------


class Recurrent(nn.Module):
    def __init__(self, cell: type) -> None:
        super().__init__()
        self.rnn, self.head = cell(4, 5, batch_first=True), nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:  # (N, T, 4) -> (N, 2)
        return self.head(self.rnn(x)[0][:, -1])


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:  # (N, T, 8)
        return self.attn(x, x, x)[0].mean(1)


def conv(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), *layers)


META = nn.Sequential(nn.Linear(4, 3, device="meta"), nn.ReLU(), nn.Linear(3, 2, device="meta"))
MODULES = {
    "grouped-conv-twice": (
        conv(nn.Conv2d(4, 8, 3, groups=2), nn.Conv2d(8, 8, 3, groups=4)),
        (1, 6, 6),
        "module '2' (Conv2d)",
    ),
    "lstm": (Recurrent(nn.LSTM), (3, 4), "module 'rnn' (LSTM)"),
    "gru": (Recurrent(nn.GRU), (3, 4), "module 'rnn' (GRU)"),
    "rnn": (Recurrent(nn.RNN), (3, 4), "module 'rnn' (RNN)"),
    "transposed-conv": (conv(nn.ConvTranspose2d(4, 2, 3)), (1, 6, 6), "(ConvTranspose2d)"),
    "groupnorm": (conv(nn.GroupNorm(2, 4)), (1, 6, 6), "module '1' (GroupNorm)"),
    "layernorm-width": (conv(nn.LayerNorm(6)), (1, 6, 6), "module '1' (LayerNorm)"),
    "attention": (Attention(), (3, 8), "module 'attn' (MultiheadAttention)"),
    "bare-gru": (nn.GRU(4, 5), (3, 4), "GRU is a single torch.nn layer"),
    "meta-device": (META, (4,), "'0.weight' is on the meta device"),
    "wrong-input": (conv(), (5,), "does not run on an input of shape (2, 5) (module '0' (Conv2d)"),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_a_module_the_tracer_cannot_read_is_refused_in_one_line(name):
    module, shape, named = MODULES[name]
    assert named in refusal(module, shape)


class Upsampled(nn.Module):
    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1)
        self.up, self.functional = nn.Upsample(scale_factor=2, mode="bilinear"), functional
        self.head = nn.Linear(3 * 8 * 8, 2)

    def forward(self, x: Tensor) -> Tensor:  # (N, 1, 4, 4) -> (N, 2)
        h = torch.relu(self.c1(x))
        h = F.interpolate(h, scale_factor=2.0) if self.functional else self.up(h)
        return self.head(torch.relu(self.c2(h)).flatten(1))


@pytest.mark.parametrize("functional", [False, True], ids=["nn.Upsample", "F.interpolate"])
def test_upsampling_acts_per_channel_so_it_passes_the_label(functional):
    torch.manual_seed(0)
    module = Upsampled(functional)
    spec = trace(module, torch.zeros(2, 1, 4, 4)).spec
    assert spec.sizes == {"h0": 4, "h1": 3}
    x = torch.randn(6, 1, 4, 4)
    torch.testing.assert_close(run(permuted(module, spec, shifted(spec)), x), run(module, x))
    alone = permute_keys(module, spec, shifted(spec), {"c1.weight", "c1.bias"})
    assert not torch.allclose(run(alone, x), run(module, x), atol=1e-3)


# --- tied weights -------------------------------------------------------------------------------


class Tied(nn.Module):
    """Two hidden layers of one weight: a shared Parameter, or one module under two names."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.inp, self.a, self.b, self.out = (nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 6),
                                              nn.Linear(6, 3))  # fmt: skip
        if how == "parameter":
            self.b.weight = self.a.weight
        elif how == "module":
            self.b = self.a

    def forward(self, x: Tensor) -> Tensor:  # (N, 4) -> (N, 3)
        h = torch.relu(self.a(torch.relu(self.inp(x))))
        return self.out(torch.relu(self.b(h)))


@pytest.mark.parametrize("how", ["parameter", "module"])
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_tied_weights_are_permuted_alike_under_both_keys(how, seed):
    torch.manual_seed(0)
    module = Tied(how)
    spec = trace(module, torch.zeros(2, 4)).spec
    axes = {(k, axis): g for g in spec.groups for k, axis, *_ in spec.acting(g)}
    assert axes[("a.weight", 0)] == axes[("b.weight", 0)] == axes[("b.weight", 1)]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 4, generator=gen)
    perm = random_permutation(spec, gen)
    moved = apply_permutation(float_state(module), perm, spec).named
    assert torch.equal(moved["a.weight"], moved["b.weight"])
    torch.testing.assert_close(run(loaded(module, dict(moved)), x), run(module, x))
    # twin: the two keys permuted independently (the one tensor gets the later one's order)
    other = shifted(spec)
    b_keys = {k for k in spec.keys() if k.startswith("b.")}  # noqa: SIM118 (a PermSpec)
    first = dict(permute_keys(module, spec, other, spec.keys() - b_keys).state_dict())
    second = permute_keys(module, spec, {g: p.flip(0) for g, p in other.items()}, b_keys)
    first.update({k: second.state_dict()[k] for k in b_keys})
    assert not torch.allclose(run(loaded(module, first), x), run(module, x), atol=1e-3)


class BadTie(nn.Module):
    """One weight read after a flatten (units of 4 features) and on plain features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.pre = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(3, 16)
        self.a, self.b = nn.Linear(16, 8), nn.Linear(16, 8)
        self.b.weight = self.a.weight

    def forward(self, x: Tensor) -> Tensor:  # (N, 1, 2, 2) -> (N, 8)
        h = self.a(torch.relu(self.conv(x)).flatten(1))
        return h + self.b(torch.relu(self.pre(x.flatten(1)[:, :3])))


def test_tied_weights_read_in_two_layouts_are_refused_naming_both_keys():
    message = refusal(BadTie(), (1, 2, 2))
    assert "'a.weight'" in message and "'b.weight'" in message
