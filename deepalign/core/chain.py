"""Chains: an `nn.Sequential` of Linear / Conv2d layers, activations, pooling and Flatten.

The zoo's MLPs and CNNs. A `Chain` is a record (its modules in order and one input's shape),
so a checkpoint says what it is; its spec is traced like any module's, and equals the one
layer-by-layer construction would give (a hidden group per layer, the Linear after Flatten
seeing each channel as a block of h*w features). A chain also has a fast batched forward of
its own: batched matmuls with the bias fused in, one grouped convolution per conv layer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepalign.core.arch import Arch, built, record_kind
from deepalign.core.trace import Traced, trace
from deepalign.core.weightspace import WeightSpace
from deepalign.errors import DeepAlignError, shown

# SIREN's frequency (Sitzmann et al. 2020): a `sine` unit computes sin(OMEGA_0 z)
OMEGA_0 = 30.0


class Sine(nn.Module):
    """SIREN's activation, sin(OMEGA_0 z): odd, not positively homogeneous."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(OMEGA_0 * x)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
    "leaky_relu": F.leaky_relu,
    "silu": F.silu,
    "sine": lambda z: torch.sin(OMEGA_0 * z),
}
_MODULE_ACTIVATIONS = {
    nn.ReLU: "relu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.GELU: "gelu",
    nn.LeakyReLU: "leaky_relu",
    nn.SiLU: "silu",
    Sine: "sine",
}
PARAM_KINDS = ("linear", "conv")
MODULE_KINDS = (*PARAM_KINDS, "flatten", "maxpool", "avgpool", *ACTIVATIONS)


@dataclass(frozen=True)
class Module:
    """One module of the Sequential; sizes are used by parameter layers and pooling only."""

    kind: str  # linear | conv | flatten | maxpool | avgpool | one of ACTIVATIONS
    in_dim: int = 0
    out_dim: int = 0
    kernel: int = 0
    stride: int = 1  # 0: unknown (a conv read from a bare state_dict)
    padding: int = 0
    bias: bool = True  # a Linear or Conv2d with a bias


