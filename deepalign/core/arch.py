"""Architectures: how a network is built, how its tensors are named, and its permutation spec.

An `Arch` builds its `nn.Module`, reads and writes its tensors as a `WeightSpace` (the module's
own state_dict keys), and carries the permutation spec traced from the module's graph
(`deepalign.core.trace`): every function that permutes, aligns or interpolates takes the spec
from the architecture, never from shapes. Any architecture runs through
`torch.func.functional_call` (batched with `vmap`); a chain of Linear/Conv2d layers
(`deepalign.core.chain`) also has a faster batched path of its own.

Kinds: `chain` (an nn.Sequential record: the zoo's MLPs and CNNs), `resnet` (the zoo's small
ResNets with BatchNorm), and `module` (a user's own module, built by a callable).
"""

from __future__ import annotations

import copy
import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.func import functional_call, replace_all_batch_norm_modules_, vmap

from deepalign.core.permspec import PermSpec
from deepalign.core.trace import Tap, Traced, trace
from deepalign.core.weightspace import WeightSpace
from deepalign.errors import DeepAlignError, shown

# Values in the widest activation of one batched forward pass (16 MB of float32): below
# glibc's largest mmap threshold (32 MiB, `deepalign.threads`), so its buffers are reused
# rather than page-faulted in again on every pass. On the 2-core machine of issue 14, 61
# digits CNNs on the 359 test images took 352 ms in one pass (a 90 MB first activation) and
# ~175 ms in passes of 32 networks x 128 images.
ACTIVATION_BUDGET = 1 << 22
BATCHNORM = nn.modules.batchnorm._BatchNorm


class Arch(ABC):
    """A network architecture (hashable: equal records are the same architecture)."""

    input_shape: tuple[int, ...]  # one example: (features,) or (C, H, W)

    @abstractmethod
    def build(self) -> nn.Module:
        """A freshly initialised module of this architecture."""

    @abstractmethod
    def to_dict(self) -> dict:
        """The record a checkpoint stores (`arch_from_dict` reads it back)."""

    @abstractmethod
    def describe(self) -> str:
        """One line for people."""

    def example(self) -> Tensor:
        """A batch of two zero inputs (for tracing and shapes)."""
        return torch.zeros(2, *self.input_shape)

    # --- what the graph says --------------------------------------------------------------

    @property
    def traced(self) -> Traced:
        return _traced(self)

    @property
    def spec(self) -> PermSpec:
        """The permutation spec, traced once per architecture."""
        return self.traced.spec

    @property
    def has_batchnorm(self) -> bool:
        return any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in _template(self)[0].modules()
        )

    @property
    def n_outputs(self) -> int:
        return int(_output_shape(self)[-1])

    def widest(self) -> int:
        """The most values one example has at any layer (input included)."""
        return _widest(self)

    # --- tensors ----------------------------------------------------------------------------

    def keys(self) -> tuple[str, ...]:
        """The floating-point tensors of the module, in WeightSpace order (the module's)."""
        return tuple(_float_state(self))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each of `keys()`."""
        return _float_state(self)

    def buffers(self) -> frozenset[str]:
        """The floating buffers among `keys()` (BatchNorm running statistics)."""
        _, buffers = _template(self)
        return buffers

    def integer_keys(self) -> tuple[str, ...]:
        """State_dict entries that are not weights (num_batches_tracked)."""
        return tuple(sorted(_other_state(self)))

    def integer_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each of `integer_keys()` (a scalar for num_batches_tracked)."""
        if not self.integer_keys():
            return {}
        state = _template(self)[0].state_dict()
        return {k: tuple(state[k].shape) for k in self.integer_keys()}

    def weightspace(self, state: Mapping[str, Tensor]) -> WeightSpace:
        """The architecture's tensors out of a state_dict, checked by key and shape."""
        expected = _float_state(self)
        extra = [k for k in state if k not in expected and k not in _other_state(self)]
        if extra:
            raise DeepAlignError(f"unexpected state_dict key '{extra[0]}' for {self.describe()}")
        for key, shape in expected.items():
            if key not in state:
                raise DeepAlignError(f"state_dict lacks '{key}'")
            if tuple(state[key].shape) != shape:
                raise DeepAlignError(
                    f"'{key}' has shape {tuple(state[key].shape)}, expected {shape}"
                )
        return WeightSpace({k: state[k] for k in self.keys()}, self.buffers())

    def state_dict(self, ws: WeightSpace, extras: Mapping[str, Tensor] | None = None) -> dict:
        """An unbatched network as the module's state_dict (its order; integer buffers from
        `extras`, else the module's own)."""
        module, _ = _template(self)
        out = {}
        for key, value in module.state_dict().items():
            out[key] = ws.named[key] if key in ws.named else (extras or {}).get(key, value)
        return out

    def module_versions(self) -> dict:
        """The module's state_dict `_metadata` (each submodule's version, which a versioned
        `_load_from_state_dict`, like torchvision's MNASNet, checks on loading)."""
        return copy.deepcopy(getattr(_template(self)[0].state_dict(), "_metadata", {}))

    # --- running ----------------------------------------------------------------------------

    def forward_batched(self, ws: WeightSpace, x: Tensor, train: bool = False) -> Tensor:
        """B networks on x (N, ...) shared or (B, N, ...) per network -> (B, N, out).

        `train`: batch statistics in normalisation layers (running statistics untouched).
        """
        return functional_forward(self, ws, x, train)

    def activations(self, ws: WeightSpace, x: Tensor) -> dict[str, list[Tensor]]:
        """One network's activations per group: every tap of the group, (N, n, ...) each."""
        return functional_activations(self, ws, x)

    def canonical(self, ws: WeightSpace) -> WeightSpace:
        """The same functions with every unit in a canonical form of its activation's
        symmetries beyond permutations (none here; a sine chain has some)."""
        return ws


