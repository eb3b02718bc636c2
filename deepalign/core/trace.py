"""The permutation spec of a PyTorch module, read from its `torch.fx` graph.

Every tensor flowing through the graph carries a label for its permuted axis (dim 1: the
features of an (N, F) tensor, the channels of an (N, C, ...) one; the last axis after a permute
to channels-last): the runs of that axis and the hidden group permuting each. A tensor with no
permuted axis (the input, a mean over the channels) has none. A Linear or a Conv starts a new
group for its outputs (a Linear on the last axis, wherever that is); normalisation layers,
activations, pooling, dropout, stochastic depth and upsampling carry their input's label through
(their own weights and running statistics follow the channel, as does a module's own tensor read
in an elementwise product, a layer scale); an elementwise operation of several tensors
(`+ - * /`, `torch.maximum`, `torch.where`, comparisons, ...) merges their groups run by run
(union-find), so a residual stream is one group; a reshape that keeps each example's values in
order (a flatten) keeps the label, in blocks of h*w entries per unit.

Concatenation along the permuted axis lays its inputs' runs side by side (DenseNet, Inception),
and `torch.split`/`chunk`/slicing reads them back where a cut falls between runs. A grouped
convolution permutes whole conv groups (its input's group moves in units of one conv group's
channels, and its output follows as one run over the axis) and, inside each conv group, its
output units (one run each, nested in the first and applied after it); a depthwise one stays per
channel. The network's inputs and outputs are never permuted: a group that reaches an output, or
meets an input, is fixed. An operation of tensors with no permuted axis is followed whatever it
is. One tensor under two state_dict keys (tied weights) is permuted alike under both. Anything
else (attention, a channel shuffle, a split through a group's units, recurrent layers, code
torch.fx cannot trace) stops with one line naming the operation, by its Python name, and the
module it sits in.
"""

from __future__ import annotations

import contextlib
import math
import operator
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from deepalign.core.permspec import Axis, PermSpec
from deepalign.errors import DeepAlignError

FIXED = 0  # the group of everything that must not be permuted (inputs, outputs)

# --- what each operation does to the channel axis: functions, and Tensor methods by name ------

ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.PReLU,
)  # fmt: skip
PASS_MODULES = (
    *ACTIVATIONS, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Softmax, nn.LogSoftmax,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)  # fmt: skip
SHAPE_KEEPING_MODULES = (
    *ACTIVATIONS, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.Softmax, nn.LogSoftmax,
)  # fmt: skip
NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
ACTIVATION_OPS = {
    F.relu: "relu", torch.relu: "relu", F.leaky_relu: "leaky_relu", F.gelu: "gelu",
    F.silu: "silu", F.elu: "elu", F.mish: "mish", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
    torch.tanh: "tanh", F.tanh: "tanh", F.relu6: "relu6", F.hardtanh: "hardtanh",
    F.softplus: "softplus", F.hardswish: "hardswish", F.selu: "selu", torch.sin: "sin",
    torch.cos: "cos", "relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "tanh": "tanh",
    "sin": "sin",
}  # fmt: skip
_UNARY = (
    "exp", "abs", "neg", "sqrt", "rsqrt", "log", "log1p", "expm1", "square", "reciprocal", "sign",
    "round", "floor", "ceil", "trunc", "erf", "softmax", "log_softmax",
)  # fmt: skip
SPATIAL = {  # pooling and resizing over the axes after the channels
    F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate,
}  # fmt: skip
SHAPE_KEEPING = {  # entry by entry, or along one axis (softmax), the shape kept
    F.dropout, F.dropout1d, F.dropout2d, F.softmax, F.log_softmax, F.normalize, abs,
    operator.neg, operator.pos, operator.invert, "contiguous", "clone", "detach", "float", "to",
    "type_as", *(getattr(torch, name) for name in _UNARY), *_UNARY,
    *(name + "_" for name in _UNARY),
}  # fmt: skip
PER_CHANNEL = SPATIAL | SHAPE_KEEPING  # each channel's values stay in that channel
# per-example operations known by name (torchvision is not imported here): in eval mode the
# identity, in training a scale per example, never across channels
PER_SAMPLE = {"torchvision.ops.stochastic_depth.stochastic_depth"}
CONCATS = {torch.cat, torch.concat, torch.concatenate}
SPLITS = {torch.split, torch.chunk, torch.tensor_split, "split", "chunk", "tensor_split"}
LAYER_NORMS = {F.layer_norm}
_BINARY = (
    "add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "floor_divide",
    "remainder", "fmod", "pow", "float_power", "maximum", "minimum", "fmax", "fmin", "where",
    "atan2", "arctan2", "hypot", "lt", "le", "gt", "ge", "eq", "ne", "less", "less_equal",
    "greater", "greater_equal", "not_equal", "logical_and", "logical_or", "logical_xor",
    "clamp", "clip", "lerp", "addcmul", "addcdiv", "logaddexp", "copysign",
)  # fmt: skip
_OPERATORS = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and_", "or_", "xor")
ELEMENTWISE = {  # entry by entry with broadcasting: every operand's group becomes one
    *(getattr(torch, name) for name in _BINARY),
    *(getattr(operator, name) for name in _OPERATORS),
    *(getattr(operator, "i" + name.rstrip("_")) for name in _OPERATORS),  # x += y
    operator.lt,
    operator.le,
    operator.gt,
    operator.ge,
    operator.eq,
    operator.ne,
    *_BINARY,
    *(name + "_" for name in _BINARY),  # in place
}
RESHAPES = {
    torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten, "view",
    "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
}  # fmt: skip
TRANSPOSES = {
    torch.permute, torch.transpose, torch.swapaxes, torch.swapdims, torch.movedim,
    torch.moveaxis, torch.t, "permute", "transpose", "swapaxes", "swapdims", "movedim",
    "moveaxis", "t", "T", "mT",
}  # fmt: skip
_REDUCTIONS = {"mean": 1, "sum": 1, "amax": 1, "amin": 1, "logsumexp": 1, "std": 1, "var": 1}
REDUCTIONS = {  # -> position of the `dim` argument
    **{getattr(torch, name): at for name, at in _REDUCTIONS.items()}, **_REDUCTIONS,
    torch.norm: 2, "norm": 2,
}  # fmt: skip
CONSTANTS = {torch.zeros_like, torch.ones_like, torch.full_like, "new_zeros", "new_ones"}
SIZES = {
    "size", "dim", "numel", "nelement", "ndimension", "shape", "ndim", "dtype", "device",
    "is_cuda", "requires_grad",
}  # fmt: skip
# ReLU(s x) = s ReLU(x) for s > 0: scaling a unit's inputs by s and its outputs by 1/s keeps the
# function. No other activation here has that symmetry.
POSITIVELY_HOMOGENEOUS = {"relu", "leaky_relu", "prelu"}
AXIS_NAMES = (2, 3, 5, 7, 11, 13, 17, 19)  # distinct sizes that tell a probe tensor's axes apart
# Python names of the modules torch's built-in functions say they come from
MODULE_NAMES = {
    "_operator": "operator", "torch._C._nn": "torch.nn.functional", "builtins": "",
    "torch._C._VariableFunctions": "torch", "torch._C._linalg": "torch.linalg",
    "torch._C._special": "torch.special", "torch._C._fft": "torch.fft", "torch.functional": "torch",
}  # fmt: skip