@record_kind("chain")
@dataclass(frozen=True, eq=True)
class Chain(Arch):
    """A feed-forward net: its modules in order and the shape of one input example."""

    modules: tuple[Module, ...]
    input_shape: tuple[int, ...]  # (features,) for MLPs, (C, H, W) for CNNs

    def to_dict(self) -> dict:
        return {"modules": [asdict(m) for m in self.modules], "input_shape": list(self.input_shape)}

    @classmethod
    def from_dict(cls, d: Any) -> Chain:
        """The architecture a record describes, checked by type, range and consistency."""
        if not isinstance(d, dict) or not isinstance(d.get("modules"), list):
            raise DeepAlignError(f"malformed architecture record: {shown(d)}")
        shape = d.get("input_shape")
        if (
            not isinstance(shape, list)
            or len(shape) not in (1, 3)
            or not all(_is_size(v, 0) for v in shape)
        ):
            raise DeepAlignError(
                f"architecture record: input_shape {shown(shape)} is not "
                "[features] or [channels, height, width]"
            )
        modules = tuple(_module_record(i, m) for i, m in enumerate(d["modules"]))
        return check_chain(cls(modules=modules, input_shape=tuple(shape)))

    @property
    def strides_known(self) -> bool:
        return all(m.stride > 0 for m in self.modules if m.kind == "conv")

    @property
    def param_indices(self) -> tuple[int, ...]:
        """Positions in the Sequential of the layers that hold parameters."""
        return tuple(i for i, m in enumerate(self.modules) if m.kind in PARAM_KINDS)

    def weight_shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(_weight_shape(self.modules[i]) for i in self.param_indices)

    def describe(self) -> str:
        """One line, e.g. 'linear(64->32) relu linear(32->10)'."""
        return " ".join(_describe(m) for m in self.modules)

    def build(self) -> nn.Sequential:
        """A freshly initialised `nn.Sequential` of this architecture (a sine chain with
        SIREN's initialisation)."""
        model = nn.Sequential(*(_build_module(m) for m in self.modules))
        if any(m.kind == "sine" for m in self.modules):
            siren_init(model)
        return model

    # --- tensors: weights first, then biases, each in layer order ------------------------------

    def keys(self) -> tuple[str, ...]:
        weights = [f"{i}.weight" for i in self.param_indices]
        biases = [f"{i}.bias" for i in self.param_indices if self.modules[i].bias]
        return (*weights, *biases)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(zip(self.keys(), _key_shapes(self), strict=True))

    def buffers(self) -> frozenset[str]:
        return frozenset()

    def integer_keys(self) -> tuple[str, ...]:
        return ()

    def weights(self, ws: WeightSpace) -> tuple[Tensor, ...]:
        """Layer i's weight, (out, in) or (out, in, k, k) (batched: leading B)."""
        return tuple(ws.named[f"{i}.weight"] for i in self.param_indices)

    def biases(self, ws: WeightSpace) -> tuple[Tensor | None, ...]:
        """Layer i's bias (out,), or None for a layer without one."""
        return tuple(ws.named.get(f"{i}.bias") for i in self.param_indices)

    def weightspace(self, state: dict[str, Tensor]) -> WeightSpace:
        """The parameters of an `nn.Sequential` state_dict (keys '0.weight', '0.bias', ...)."""
        expected = set(self.keys())
        unknown = sorted(set(state) - expected)
        if unknown:
            raise DeepAlignError(
                f"unexpected state_dict key '{unknown[0]}' (not a plain Linear/Conv2d chain)"
            )
        for key, want in self.shapes().items():
            if key not in state:
                raise DeepAlignError(f"state_dict lacks '{key}'")
            if tuple(state[key].shape) != want:
                raise DeepAlignError(
                    f"'{key}' has shape {tuple(state[key].shape)}, expected {want}"
                )
        return WeightSpace({k: state[k] for k in self.keys()})

    def state_dict(self, ws: WeightSpace, extras: dict | None = None) -> dict[str, Tensor]:
        """The inverse of `weightspace` (unbatched), in the Sequential's key order."""
        state = {}
        for i in self.param_indices:
            for name in ("weight", "bias"):
                if f"{i}.{name}" in ws.named:
                    state[f"{i}.{name}"] = ws.named[f"{i}.{name}"]
        return state

    # --- graph ------------------------------------------------------------------------------------

    @property
    def traced(self) -> Traced:
        return _traced_chain(self)

    @property
    def has_batchnorm(self) -> bool:
        return False

    @property
    def n_outputs(self) -> int:
        return _weight_shape(self.modules[self.param_indices[-1]])[0]

    def widest(self) -> int:
        return widest(self)

    def canonical(self, ws: WeightSpace) -> WeightSpace:
        """Batched networks with every sine unit in canonical form (`sine_canonical`)."""
        return sine_canonical(self, ws)

    def first_difference(self, other: Chain) -> str | None:
        """Where two chains differ (an unknown stride matches any), or None."""
        return _first_difference(self, other)

    # --- running ----------------------------------------------------------------------------

    def forward_batched(self, ws: WeightSpace, x: Tensor, train: bool = False) -> Tensor:
        return forward_batched(self, ws, x)

    def activations(self, ws: WeightSpace, x: Tensor) -> dict[str, list[Tensor]]:
        taps: list[Tensor] = []
        forward(self, ws, x, taps)
        return {g: [t] for g, t in zip(self.spec.groups, taps, strict=True)}

    def preactivations(self, ws: WeightSpace, x: Tensor) -> dict[str, Tensor]:
        """Each hidden layer's output before its nonlinearity, by group: (N, n, ...)."""
        outs: list[Tensor] = []
        forward(self, ws, x, preactivations=outs)
        return dict(zip(self.spec.groups, outs))


@functools.lru_cache(maxsize=64)
def _traced_chain(arch: Chain) -> Traced:
    """The chain's graph traced; with strides unknown (a bare state_dict), a stand-in of
    stride 1 on a (C, block, 1) input has the same channels, flatten block and keys."""
    if arch.strides_known and all(arch.input_shape):
        return trace(built(arch), arch.example())
    stand_in = _stand_in(arch)
    return trace(built(stand_in), stand_in.example())