def built(arch: Arch) -> nn.Module:
    """A module of `arch` for reading its structure: built without touching the global random
    state, so that tracing a spec on first use cannot change what a seeded run draws next."""
    with torch.random.fork_rng(devices=[]):
        return arch.build()


@functools.lru_cache(maxsize=64)
def _traced(arch: Arch) -> Traced:
    return trace(built(arch), arch.example())


@functools.lru_cache(maxsize=64)
def _template(arch: Arch) -> tuple[nn.Module, frozenset[str]]:
    """One built module per architecture (eval mode), and its floating buffers."""
    module = built(arch).eval()
    buffers = frozenset(k for k, b in module.named_buffers() if b.is_floating_point())
    return module, buffers


@functools.lru_cache(maxsize=64)
def _train_template(arch: Arch) -> nn.Module:
    """The module in train mode with batch statistics only (no running ones to update)."""
    module = copy.deepcopy(_template(arch)[0]).train()
    replace_all_batch_norm_modules_(module)
    return module


def _float_state(arch: Arch) -> dict[str, tuple[int, ...]]:
    """Shape of every floating-point tensor of the module, in its state_dict order."""
    state = _template(arch)[0].state_dict()
    return {k: tuple(t.shape) for k, t in state.items() if t.is_floating_point()}


def _other_state(arch: Arch) -> set[str]:
    module, _ = _template(arch)
    return {k for k, v in module.state_dict().items() if not v.is_floating_point()}


def _per_network(x: Tensor, arch: Arch) -> bool:
    return x.ndim == len(arch.input_shape) + 2


def functional_forward(arch: Arch, ws: WeightSpace, x: Tensor, train: bool = False) -> Tensor:
    """Any architecture through `functional_call`; batched networks through `vmap`."""
    module = _train_template(arch) if train else _template(arch)[0]
    named = dict(ws.named) if not train else ws.params()

    def one(tensors: dict[str, Tensor], inputs: Tensor) -> Tensor:
        return functional_call(module, tensors, (inputs,), strict=False, tie_weights=False)

    if not ws.is_batched:
        return one(named, x)
    return vmap(one, in_dims=(0, 0 if _per_network(x, arch) else None))(named, x)


def functional_activations(arch: Arch, ws: WeightSpace, x: Tensor) -> dict[str, list[Tensor]]:
    """Every group's taps, read from the traced graph with its outputs redirected to them."""
    taps = [(g, tap) for g, group_taps in arch.traced.taps.items() for tap in group_taps]
    outputs = layer_outputs(arch, ws, x, tuple(tap.node for _, tap in taps))
    found: dict[str, list[Tensor]] = {g: [] for g in arch.spec.groups}
    for (group, tap), tensor in zip(taps, outputs):
        found[group].append(_units_of(tensor, tap, arch.spec.sizes[group]))
    return found