def python_name(fn: object) -> str:
    """The dotted name a function is called by ('torch.cat', 'operator.truediv')."""
    module = getattr(fn, "__module__", None) or ""
    module = MODULE_NAMES.get(module, module)
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if name is None:
        return type(fn).__name__
    if "<" in name or name.startswith("_"):  # torch builtins, boolean_dispatch wrappers
        name = getattr(fn, "__name__", name)
    name = name.replace("TensorBase.", "Tensor.")
    return f"{module}.{name}" if module and not name.startswith("Tensor.") else name


def _shape(node: object) -> tuple[int, ...] | None:
    """The shape ShapeProp recorded for a node that makes one tensor (else None)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _first(node: fx.Node) -> object:
    """The tensor an operation acts on: its first argument."""
    return node.args[0] if node.args else next(iter(node.kwargs.values()), None)


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def _moved_axis(node: fx.Node, ndim: int, dim: int) -> int | None:
    """Where a permute or transpose puts axis `dim` (None if it moves the batch axis, or the
    axes are computed in the graph): the same call made on an empty tensor whose axis sizes
    name its axes."""
    if ndim > len(AXIS_NAMES) or len(node.all_input_nodes) != 1:
        return None  # more axes than names, or axes computed in the graph
    probe = torch.empty(AXIS_NAMES[:ndim], device="meta")
    try:
        if node.target is getattr:  # x.T, x.mT
            out = getattr(probe, node.args[1])
        elif node.op == "call_method":
            out = getattr(probe, node.target)(*node.args[1:], **node.kwargs)
        else:
            out = node.target(probe, *node.args[1:], **node.kwargs)
    except (RuntimeError, TypeError, IndexError):
        return None
    if out.shape[0] != AXIS_NAMES[0]:
        return None
    return tuple(out.shape).index(AXIS_NAMES[dim])


@dataclass(frozen=True)
class Seg:
    """A run of a tensor's permuted axis that one group permutes: its entries
    [offset, offset + extent)."""

    gid: int
    offset: int
    extent: int

    def shifted(self, by: int) -> Seg:
        return Seg(self.gid, self.offset + by, self.extent)

    def scaled(self, num: int, den: int) -> Seg:
        return Seg(self.gid, self.offset * num // den, self.extent * num // den)


@dataclass(frozen=True)
class Label:
    """What permutes a tensor: one axis (`dim`: 1 for channels or features, the last after a
    move to channels-last) and the groups permuting runs of it. Runs may nest: a grouped
    convolution's output is permuted by whole groups (one run over the axis) and inside each
    group (one run per group), applied in that order."""

    dim: int
    segs: tuple[Seg, ...]

    def layout(self) -> tuple[tuple[int, int], ...]:
        return tuple((s.offset, s.extent) for s in self.segs)


def _whole(gid: int, extent: int, dim: int = 1) -> Label:
    return Label(dim, (Seg(gid, 0, extent),))


@dataclass
class _Groups:
    """Union-find over group ids; every run of a tensor axis each group permutes; each group's
    units, and how many of them move together (a grouped convolution moves whole groups)."""

    parent: dict[int, int] = field(default_factory=lambda: {FIXED: FIXED})
    axes: list[tuple[int, str, int, int, int]] = field(default_factory=list)  # gid, key, axis, run
    units: dict[int, int] = field(default_factory=dict)  # gid -> units it was made with
    together: dict[int, int] = field(default_factory=dict)  # root -> units moving as one

    def new(self, units: int) -> int:
        gid = len(self.parent)
        self.parent[gid] = gid
        self.units[gid] = units
        return gid

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # FIXED (0) stays the root of whatever joins it
            keep, gone = min(ra, rb), max(ra, rb)
            self.parent[gone] = keep
            self.move_together(keep, self.together.pop(gone, 1))

    def move_together(self, gid: int, k: int) -> None:
        root = self.find(gid)
        self.together[root] = math.lcm(self.together.get(root, 1), k)

    def block(self, seg: Seg) -> Fraction | None:
        """Entries per (finest) unit of the group in this run; None for unpermuted runs."""
        root = self.find(seg.gid)
        if root == FIXED or seg.gid not in self.units:
            return None
        return Fraction(seg.extent, self.units[seg.gid])

    def add(self, label: Label | None, key: str, axis: int) -> None:
        for seg in label.segs if label is not None else ():
            self.axes.append((seg.gid, key, axis, seg.offset, seg.extent))


def operation(node: fx.Node, modules: dict[str, nn.Module], root: str) -> str:
    """A node for people: 'module 'blocks.0' (Conv2d)', 'torch.cat in module 'a' (Block)'."""
    if node.op == "call_module":
        return f"module '{node.target}' ({type(modules[node.target]).__name__})"
    if node.op == "get_attr":
        what = f"tensor '{node.target}'"
    elif node.op == "call_method":
        what = f"Tensor.{node.target}"
    elif node.target is getattr and len(node.args) > 1:
        what = f"Tensor.{node.args[1]}"
    else:
        what = python_name(node.target)
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if not stack:
        return f"{what} in the top-level module ({root})"
    path, cls = stack[-1]  # the innermost module whose forward runs it
    return f"{what} in module '{path}' ({getattr(cls, '__name__', str(cls).rsplit('.')[-1])})"


def _dim_arg(node: fx.Node, at: int, ndim: int, default: int = 0) -> int:
    dim = node.args[at] if len(node.args) > at else node.kwargs.get("dim", default)
    return dim % ndim


@dataclass
class _Tracer:
    modules: dict[str, nn.Module]
    root: str  # the traced module's class name
    params: frozenset[str] = frozenset()  # the state_dict's keys, read by get_attr
    groups: _Groups = field(default_factory=_Groups)
    labels: dict[fx.Node, Label | None] = field(default_factory=dict)
    parts: dict[fx.Node, tuple[Label | None, ...]] = field(default_factory=dict)  # split outputs
    attrs: dict[fx.Node, str] = field(default_factory=dict)  # get_attr nodes of state_dict keys
    taps: list[tuple[int, fx.Node, int, int, int]] = field(default_factory=list)  # activations
    starts: list[tuple[int, fx.Node, int, int, int]] = field(default_factory=list)  # layer outputs
    activations: set[str] = field(default_factory=set)  # kinds of nonlinearity seen
    norms: bool = False  # a normalisation layer is on some path

    def refuse(self, node: fx.Node, why: str) -> DeepAlignError:
        """One line naming the operation, the module it sits in, and why."""
        what = operation(node, self.modules, self.root)
        return DeepAlignError(f"{what} cannot be permuted safely: {why}")

    def _record(self, into: list, node: fx.Node, label: Label | None) -> None:
        for seg in label.segs if label is not None else ():
            into.append((seg.gid, node, label.dim, seg.offset, seg.extent))

    def tap(self, node: fx.Node, kind: str, label: Label | None) -> Label | None:
        """Record an activation: its kind, and its output as a tap of its groups."""
        self.activations.add(kind)
        self._record(self.taps, node, label)
        return label

    def label(self, arg: object) -> Label | None:
        return self.labels.get(arg) if isinstance(arg, fx.Node) else None

    def labelled(self, node: fx.Node) -> list[fx.Node]:
        """The node's inputs that have a permuted axis."""
        return [
            n
            for n in node.all_input_nodes
            if self.labels.get(n) is not None or any(self.parts.get(n, ()))
        ]

    def run(self, gm: fx.GraphModule) -> None:
        for node in gm.graph.nodes:
            try:
                self.labels[node] = self.visit(node)
            except DeepAlignError:
                raise
            except Exception as e:  # arguments laid out in a way this reading does not know
                raise self.refuse(node, f"its arguments cannot be read ({_first_line(e)})") from e

    def visit(self, node: fx.Node) -> Label | None:
        if node.op == "output":
            self._fix_output(node.args)
        elif node.op == "get_attr" and node.target in self.params:
            self.attrs[node] = node.target  # permuted where it meets a permuted tensor
        elif node.op == "call_module":
            return self.module(node, self.modules[node.target])
        elif node.op in ("call_function", "call_method"):
            return self.call(node)
        return None  # placeholder: an input

    def _fix_output(self, arg: object) -> None:
        if isinstance(arg, list | tuple):
            for a in arg:
                self._fix_output(a)
        elif isinstance(arg, dict):
            for a in arg.values():
                self._fix_output(a)
        elif isinstance(arg, fx.Node):
            for label in (self.label(arg), *self.parts.get(arg, ())):
                for seg in label.segs if label is not None else ():
                    self.groups.union(seg.gid, FIXED)

    # --- modules ----------------------------------------------------------------------------

    def module(self, node: fx.Node, mod: nn.Module) -> Label | None:
        source = self.label(_first(node))
        if isinstance(mod, nn.Linear):
            return self._started(node, self._linear(node, mod, source))
        if isinstance(mod, nn.modules.conv._ConvNd):
            return self._started(node, self._conv(node, mod, source))
        if isinstance(mod, NORMS):
            self._norm(node, mod, source)
            self.norms = True
            return source
        if isinstance(mod, nn.PReLU):
            if mod.num_parameters > 1:
                self._channels_first(node, source, "a per-channel PReLU")
                self.groups.add(source, f"{node.target}.weight", 0)
            return self.tap(node, "prelu", source)
        if isinstance(mod, ACTIVATIONS):
            kind = "leaky_relu" if isinstance(mod, nn.LeakyReLU) else type(mod).__name__.lower()
            return self.tap(node, kind, source)
        if isinstance(mod, nn.Flatten | nn.Unflatten):
            return self.reshape(node, source)
        if isinstance(mod, PASS_MODULES):
            return self.per_channel(
                node, source, spatial=not isinstance(mod, SHAPE_KEEPING_MODULES)
            )
        raise self.refuse(node, "it is not known to act per channel")

    def _started(self, node: fx.Node, label: Label | None) -> Label | None:
        self._record(self.starts, node, label)
        return label

    def _channels_first(self, node: fx.Node, source: Label | None, what: str) -> None:
        if source is not None and source.dim != 1:
            raise self.refuse(node, f"{what} on a tensor permuted along axis {source.dim}, not 1")

    def _linear(self, node: fx.Node, mod: nn.Linear, source: Label | None) -> Label:
        """A Linear mixes the last axis: it reads its input's groups there and starts one."""
        shape = _shape(_first(node)) or (0, 0)
        if source is not None and source.dim != len(shape) - 1:
            raise self.refuse(
                node, f"it mixes the last axis of {shape}, but axis {source.dim} is permuted"
            )
        name, out = node.target, self.groups.new(mod.out_features)
        self.groups.add(source, f"{name}.weight", 1)
        made = _whole(out, mod.out_features, len(shape) - 1)
        self.groups.add(made, f"{name}.weight", 0)
        if mod.bias is not None:
            self.groups.add(made, f"{name}.bias", 0)
        return made

    def _conv(self, node: fx.Node, mod: nn.modules.conv._ConvNd, source: Label | None) -> Label:
        self._channels_first(node, source, "a convolution")
        if mod.transposed:
            raise self.refuse(node, "transposed convolutions are not supported")
        name, n = node.target, mod.out_channels
        if mod.groups == mod.in_channels == n and mod.groups > 1:  # depthwise: per channel
            made = source
        elif mod.groups == 1:
            self.groups.add(source, f"{name}.weight", 1)
            made = _whole(self.groups.new(n), n)
        else:
            made = self._grouped(node, mod, source)
        self.groups.add(made, f"{name}.weight", 0)
        if mod.bias is not None:
            self.groups.add(made, f"{name}.bias", 0)
        return made

    def _grouped(self, node: fx.Node, mod: nn.modules.conv._ConvNd, source: Label | None) -> Label:
        """A grouped convolution: its input's group moves in whole conv groups, which its
        output follows (one run over the axis), and each conv group's outputs are a group of
        their own (one run each): a permutation of groups, then of units inside each."""
        g, n = mod.groups, mod.out_channels
        each = n // g
        inner = tuple(Seg(self.groups.new(each), j * each, each) for j in range(g))
        if source is None:
            return Label(1, inner)
        if len(source.segs) != 1 or source.segs[0].extent != mod.in_channels:
            raise self.refuse(
                node,
                f"a grouped convolution ({g} groups) reading runs of {len(source.segs)} groups",
            )
        outer = source.segs[0]
        units = self.groups.units.get(outer.gid)
        if units is None or units % g:
            raise self.refuse(node, f"a grouped convolution ({g} groups) of {units} units")
        self.groups.move_together(outer.gid, units // g)
        return Label(1, (Seg(outer.gid, 0, n), *inner))

    def _norm(self, node: fx.Node, mod: nn.Module, source: Label | None) -> None:
        shape = _shape(_first(node)) or ()
        if isinstance(mod, nn.GroupNorm) and mod.num_groups not in (1, mod.num_channels):
            raise self.refuse(node, f"GroupNorm with {mod.num_groups} groups mixes channels")
        if isinstance(mod, nn.LayerNorm):
            self._layer_norm(node, tuple(mod.normalized_shape), source, shape)
        else:
            self._channels_first(node, source, "a normalisation")
        for key, _ in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
            if key != "num_batches_tracked":
                self.groups.add(source, f"{node.target}.{key}", 0)

    def _layer_norm(
        self, node: fx.Node, normalized: tuple[int, ...], source: Label | None, shape: tuple
    ) -> None:
        """A LayerNorm over the permuted axis and every axis after it: its weights' axis 0 is
        the permuted one."""
        if source is not None and len(normalized) != len(shape) - source.dim:
            raise self.refuse(
                node,
                f"a LayerNorm over the last {len(normalized)} axes of {shape}, not from the "
                f"permuted axis {source.dim} on",
            )

    # --- functions and Tensor methods --------------------------------------------------------

    def call(self, node: fx.Node) -> Label | None:
        """A function or method, by what its operation does to the permuted axis."""
        op = node.target if node.target is not getattr else node.args[1]
        if op is operator.getitem and node.args[0] in self.parts:
            return self.parts[node.args[0]][node.args[1]]
        if "tensor_meta" not in node.meta:  # sizes and other plain values
            if op in SIZES or not self.labelled(node):
                return None
            raise self.refuse(node, "it turns permuted values into plain Python values")
        if op in CONCATS:
            return self.concat(node)
        if op in SPLITS:
            self.parts[node] = self.split(node)
            return None
        if op in ELEMENTWISE:
            return self.elementwise(node)
        if op in ACTIVATION_OPS:
            return self.tap(node, ACTIVATION_OPS[op], self.label(_first(node)))
        if op in PER_CHANNEL or op == "data" or python_name(op) in PER_SAMPLE:
            spatial = op not in SHAPE_KEEPING and python_name(op) not in PER_SAMPLE
            return self.per_channel(node, self.label(_first(node)), spatial)
        if op in LAYER_NORMS:
            return self.layer_norm(node)
        if op in RESHAPES:
            return self.reshape(node, self.label(_first(node)))
        if op in TRANSPOSES:
            return self.transpose(node, self.label(_first(node)))
        if op in REDUCTIONS:
            return self.reduce(node, REDUCTIONS[op])
        if op is operator.getitem:
            return self.index(node)
        if op in CONSTANTS or not self.labelled(node):
            return None  # made of values no permutation changes
        raise self.refuse(node, "it is not known to act per channel")

    def _operand(self, arg: fx.Node, out: tuple[int, ...], dim: int) -> tuple[int, int] | None:
        """(lead, size along the permuted axis) of a broadcast operand, None for plain values."""
        shape = _shape(arg)
        if shape is None:
            return None
        lead = len(out) - len(shape)  # broadcasting aligns the trailing axes
        return lead, (shape[dim - lead] if 0 <= dim - lead < len(shape) else 1)

    def elementwise(self, node: fx.Node) -> Label | None:
        """Every operand that varies along the permuted axis is permuted alike: their groups
        join run by run (an operand broadcast along it, a per-example scalar (N, 1), joins
        none); a module's own tensor read there (a layer scale) is permuted with them."""
        out = _shape(node)
        if out is None:
            raise self.refuse(node, "it returns several tensors")
        labelled = [a for a in node.all_input_nodes if self.labels.get(a) is not None]
        if not labelled:
            return None
        dims = set()
        for arg in labelled:
            lead = len(out) - len(_shape(arg))
            if lead > 0:
                raise self.refuse(node, "it broadcasts a permuted axis onto another axis")
            dims.add(self.labels[arg].dim)
        if len(dims) > 1:
            raise self.refuse(node, f"it combines tensors permuted along axes {sorted(dims)}")
        first, dim = self.labels[labelled[0]], dims.pop()
        for arg in node.all_input_nodes:
            found = self._operand(arg, out, dim)
            if found is None or found[1] == 1:
                continue  # a plain value, or broadcast along the permuted axis
            lead, label = found[0], self.labels.get(arg)
            if arg in self.attrs:
                self.groups.add(first, self.attrs[arg], dim - lead)
            elif label is None:
                for seg in first.segs:  # an unpermuted tensor fixes what it meets
                    self.groups.union(seg.gid, FIXED)
            else:
                self._join(node, first, label)
        return first

    def _join(self, node: fx.Node, a: Label, b: Label) -> None:
        """Two tensors permuted alike: their groups join run by run."""
        if a.layout() != b.layout():
            raise self.refuse(
                node,
                f"it combines tensors whose permuted axes are split differently "
                f"({list(a.layout())} and {list(b.layout())})",
            )
        for x, y in zip(a.segs, b.segs, strict=True):
            bx, by = self.groups.block(x), self.groups.block(y)
            if bx is not None and by is not None and bx != by:
                raise self.refuse(
                    node, f"it combines units of [{min(bx, by)}, {max(bx, by)}] entries"
                )
            self.groups.union(x.gid, y.gid)

    def concat(self, node: fx.Node) -> Label | None:
        """Along the permuted axis, the inputs' runs follow one another; along another axis the
        inputs are permuted alike."""
        tensors = node.args[0] if node.args else node.kwargs["tensors"]
        if isinstance(tensors, fx.Node):
            raise self.refuse(node, "it concatenates a sequence the graph computes")
        out = _shape(node)
        dim = _dim_arg(node, 1, len(out))
        labels = [self.label(t) for t in tensors]
        known = [lab for lab in labels if lab is not None]
        if not known:
            return None
        if len({lab.dim for lab in known}) > 1:
            raise self.refuse(node, "it concatenates tensors permuted along different axes")
        if dim != known[0].dim:
            for lab in labels:
                if lab is None:
                    for seg in known[0].segs:
                        self.groups.union(seg.gid, FIXED)
                else:
                    self._join(node, known[0], lab)
            return known[0]
        segs, at = [], 0
        for t, lab in zip(tensors, labels, strict=True):
            segs += [s.shifted(at) for s in (lab.segs if lab is not None else ())]
            at += _shape(t)[dim]
        return Label(dim, tuple(segs))

    def split(self, node: fx.Node) -> tuple[Label | None, ...]:
        """Along the permuted axis each part keeps the runs it holds whole (a split that cuts a
        group's units apart is refused); along another axis each part keeps the label."""
        source, before = self.label(_first(node)), _shape(_first(node))
        metas = node.meta["tensor_meta"]
        if source is None:
            return tuple(None for _ in metas)
        dim = _dim_arg(node, 2, len(before))
        if dim != source.dim:
            return tuple(source for _ in metas)
        sizes = [meta.shape[dim] for meta in metas]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        runs = [(a, a + n) for a, n in zip(starts, sizes, strict=True)]
        return tuple(self._parts(node, source, runs))

    def per_channel(
        self, node: fx.Node, source: Label | None, spatial: bool = True
    ) -> Label | None:
        """An operation that keeps every channel's values in that channel (`spatial`: one that
        works over the axes after the channels, pooling or resizing)."""
        if source is None:
            return None
        before, after = _shape(_first(node)), _shape(node)
        d = source.dim
        if spatial and d != 1:
            raise self.refuse(node, f"it pools or resizes a tensor permuted along axis {d}")
        if (
            after is None
            or len(after) != len(before)
            or (after[0], after[d]) != (before[0], before[d])
        ):
            raise self.refuse(
                node, f"it changes the batch or permuted axis of {before} into {after}"
            )
        return source

    def layer_norm(self, node: fx.Node) -> Label | None:
        """F.layer_norm with the module's own weight and bias (a channels-last LayerNorm)."""
        source, shape = self.label(_first(node)), _shape(_first(node))
        normalized = node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"]
        normalized = (normalized,) if isinstance(normalized, int) else tuple(normalized)
        self._layer_norm(node, normalized, source, shape)
        self.norms = True
        names = ("weight", "bias")
        for at, name in enumerate(names, start=2):
            arg = node.args[at] if len(node.args) > at else node.kwargs.get(name)
            if isinstance(arg, fx.Node) and arg in self.attrs:
                self.groups.add(source, self.attrs[arg], 0)
            elif arg is not None and source is not None:
                raise self.refuse(node, f"its {name} is computed in the graph")
        return source

    def reshape(self, node: fx.Node, source: Label | None) -> Label | None:
        """A reshape of each example keeps its values in order: a unit's run of entries stays
        whole, over one or more channels (a flatten makes features in blocks of h*w)."""
        if source is None:
            return None
        before, after = _shape(_first(node)), _shape(node)
        if source.dim != 1:
            raise self.refuse(node, f"a reshape of a tensor permuted along axis {source.dim}")
        inner = math.prod(before[2:])  # entries of one channel, contiguous in an example
        each = after is not None and len(after) >= 2 and after[0] == before[0]  # per example
        channel = math.prod(after[2:]) if each else 0
        if channel and len(after) == len(before) + 1 and after[1] * after[2] == before[1]:
            raise self.refuse(
                node,
                f"it splits the channels {before} into {after[1]} x {after[2]} (a channel "
                "shuffle, as in ShuffleNet, interleaves the units of different groups)",
            )
        fits = channel and math.prod(after[1:]) == math.prod(before[1:])
        for seg in source.segs if fits else ():
            block = self.groups.block(seg) or Fraction(1)
            fits = all(
                (Fraction(v) * inner / channel).denominator == 1
                for v in (block, seg.offset, seg.extent)
            )
            if not fits:
                break
        if not fits:
            raise self.refuse(node, f"reshaping {before} to {after} moves the permuted axis 1")
        return Label(1, tuple(s.scaled(inner, channel) for s in source.segs))

    def transpose(self, node: fx.Node, source: Label | None) -> Label | None:
        """A permute or transpose moves the permuted axis (channels-last and back)."""
        if source is None:
            return None
        moved = _moved_axis(node, len(_shape(_first(node))), source.dim)
        if moved is None:
            raise self.refuse(node, "it moves the batch axis, or axes the graph computes")
        return Label(moved, source.segs)

    def reduce(self, node: fx.Node, at: int) -> Label | None:
        """Over the permuted axis the result is invariant to its order; over other axes it
        stays (moved down by the axes before it that a reduction drops)."""
        source, before = self.label(_first(node)), _shape(_first(node))
        if source is None:
            return None
        dims = node.args[at] if len(node.args) > at else node.kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else tuple(dims or range(len(before)))
        axes = {d % len(before) for d in dims}
        if source.dim in axes:
            return None
        dropped = len(_shape(node)) != len(before)
        if 0 in axes and dropped:
            raise self.refuse(node, "a reduction over the batch moves the permuted axis")
        shift = sum(a < source.dim for a in axes) if dropped else 0
        return Label(source.dim - shift, source.segs)

    def index(self, node: fx.Node) -> Label | None:
        """Indexing that keeps the batch and permuted axes whole (x[:, :, 1:]) keeps the label;
        a slice of the permuted axis keeps the runs it holds whole (x[:, :64])."""
        labelled, index = self.labelled(node), node.args[1]
        if not labelled:
            return None
        source = self.label(node.args[0])
        index = index if isinstance(index, tuple) else (index,)
        plain = labelled == [node.args[0]] and len(node.all_input_nodes) == 1
        lead = index[: source.dim] if source is not None else ()
        if plain and len(index) > source.dim and all(i == slice(None) for i in lead):
            at = index[source.dim]
            if at == slice(None):
                return source
            if isinstance(at, slice) and at.step in (None, 1):
                return self._sliced(node, source, at)
        raise self.refuse(node, "indexing picks or moves units of the permuted axis")

    def _sliced(self, node: fx.Node, source: Label, at: slice) -> Label | None:
        size = _shape(node.args[0])[source.dim]
        start, stop, _ = at.indices(size)
        (part,) = self._parts(node, source, [(start, stop)])
        return part

    def _parts(self, node: fx.Node, source: Label, runs: list[tuple[int, int]]) -> list:
        parts = []
        for start, stop in runs:
            inside = tuple(
                s for s in source.segs if start <= s.offset and s.offset + s.extent <= stop
            )
            cut = [
                s
                for s in source.segs
                if s.offset < stop and s.offset + s.extent > start and s not in inside
            ]
            if cut:
                raise self.refuse(
                    node,
                    f"the part [{start}, {stop}) of axis {source.dim} cuts a group's units "
                    f"[{cut[0].offset}, {cut[0].offset + cut[0].extent}) apart",
                )
            parts.append(
                Label(source.dim, tuple(s.shifted(-start) for s in inside)) if inside else None
            )
        return parts


# --- running the module once: graph, shapes -------------------------------------------------


def _check_module(model: nn.Module) -> None:
    """Refuse what torch.fx or ShapeProp would fail on deep inside torch."""
    name = type(model).__name__
    meta = next((k for k, t in model.state_dict().items() if t.is_meta), None)
    if meta is not None:
        raise DeepAlignError(
            f"{name}: '{meta}' is on the meta device (a shape, no values): load or "
            "materialise its weights (module.to_empty(device='cpu')) first"
        )
    if fx.Tracer().is_leaf_module(model, ""):
        raise DeepAlignError(
            f"{name} is a single torch.nn layer, not a network of them: it has no hidden units "
            "to permute"
        )


def _len(obj: object) -> object:
    """`len` while tracing: a traced tensor's length is recorded as `x.size(0)`."""
    return obj.size(0) if isinstance(obj, fx.Proxy) else len(obj)


@contextlib.contextmanager
def _len_recorded(model: nn.Module) -> Iterator[None]:
    """Let the model's own forward code call `len(x)` (torch.fx refuses it on a traced tensor)."""
    spaces = {}
    for m in model.modules():
        forward = type(m).forward
        space = getattr(forward, "__globals__", None)
        ours = not (getattr(forward, "__module__", None) or "torch").startswith("torch")
        if space is not None and "len" not in space and ours:
            spaces[id(space)] = space
    for space in spaces.values():
        space["len"] = _len
    try:
        yield
    finally:
        for space in spaces.values():
            if space.get("len") is _len:
                del space["len"]


def _graph(model: nn.Module) -> fx.GraphModule:
    try:
        with _len_recorded(model):
            return fx.symbolic_trace(model)
    except Exception as e:  # torch.fx raises many kinds on control flow and custom code
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DeepAlignError(
            f"{type(model).__name__} cannot be traced by torch.fx ({first[:200]})"
        ) from e


class _Failed(Exception):
    def __init__(self, node: fx.Node) -> None:
        self.node = node


class _Shapes(fx.Interpreter):
    """ShapeProp's record (`meta['tensor_meta']`, a tuple of them for a tuple of tensors),
    without its printed traceback: a failure names its node."""

    def run_node(self, n: fx.Node) -> object:
        try:
            result = super().run_node(n)
        except Exception as e:
            raise _Failed(n) from e
        found = []

        def record(value: object) -> object:
            if not isinstance(value, torch.Tensor):
                return value
            found.append(value)
            return _extract_tensor_metadata(value)

        meta = fx.node.map_aggregate(result, record)
        if found:
            n.meta["tensor_meta"] = meta
        return result


def _propagate(gm: fx.GraphModule, example: torch.Tensor, root: str) -> None:
    """Record every node's output shape (eval mode: batch statistics need no batch)."""
    mode = gm.training
    try:
        with torch.no_grad():
            _Shapes(gm.eval()).run(example)
    except _Failed as e:
        where = operation(e.node, dict(gm.named_modules()), root)
        raise DeepAlignError(
            f"{root} does not run on an input of shape {tuple(example.shape)} "
            f"({where}: {_first_line(e.__cause__)})"
        ) from e.__cause__
    finally:
        gm.train(mode)


class Tap(NamedTuple):
    """Where a group's activations can be read: a graph node's output, the run
    [offset, offset + extent) of its axis `dim`."""

    node: str
    dim: int
    offset: int
    extent: int


@dataclass(frozen=True)
class Traced:
    """What the graph says about a network: its spec, where each group's activations can be
    read (a residual group has several taps), and which symmetries beyond permutations hold."""

    spec: PermSpec
    taps: dict[str, tuple[Tap, ...]]  # group -> graph nodes whose outputs hold its activations
    graph: fx.GraphModule
    activations: frozenset[str]  # nonlinearities in the network ('relu', 'tanh', ...)
    norms: bool  # has normalisation layers

    @property
    def rescalable(self) -> bool:
        """Whether scaling a unit's inputs by s > 0 and its outputs by 1/s keeps the function:
        positively homogeneous activations only, and no normalisation undoing the scale."""
        return (
            bool(self.activations)
            and self.activations <= POSITIVELY_HOMOGENEOUS
            and (not self.norms)
        )


# torch.fx patches nn.Module.__call__ for the whole process while it traces: a second thread's
# trace (its ShapeProp runs modules) would call into the first one's tracer and fail
_FX_LOCK = threading.Lock()


def trace(model: nn.Module, example: torch.Tensor) -> Traced:
    """Trace `model` on one example batch (N >= 1, any values): groups 'h0', 'h1', ... in the
    order they first appear in the forward pass. One trace at a time per process."""
    _check_module(model)
    root = type(model).__name__
    with _FX_LOCK:
        gm = _graph(model)
        _propagate(gm, example, root)
    tracer = _Tracer(dict(gm.named_modules()), root, frozenset(model.state_dict()))
    tracer.run(gm)
    spec, names = _spec(tracer.groups, model)
    taps = _taps(tracer, names)
    return Traced(spec, taps, gm, frozenset(tracer.activations), tracer.norms)


def trace_spec(model: nn.Module, example: torch.Tensor) -> PermSpec:
    """The permutation spec of `model` (see `trace`)."""
    return trace(model, example).spec


def _nodes_by_group(
    tracer: _Tracer, names: dict[int, str], nodes: list[tuple[int, fx.Node, int, int, int]]
) -> dict[str, list[Tap]]:
    found: dict[str, list[Tap]] = {}
    for gid, node, dim, offset, extent in nodes:
        group = names.get(tracer.groups.find(gid))
        tap = Tap(node.name, dim, offset, extent)
        if group is not None and tap not in found.setdefault(group, []):
            found[group].append(tap)
    return found


def _taps(tracer: _Tracer, names: dict[int, str]) -> dict[str, tuple[Tap, ...]]:
    """Per group, the activations it flows through, else the layer outputs that make it."""
    activations = _nodes_by_group(tracer, names, tracer.taps)
    layers = _nodes_by_group(tracer, names, tracer.starts)
    return {g: tuple(activations.get(g) or layers.get(g, [])) for g in names.values()}


# --- tied weights and the spec ------------------------------------------------------------------


def _aliases(model: nn.Module) -> list[list[str]]:
    """State_dict keys naming one tensor (tied weights, a module under two names)."""
    by_storage: dict[tuple, list[str]] = {}
    for key, t in model.state_dict().items():
        if t.numel():
            where = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
            by_storage.setdefault(where, []).append(key)
    return [keys for keys in by_storage.values() if len(keys) > 1]


def _tie(groups: _Groups, aliases: list[list[str]]) -> None:
    """Every key of a tied tensor permuted on the runs of each: one tensor, one permutation."""
    for keys in aliases:
        runs = [
            (gid, axis, offset, extent) for gid, k, axis, offset, extent in groups.axes if k in keys
        ]
        groups.axes += [(gid, k, *run) for gid, *run in runs for k in keys]


def _units(groups: _Groups, root: int, runs: list[tuple[str, int, int, int]]) -> int:
    """How many units a group permutes: the units its layers made, moved `together` at a time."""
    counts = {u for gid, u in groups.units.items() if groups.find(gid) == root}
    if len(counts) != 1:
        listed = ", ".join(f"'{key}'[{axis}]" for key, axis, _, _ in runs[:6])
        raise DeepAlignError(f"tied units of different counts {sorted(counts)}: {listed}")
    units, together = counts.pop(), groups.together.get(root, 1)
    if units % together:
        raise DeepAlignError(f"{units} units cannot move {together} at a time")
    return units // together


def _spec(groups: _Groups, model: nn.Module) -> tuple[PermSpec, dict[int, str]]:
    """Groups (FIXED left out) with their runs and sizes, each run in one group only; and the
    name of each group's root id."""
    _tie(groups, _aliases(model))
    by_run: dict[tuple[str, int, int, int], int] = {}
    for gid, *run in groups.axes:  # a module called twice: one run in two groups joins them
        groups.union(gid, by_run.setdefault(tuple(run), gid))
    runs: dict[int, list[tuple[str, int, int, int]]] = {}
    for gid, *run in groups.axes:
        root = groups.find(gid)
        if root != FIXED and tuple(run) not in runs.setdefault(root, []):
            runs[root].append(tuple(run))
    names = {root: f"h{i}" for i, root in enumerate(sorted(runs))}
    members, sizes = {}, {}
    for root, found in sorted(runs.items()):
        n = _units(groups, root, found)
        for key, axis, _, extent in found:
            if extent % n:
                raise DeepAlignError(f"'{key}' axis {axis}: {extent} entries for {n} units")
        members[names[root]] = tuple(
            Axis(k, axis, extent // n, offset) for k, axis, offset, extent in found
        )
        sizes[names[root]] = n
    return PermSpec(members, sizes), names


SpecFn = Callable[[nn.Module, torch.Tensor], PermSpec]