def _stand_in(arch: Chain) -> Chain:
    modules = tuple(replace(m, stride=1) if m.kind == "conv" else m for m in arch.modules)
    if len(arch.input_shape) == 1:
        return replace(arch, modules=modules)
    convs = [m for m in modules if m.kind == "conv"]
    linear = next((m for m in modules if m.kind == "linear"), None)
    block = linear.in_dim // convs[-1].out_dim if linear and convs else 1
    return replace(arch, modules=modules, input_shape=(arch.input_shape[0], block, 1))


def _key_shapes(arch: Chain) -> list[tuple[int, ...]]:
    """The shape of each key of `arch.keys()`."""
    weights = [_weight_shape(arch.modules[i]) for i in arch.param_indices]
    biases = [(s[0],) for i, s in zip(arch.param_indices, weights) if arch.modules[i].bias]
    return [*weights, *biases]


MAX_SIZE = 10_000_000  # units, channels, features, kernel, stride or padding of one module


def _is_size(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= MAX_SIZE


def _module_record(index: int, record: Any) -> Module:
    """One module of an architecture record: known kind, integer sizes in range."""
    fields = {f.name for f in dataclasses.fields(Module)}
    if not isinstance(record, dict) or not set(record) <= fields or "kind" not in record:
        raise DeepAlignError(f"architecture record: module {index} is malformed: {shown(record)}")
    if record["kind"] not in MODULE_KINDS:
        raise DeepAlignError(
            f"architecture record: module {index} has unknown kind {shown(record['kind'])} "
            f"(known: {', '.join(MODULE_KINDS)})"
        )
    if not isinstance(record.get("bias", True), bool):
        raise DeepAlignError(
            f"architecture record: module {index} has bias {shown(record['bias'])}; "
            "true or false expected"
        )
    for key, value in record.items():
        low = 1 if key == "kernel" and record["kind"] == "conv" else 0
        if key not in ("kind", "bias") and not _is_size(value, low):
            raise DeepAlignError(
                f"architecture record: module {index} ({record['kind']}) has {key} "
                f"{shown(value)}; an integer in [{low}, {MAX_SIZE:,}] expected"
            )
    return Module(**record)


def check_chain(arch: Chain) -> Chain:
    """`arch` if each module takes what the one before gives (channels, features, spatial
    size), else an error naming the first module that does not."""
    shape = arch.input_shape  # (features,) or (C, H, W); H = W = 0: not known yet
    for i, m in enumerate(arch.modules):
        shape = _next_shape(i, m, shape)
    return arch


def _next_shape(i: int, m: Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape after module i, or an error saying why module i cannot take `shape`."""
    where = f"architecture record: module {i} ({_describe(m)})"
    if m.kind in ("conv", "maxpool", "avgpool") and len(shape) != 3:
        raise DeepAlignError(f"{where} needs images, but gets {shape[0]} features")
    if m.kind in PARAM_KINDS and (m.in_dim < 1 or m.out_dim < 1):
        raise DeepAlignError(f"{where} has no units")
    if m.kind == "linear":
        if len(shape) != 1:
            raise DeepAlignError(f"{where} gets images; a flatten must come before it")
        if shape[0] and shape[0] != m.in_dim:
            raise DeepAlignError(f"{where} takes {m.in_dim} features, but gets {shape[0]}")
        return (m.out_dim,)
    if m.kind == "conv":
        if shape[0] != m.in_dim:
            raise DeepAlignError(f"{where} takes {m.in_dim} channels, but gets {shape[0]}")
        if m.stride == 0:  # unknown (a bare state_dict): the sizes after it are unknown
            return (m.out_dim, 0, 0)
        sides = [conv_side(d, m.kernel, m.stride, m.padding) if d else 0 for d in shape[1:]]
        return _spatial(where, (m.out_dim, *sides), shape)
    if m.kind in ("maxpool", "avgpool"):
        if m.kernel < 1:
            raise DeepAlignError(f"{where} has kernel {m.kernel}; at least 1 expected")
        return _spatial(where, (shape[0], *(d // m.kernel for d in shape[1:])), shape)
    if m.kind == "flatten":
        return (math.prod(shape),) if len(shape) == 3 else shape
    return shape


def _spatial(where: str, after: tuple[int, ...], before: tuple[int, ...]) -> tuple[int, ...]:
    """An image shape after a conv or a pooling, if some pixels are left of a known size."""
    if any(b > 0 and a < 1 for a, b in zip(after[1:], before[1:])):
        raise DeepAlignError(f"{where} leaves no pixels of a {before[1]} x {before[2]} image")
    return after


def _weight_shape(m: Module) -> tuple[int, ...]:
    if m.kind == "linear":
        return (m.out_dim, m.in_dim)
    return (m.out_dim, m.in_dim, m.kernel, m.kernel)


def _describe(m: Module) -> str:
    if m.kind == "linear":
        return f"linear({m.in_dim}->{m.out_dim})"
    if m.kind == "conv":
        stride = m.stride or "?"
        return f"conv({m.in_dim}->{m.out_dim}, k{m.kernel} s{stride} p{m.padding})"
    if m.kind in ("maxpool", "avgpool"):
        return f"{m.kind}({m.kernel})"
    return m.kind


def _build_module(m: Module) -> nn.Module:
    if m.kind == "linear":
        return nn.Linear(m.in_dim, m.out_dim, bias=m.bias)
    if m.kind == "conv":
        return nn.Conv2d(
            m.in_dim, m.out_dim, m.kernel, stride=m.stride, padding=m.padding, bias=m.bias
        )
    if m.kind == "flatten":
        return nn.Flatten()
    if m.kind == "maxpool":
        return nn.MaxPool2d(m.kernel)
    if m.kind == "avgpool":
        return nn.AvgPool2d(m.kernel)
    cls = {v: k for k, v in _MODULE_ACTIVATIONS.items()}.get(m.kind)
    if cls is None:
        raise DeepAlignError(f"unknown module kind '{m.kind}'")
    return cls()


@torch.no_grad()
def sine_canonical(arch: Chain, ws: WeightSpace) -> WeightSpace:
    """Batched networks, each sine unit's phase OMEGA_0 * bias wrapped into [-pi, pi) and its
    sign then flipped so that the phase lies in [0, pi]: the same functions, since sin has
    period 2 pi (a bias shift of 2 pi / OMEGA_0) and is odd (negate a unit's incoming weights,
    bias and outgoing weights). Two fits of a signal differ by these symmetries as well as by
    permutations; interpolating before removing them averages units that only look unlike."""
    tensors = dict(ws.named)
    layers = arch.param_indices
    for i, after in zip(layers, layers[1:]):
        linears = arch.modules[i].kind == arch.modules[after].kind == "linear"
        if arch.modules[i + 1].kind != "sine" or not linears or f"{i}.bias" not in tensors:
            continue
        phase = torch.remainder(OMEGA_0 * tensors[f"{i}.bias"] + math.pi, 2 * math.pi) - math.pi
        sign = torch.where(phase < 0, -1.0, 1.0)  # (B, n)
        tensors[f"{i}.weight"] = tensors[f"{i}.weight"] * sign[..., None]  # (B, n, in)
        tensors[f"{i}.bias"] = sign * phase / OMEGA_0
        tensors[f"{after}.weight"] = tensors[f"{after}.weight"] * sign[:, None, :]  # (B, out, n)
    return ws.replace(tensors.values())


@torch.no_grad()
def siren_init(model: nn.Sequential) -> None:
    """SIREN's initialisation: the first layer's weights ~ U(-1/in, 1/in), the others'
    ~ U(-c, c) with c = sqrt(6 / in) / OMEGA_0 (biases keep PyTorch's default)."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for i, layer in enumerate(linears):
        fan_in = layer.in_features
        bound = 1 / fan_in if i == 0 else math.sqrt(6 / fan_in) / OMEGA_0
        layer.weight.uniform_(-bound, bound)


def _module_of(index: int, mod: nn.Module) -> Module:
    """Describe one torch module, or say why it cannot be aligned."""
    if isinstance(mod, nn.Linear):
        return Module("linear", mod.in_features, mod.out_features, bias=mod.bias is not None)
    if isinstance(mod, nn.Conv2d):
        if mod.groups != 1 or mod.dilation != (1, 1) or mod.kernel_size[0] != mod.kernel_size[1]:
            raise DeepAlignError(f"module {index} ({mod}): only square, ungrouped convs")
        stride, padding = mod.stride[0], mod.padding[0]
        bias = mod.bias is not None
        return Module(
            "conv", mod.in_channels, mod.out_channels, mod.kernel_size[0], stride, padding, bias
        )
    if isinstance(mod, nn.Flatten):
        return Module("flatten")
    if isinstance(mod, nn.MaxPool2d | nn.AvgPool2d):
        kind = "maxpool" if isinstance(mod, nn.MaxPool2d) else "avgpool"
        return Module(kind, kernel=int(mod.kernel_size if isinstance(mod.kernel_size, int) else 0))
    kind = _MODULE_ACTIVATIONS.get(type(mod))
    if kind is None:
        raise DeepAlignError(
            f"module {index} is {type(mod).__name__}: unsupported (only Linear, Conv2d, Flatten, "
            f"pooling and elementwise activations; no residual or normalisation layers)"
        )
    return Module(kind)


def arch_of(model: nn.Sequential, input_shape: tuple[int, ...]) -> Chain:
    """Describe an `nn.Sequential`; raises on residual, normalisation or unknown modules."""
    if not isinstance(model, nn.Sequential):
        raise DeepAlignError(f"expected nn.Sequential, got {type(model).__name__}")
    return Chain(tuple(_module_of(i, m) for i, m in enumerate(model)), tuple(input_shape))


def mlp_arch(in_dim: int, hidden: list[int], out_dim: int, activation: str) -> Chain:
    """Linear layers of widths in_dim -> *hidden -> out_dim with `activation` between."""
    dims = [in_dim, *hidden, out_dim]
    modules: list[Module] = []
    for i, (a, b) in enumerate(zip(dims, dims[1:], strict=False)):
        modules.append(Module("linear", a, b))
        if i < len(dims) - 2:
            modules.append(Module(activation))
    return Chain(tuple(modules), (in_dim,))


def conv_side(size: int, kernel: int, stride: int, padding: int) -> int:
    """The output height (or width) of a convolution over `size` rows (or columns)."""
    return (size + 2 * padding - kernel) // stride + 1


def cnn_arch(
    input_shape: tuple[int, int, int],
    channels: list[int],
    strides: list[int],
    out_dim: int,
    activation: str,
    kernel: int = 3,
) -> Chain:
    """3x3 'same'-padded convs (given strides), then Flatten and one Linear."""
    if len(channels) != len(strides):
        raise DeepAlignError(f"cnn: {len(channels)} channels but {len(strides)} strides")
    modules: list[Module] = []
    c, h, w = input_shape
    for out_c, s in zip(channels, strides, strict=True):
        modules += [Module("conv", c, out_c, kernel, s, kernel // 2), Module(activation)]
        c, h, w = out_c, conv_side(h, kernel, s, kernel // 2), conv_side(w, kernel, s, kernel // 2)
    modules += [Module("flatten"), Module("linear", c * h * w, out_dim)]
    return Chain(tuple(modules), tuple(input_shape))


GIVE_MODEL = "give the module with --model pkg.module:callable (or a path/to/file.py:callable)"


def reject_normalisation(state: dict[str, Tensor]) -> None:
    """Raise on BatchNorm-style buffers (not a plain chain), naming the first."""
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    norm = next((k for k in state if k.endswith(buffers)), None)
    if norm:
        raise DeepAlignError(
            f"state_dict key '{norm}' is a normalisation layer's, not a plain Sequential's: "
            f"{GIVE_MODEL}"
        )


def infer_arch(state: dict[str, Tensor]) -> Chain:
    """Guess the architecture of a plain Sequential state_dict from its shapes.

    Assumes ReLU between layers, 'same' padding for convs, Flatten before the first Linear.
    Conv strides stay unknown (0) until `resolve_input` can deduce them: enough for
    permutations; forward passes need them.
    """
    reject_normalisation(state)
    layers = sorted({int(k.split(".")[0]) for k in state if k.split(".")[0].isdigit()})
    bad = [k for k in state if not k.split(".")[0].isdigit() or k.count(".") != 1]
    if bad or not layers:
        raise DeepAlignError(
            f"state_dict key '{bad[0] if bad else '(none)'}' is not a plain nn.Sequential "
            f"parameter: {GIVE_MODEL}"
        )
    modules: list[Module] = []
    for n, i in enumerate(layers):
        modules += _inferred_modules(state, i, modules, last=n == len(layers) - 1)
    first = state[f"{layers[0]}.weight"]
    in_shape = (first.shape[1],) if first.ndim == 2 else (first.shape[1], 0, 0)
    return Chain(tuple(modules), in_shape)


def _inferred_modules(state: dict[str, Tensor], i: int, before: list[Module], last: bool) -> list:
    w, bias = state.get(f"{i}.weight"), f"{i}.bias" in state
    if w is None:
        raise DeepAlignError(f"state_dict layer {i} has a bias but no weight")
    if w.ndim == 4:
        k = w.shape[-1]
        mods = [Module("conv", w.shape[1], w.shape[0], k, 0, k // 2, bias)]  # stride unknown
    elif w.ndim == 2:
        kinds = {m.kind for m in before}
        after_conv = "conv" in kinds and "linear" not in kinds
        mods = [Module("flatten")] if after_conv else []
        mods.append(Module("linear", w.shape[1], w.shape[0], bias=bias))
    else:
        raise DeepAlignError(f"state_dict '{i}.weight' has unsupported shape {tuple(w.shape)}")
    return mods if last else [*mods, Module("relu")]


def resolve_input(arch: Chain, image_shape: tuple[int, ...]) -> Chain:
    """An inferred architecture completed for images of `image_shape` (C, H, W).

    Unknown conv strides are deduced only where the shapes leave no choice: the first Linear
    sees channels * H * W features exactly when every 'same'-padded conv has stride 1.
    Otherwise the architecture must be given (`--model`, or a deepalign checkpoint).
    """
    if len(arch.input_shape) != 3:
        return arch
    arch = replace(arch, input_shape=tuple(image_shape))
    if arch.strides_known:
        return arch
    convs = [m for m in arch.modules if m.kind == "conv"]
    linear = next((m for m in arch.modules if m.kind == "linear"), None)
    if linear is None or linear.in_dim != convs[-1].out_dim * image_shape[1] * image_shape[2]:
        raise DeepAlignError(
            "conv strides cannot be read from a bare state_dict; give the architecture with "
            "--model (a deepalign checkpoint of it), or save a deepalign checkpoint"
        )
    modules = tuple(replace(m, stride=1) if m.kind == "conv" else m for m in arch.modules)
    return replace(arch, modules=modules)


def widest(arch: Chain) -> int:
    """The most values one example has at any layer (input included): (C * H * W) or units."""
    shape = arch.input_shape
    most = math.prod(shape)
    for m in arch.modules:
        if m.kind == "linear":
            shape = (m.out_dim,)
        elif m.kind == "conv":
            side = [conv_side(d, m.kernel, max(m.stride, 1), m.padding) for d in shape[1:]]
            shape = (m.out_dim, *side)
        elif m.kind in ("maxpool", "avgpool"):
            shape = (shape[0], *(d // m.kernel for d in shape[1:]))
        elif m.kind == "flatten":
            shape = (math.prod(shape),)
        most = max(most, math.prod(shape))
    return most


def _first_difference(a: Chain, b: Chain) -> str | None:
    """The first module (or the input) where two chains differ; an unknown stride (0) matches
    any."""
    if len(a.modules) != len(b.modules):
        return f"{len(a.modules)} modules against {len(b.modules)}"
    for i, (x, y) in enumerate(zip(a.modules, b.modules)):
        if x.kind == y.kind == "conv" and 0 in (x.stride, y.stride):
            x, y = replace(x, stride=0), replace(y, stride=0)
        if x != y:
            return f"module {i} is {_describe(x)} against {_describe(y)}"
    known = [s for s in (a.input_shape, b.input_shape) if 0 not in s]
    if len(known) == 2 and known[0] != known[1]:
        return f"inputs {a.input_shape} against {b.input_shape}"
    return None


def forward(
    arch: Chain,
    ws: WeightSpace,
    x: Tensor,
    taps: list[Tensor] | None = None,
    preactivations: list[Tensor] | None = None,
) -> Tensor:
    """Functional forward of one (unbatched) network: x (N, *input_shape) -> logits (N, out).

    With `taps`, appends each hidden layer's activations (after its nonlinearity), one per
    permutation group: (N, units) or (N, channels, h, w); with `preactivations`, each hidden
    layer's output before it.
    """
    layer, tapped = 0, 0
    weights, biases, n_layers = arch.weights(ws), arch.biases(ws), len(arch.param_indices)
    for m in arch.modules:
        if m.kind in PARAM_KINDS:
            w, b = weights[layer], biases[layer]
            if m.kind == "linear":
                x = F.linear(x, w, b)
            elif m.stride > 0:
                x = F.conv2d(x, w, b, stride=m.stride, padding=m.padding)
            else:
                raise DeepAlignError("conv stride unknown: give the architecture (--model)")
            layer += 1
            if preactivations is not None and layer < n_layers:
                preactivations.append(x)
        elif m.kind == "flatten":
            x = x.flatten(1)
        elif m.kind == "maxpool":
            x = F.max_pool2d(x, m.kernel)
        elif m.kind == "avgpool":
            x = F.avg_pool2d(x, m.kernel)
        else:
            x = ACTIVATIONS[m.kind](x)
            if taps is not None and tapped < layer < n_layers:
                taps.append(x)
                tapped = layer
    return x


def forward_batched(arch: Chain, ws: WeightSpace, x: Tensor) -> Tensor:
    """Forward of B networks: x (N, ...) shared or (B, N, ...) per network -> (B, N, out).

    Linear layers are batched matmuls with the bias fused in; a conv layer is one grouped
    convolution (group b holds network b's filters) over features laid out (N, B * C, H, W).
    On 2 CPU cores a training step of 1,000 digits MLPs takes ~20% less time than with
    `torch.func.vmap` of `forward`; the arithmetic is the same up to float rounding.
    """
    weights, biases = arch.weights(ws), arch.biases(ws)
    n_nets = weights[0].shape[0]
    h = x if x.ndim == len(arch.input_shape) + 2 else x.unsqueeze(0)  # (B or 1, N, ...)
    features = False  # after a conv, h is laid out (N, B, C, H, W)
    layer = 0
    for m in arch.modules:
        if m.kind in PARAM_KINDS:
            w, b = weights[layer], biases[layer]
            if m.kind == "linear":
                h = h.expand(n_nets, *h.shape[1:])  # (B, N, in)
                if b is None:
                    h = torch.bmm(h, w.transpose(1, 2))  # (B, N, out)
                else:
                    h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))  # (B, N, out)
            else:
                h = _grouped_conv(h if features else _grouped_input(h, n_nets), w, b, m)
                features = True
            layer += 1
        elif m.kind == "flatten":
            h = (h.transpose(0, 1) if features else h).flatten(2)  # (B, N, C * H * W)
            features = False
        elif m.kind in ("maxpool", "avgpool"):
            pool = F.max_pool2d if m.kind == "maxpool" else F.avg_pool2d
            pooled = pool(h.flatten(0, 1), m.kernel)
            h = pooled.view(*h.shape[:2], *pooled.shape[1:])
        else:
            h = ACTIVATIONS[m.kind](h)
    return h


def _grouped_input(x: Tensor, n_nets: int) -> Tensor:
    """Images (B, N, C, H, W), or (1, N, C, H, W) shared, as (N, B, C, H, W)."""
    return x.transpose(0, 1).expand(-1, n_nets, -1, -1, -1)


def _grouped_conv(h: Tensor, w: Tensor, b: Tensor | None, m: Module) -> Tensor:
    """One conv layer of B networks: h (N, B, C, H, W), w (B, O, C, k, k), b (B, O)
    -> (N, B, O, H', W')."""
    if m.stride <= 0:
        raise DeepAlignError("conv stride unknown: give the architecture (--model)")
    n, n_nets = h.shape[:2]
    out = F.conv2d(
        h.reshape(n, -1, *h.shape[3:]),  # (N, B * C, H, W)
        w.flatten(0, 1),  # (B * O, C, k, k)
        None if b is None else b.flatten(),
        stride=m.stride,
        padding=m.padding,
        groups=n_nets,
    )  # (N, B * O, H', W')
    return out.view(n, n_nets, -1, *out.shape[2:])