def _units_of(tensor: Tensor, tap: Tap, n: int) -> Tensor:
    """A group's run of a tapped activation, units on axis 1: (N, n, ...), a unit's block of
    entries (whole conv groups) on the last axis."""
    run = tensor.narrow(tap.dim, tap.offset, tap.extent).movedim(tap.dim, 1)  # (N, n*block, ...)
    if tap.extent == n:
        return run
    return run.unflatten(1, (n, tap.extent // n)).movedim(2, -1)  # (N, n, ..., block)


@functools.lru_cache(maxsize=64)
def _output_shape(arch: Arch) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(_template(arch)[0](arch.example()).shape[1:])


@functools.lru_cache(maxsize=64)
def _widest(arch: Arch) -> int:
    """The widest activation of one example, measured with forward hooks."""
    most = [math.prod(arch.input_shape)]

    def record(_mod: nn.Module, _inp: Any, out: Any) -> None:
        if isinstance(out, Tensor):
            most.append(out[0].numel())

    module = copy.deepcopy(_template(arch)[0])
    hooks = [m.register_forward_hook(record) for m in module.modules()]
    with torch.no_grad():
        module(arch.example())
    for hook in hooks:
        hook.remove()
    return max(most)


# --- batch statistics -------------------------------------------------------------------------


def batchnorm_statistics(arch: Arch, ws: WeightSpace, x: Tensor, batch: int = 256) -> WeightSpace:
    """`ws` (batched) with every BatchNorm's running mean and variance recomputed on images x
    (N, ...): the equal-weight average over batches of each layer's batch statistics, the
    network run with batch statistics (as `torch.optim.swa_utils.update_bn` does)."""
    module = _train_template(arch)
    norms = [
        (n, m) for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    if not norms:
        return ws
    sums: dict[str, Tensor] = {}
    chunks = list(x.split(batch))
    for chunk in chunks:
        stats = _batch_stats(module, norms, ws, chunk)
        for key, value in stats.items():
            sums[key] = sums[key] + value if key in sums else value
    return ws.with_tensors({k: v / len(chunks) for k, v in sums.items()})


def _batch_stats(
    module: nn.Module, norms: list[tuple[str, nn.Module]], ws: WeightSpace, x: Tensor
) -> dict[str, Tensor]:
    """Each BatchNorm input's per-channel mean and unbiased variance: {key: (B, C)}."""
    seen: list[Tensor] = []

    def record(_mod: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        h = inputs[0]
        dims = [d for d in range(h.ndim) if d != 1]
        seen.extend([h.mean(dims), h.var(dims, unbiased=True)])

    def one(tensors: dict[str, Tensor], inputs: Tensor) -> tuple[Tensor, ...]:
        seen.clear()
        functional_call(module, tensors, (inputs,), strict=False, tie_weights=False)
        return tuple(seen)

    hooks = [m.register_forward_pre_hook(record) for _, m in norms]
    try:
        with torch.no_grad():
            values = vmap(one, in_dims=(0, None))(ws.params(), x)
    finally:
        for hook in hooks:
            hook.remove()
    keys = [f"{n}.{s}" for n, _ in norms for s in ("running_mean", "running_var")]
    return dict(zip(keys, values, strict=True))


# --- shared helpers -----------------------------------------------------------------------------


def per_pass(arch: Arch, other: int) -> int:
    """How many networks one batched forward pass takes with `other` examples each (or how
    many examples with `other` networks), the widest activation within ACTIVATION_BUDGET."""
    return max(1, ACTIVATION_BUDGET // (other * arch.widest()))


def passes(count: int, step: int) -> list[slice]:
    """`count` items (networks, pairs, images) in slices of `step`, one per forward pass."""
    return [slice(i, i + step) for i in range(0, count, step)]


def as_input(arch: Arch, x: Tensor) -> Tensor:
    """Images (N, C, H, W) reshaped to the architecture's input: (N, *input_shape)."""
    return x.reshape(x.shape[0], *arch.input_shape)


def forward_batched(arch: Arch, ws: WeightSpace, x: Tensor, train: bool = False) -> Tensor:
    """B networks of `arch` on x: (B, N, out); see `Arch.forward_batched`."""
    return arch.forward_batched(ws, x, train)


def check_same_arch(a: Arch, b: Arch, names: tuple[str, str] = ("a", "b")) -> None:
    """Refuse two networks of different architectures, naming where they differ."""
    if hasattr(a, "first_difference") and type(a) is type(b):
        found = a.first_difference(b)
    else:
        found = None if a == b else f"{a.describe()} against {b.describe()}"
    if found:
        raise DeepAlignError(f"architectures differ: {names[0]} vs {names[1]}: {found}")


def check_fits(arch: Arch, image_shape: tuple[int, ...], n_classes: int, data: str) -> None:
    """Refuse a network that cannot read data set `data`'s images or name its classes."""
    pixels = math.prod(image_shape)
    shape = "x".join(map(str, image_shape))
    inputs = arch.input_shape
    if len(inputs) == 1 and inputs[0] != pixels:
        raise DeepAlignError(f"takes {inputs[0]} inputs, but {data} images have {pixels} ({shape})")
    if len(inputs) == 3:
        known = tuple(d for d in inputs[1:] if d)
        if inputs[0] != image_shape[0] or known not in ((), tuple(image_shape[1:])):
            given = "x".join(str(d or "?") for d in inputs)
            raise DeepAlignError(f"takes {given} images, but {data} images are {shape}")
    if arch.n_outputs != n_classes:
        raise DeepAlignError(f"has {arch.n_outputs} outputs, but {data} has {n_classes} classes")


class ModuleArch(Arch):
    """A user's own module (`--model pkg.module:callable`, or the Python API's modules),
    traced as it is; equal only to itself."""

    def __init__(self, module: nn.Module, input_shape: tuple[int, ...], name: str) -> None:
        self.module, self.input_shape, self.name = module, tuple(input_shape), name

    def build(self) -> nn.Module:
        return copy.deepcopy(self.module)

    def to_dict(self) -> dict:
        return {"kind": "module", "name": self.name, "input_shape": list(self.input_shape)}

    def describe(self) -> str:
        return f"{self.name} ({type(self.module).__name__}, {len(self.keys())} tensors)"

    def first_difference(self, other: ModuleArch) -> str | None:
        """Where two traced modules compute differently (graph or a submodule), or None."""
        mine, theirs = structure(self), structure(other)
        if mine[0] != theirs[0]:
            return "their forward passes differ (another graph: a residual connection, an op)"
        for a, b in zip(mine[1:], theirs[1:]):
            if a != b:
                return f"module {a} against {b}"
        if len(mine) != len(theirs):
            return "they have different submodules"
        return None


@functools.lru_cache(maxsize=64)
def structure(arch: Arch) -> tuple[str, ...]:
    """What decides a traced network's function besides its tensors: the graph's code, then
    each submodule's name, type and settings ('act: Tanh()')."""
    gm = arch.traced.graph
    named = [(n, m) for n, m in gm.named_modules() if n]
    return (gm.code, *(f"'{n}': {type(m).__name__}({m.extra_repr()})" for n, m in named))


# --- the layers that make each group's units (REPAIR) -------------------------------------------


@dataclass(frozen=True)
class Producer:
    """A Linear or Conv whose outputs are the units of a permutation group."""

    group: str
    node: str  # its node in the traced graph
    weight: str  # state_dict keys
    bias: str | None


@functools.lru_cache(maxsize=64)
def producers(arch: Arch) -> tuple[Producer, ...]:
    """Every layer making a hidden group's units, in forward order (a residual group has
    several); a layer called twice (tied) once."""
    gm = arch.traced.graph
    modules = dict(gm.named_modules())
    owner = {  # a layer's outputs, whole (not a conv group's run of them)
        (ax.key, ax.axis): g
        for g, axes in arch.spec.members.items()
        for ax in axes
        if ax.offset == 0 and ax.block == 1 and not arch.spec.shares(ax.key, ax.axis)
    }
    found: dict[str, Producer] = {}
    for node in gm.graph.nodes:
        layer = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(layer, nn.Linear | nn.modules.conv._ConvNd):
            continue
        weight = f"{node.target}.weight"
        group = owner.get((weight, 0))
        if group is not None and weight not in found:
            bias = f"{node.target}.bias" if layer.bias is not None else None
            found[weight] = Producer(group, node.name, weight, bias)
    return tuple(found.values())


def layer_outputs(arch: Arch, ws: WeightSpace, x: Tensor, nodes: tuple[str, ...]) -> list[Tensor]:
    """One network's outputs of graph nodes `nodes` on x: (N, n, ...) each."""
    graph = _outputs_graph(arch, nodes)
    return list(functional_call(graph, dict(ws.named), (x,), strict=False, tie_weights=False))


@functools.lru_cache(maxsize=64)
def _outputs_graph(arch: Arch, nodes: tuple[str, ...]) -> torch.fx.GraphModule:
    """A copy of the traced graph that returns the outputs of `nodes`."""
    gm = copy.deepcopy(arch.traced.graph).eval()
    by_name = {n.name: n for n in gm.graph.nodes}
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.args = (tuple(by_name[name] for name in nodes),)
    gm.recompile()
    return gm


# --- records: what a checkpoint stores, read back -------------------------------------------------

# Record kind -> its reader. Each architecture's module registers its kind when imported
# (`record_kind`); `deepalign.io` imports them all, so a checkpoint of any kind loads wherever
# checkpoints are read.
RECORDS: dict[str, Callable[[Any], Arch]] = {}
A = TypeVar("A", bound=type)


def record_kind(name: str) -> Callable[[A], A]:
    """Class decorator: `arch_from_dict` reads records of kind `name` with `cls.from_dict`."""

    def register(cls: A) -> A:
        RECORDS[name] = cls.from_dict  # type: ignore[attr-defined]
        return cls

    return register


def arch_from_dict(record: Any) -> Arch:
    """The architecture a checkpoint's record describes (kind `chain` when it names none)."""
    kind = record.get("kind", "chain") if isinstance(record, dict) else None
    if kind == "module":
        raise DeepAlignError(
            f"the network was saved from {shown(record.get('name'))}: give --model for it"
        )
    if not isinstance(kind, str) or kind not in RECORDS:
        raise DeepAlignError(
            f"architecture record: unknown kind {shown(kind)} (known: {', '.join(sorted(RECORDS))})"
        )
    return RECORDS[kind](record)
