"""The permutation spec of a PyTorch module, read from its `torch.fx` graph.

Every tensor flowing through the graph carries a label for its channel axis (dim 1: the
features of an (N, F) tensor, the channels of an (N, C, ...) one): the hidden group that
permutes it, and how many entries each unit owns there (1, or h*w after a flatten). A tensor
with no permuted axis (the input, a mean over the channels) has none. A Linear or a Conv starts
a new group for its outputs; normalisation layers, activations, pooling, dropout and upsampling
carry their input's label through (their own weights and running statistics follow the
channel); an elementwise operation of several tensors (`+ - * /`, `torch.maximum`,
`torch.where`, comparisons, ...) merges their groups (union-find), so a residual stream is one
group; a reshape that keeps each example's values in order (a flatten) keeps the label, in
blocks. The network's inputs and outputs are never permuted: a group that reaches an output, or
meets an input, is fixed. An operation of tensors with no permuted axis is followed whatever it
is. One tensor under two state_dict keys (tied weights) is permuted alike under both. Anything
else (attention, concatenation, recurrent layers, code torch.fx cannot trace) stops with one
line naming the operation and the module it sits in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import operator
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from deepalign.core.permspec import Axis, PermSpec
from deepalign.errors import DeepAlignError

FIXED = 0  # the group of everything that must not be permuted (inputs, outputs)
Label = tuple[int, int] | None  # (group id, entries per unit) of a tensor's channel axis

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
PER_CHANNEL = {  # each channel's values stay in that channel: the first tensor's label
    F.dropout, F.dropout1d, F.dropout2d, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.softmax,
    F.log_softmax, F.interpolate, F.normalize, abs, operator.neg, operator.pos, operator.invert,
    "contiguous", "clone", "detach", "float", "to", "type_as",
    *(getattr(torch, name) for name in _UNARY), *_UNARY, *(name + "_" for name in _UNARY),
}  # fmt: skip
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


def _keeps_leading_axes(node: fx.Node, ndim: int) -> bool:
    """Whether a permute or transpose leaves axes 0 and 1 in place: the same call made on an
    empty tensor whose axis sizes name its axes."""
    if ndim > len(AXIS_NAMES) or len(node.all_input_nodes) != 1:
        return False  # more axes than names, or axes computed in the graph
    probe = torch.empty(AXIS_NAMES[:ndim], device="meta")
    try:
        if node.target is getattr:  # x.T, x.mT
            out = getattr(probe, node.args[1])
        elif node.op == "call_method":
            out = getattr(probe, node.target)(*node.args[1:], **node.kwargs)
        else:
            out = node.target(probe, *node.args[1:], **node.kwargs)
    except (RuntimeError, TypeError, IndexError):
        return False
    return tuple(out.shape[:2]) == AXIS_NAMES[:2]


@dataclass
class _Groups:
    """Union-find over group ids, and every tensor axis each group permutes."""

    parent: dict[int, int] = field(default_factory=lambda: {FIXED: FIXED})
    axes: list[tuple[int, Axis]] = field(default_factory=list)

    def new(self) -> int:
        gid = len(self.parent)
        self.parent[gid] = gid
        return gid

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # FIXED (0) stays the root of whatever joins it
            self.parent[max(ra, rb)] = min(ra, rb)

    def add(self, label: Label, key: str, axis: int) -> None:
        if label is not None:
            self.axes.append((label[0], Axis(key, axis, label[1])))


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


@dataclass
class _Tracer:
    modules: dict[str, nn.Module]
    root: str  # the traced module's class name
    groups: _Groups = field(default_factory=_Groups)
    labels: dict[fx.Node, Label] = field(default_factory=dict)
    taps: list[tuple[int, fx.Node]] = field(default_factory=list)  # activations, by group id
    starts: list[tuple[int, fx.Node]] = field(default_factory=list)  # layer outputs, by group
    activations: set[str] = field(default_factory=set)  # kinds of nonlinearity seen
    norms: bool = False  # a normalisation layer is on some path

    def refuse(self, node: fx.Node, why: str) -> DeepAlignError:
        """One line naming the operation, the module it sits in, and why."""
        what = operation(node, self.modules, self.root)
        return DeepAlignError(f"{what} cannot be permuted safely: {why}")

    def tap(self, node: fx.Node, kind: str, label: Label) -> Label:
        """Record an activation: its kind, and its output as a tap of its group."""
        self.activations.add(kind)
        if label is not None:
            self.taps.append((label[0], node))
        return label

    def label(self, arg: object) -> Label:
        return self.labels.get(arg) if isinstance(arg, fx.Node) else None

    def labelled(self, node: fx.Node) -> list[fx.Node]:
        """The node's inputs that have a permuted axis."""
        return [n for n in node.all_input_nodes if self.labels.get(n) is not None]

    def run(self, gm: fx.GraphModule) -> None:
        for node in gm.graph.nodes:
            try:
                self.labels[node] = self.visit(node)
            except DeepAlignError:
                raise
            except Exception as e:  # arguments laid out in a way this reading does not know
                raise self.refuse(node, f"its arguments cannot be read ({_first_line(e)})") from e

    def visit(self, node: fx.Node) -> Label:
        if node.op == "output":
            self._fix_output(node.args)
        elif node.op == "get_attr":
            raise self.refuse(node, "the forward reads it directly, not through a module")
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
        elif self.label(arg) is not None:
            self.groups.union(self.label(arg)[0], FIXED)

    # --- modules ----------------------------------------------------------------------------

    def module(self, node: fx.Node, mod: nn.Module) -> Label:
        source = self.label(_first(node))
        if isinstance(mod, nn.Linear):
            return self._started(node, self._layer(node, mod, source, needs_ndim=2))
        if isinstance(mod, nn.modules.conv._ConvNd):
            return self._started(node, self._conv(node, mod, source))
        if isinstance(mod, NORMS):
            self._norm(node, mod, source)
            self.norms = True
            return source
        if isinstance(mod, nn.PReLU):
            if mod.num_parameters > 1:
                self.groups.add(source, f"{node.target}.weight", 0)
            return self.tap(node, "prelu", source)
        if isinstance(mod, ACTIVATIONS):
            kind = "leaky_relu" if isinstance(mod, nn.LeakyReLU) else type(mod).__name__.lower()
            return self.tap(node, kind, source)
        if isinstance(mod, nn.Flatten | nn.Unflatten):
            return self.reshape(node, source)
        if isinstance(mod, PASS_MODULES):
            return self.per_channel(node, source)
        raise self.refuse(node, "it is not known to act per channel")

    def _started(self, node: fx.Node, label: Label) -> Label:
        if label is not None:
            self.starts.append((label[0], node))
        return label

    def _layer(self, node: fx.Node, mod: nn.Module, source: Label, needs_ndim: int) -> Label:
        shape = _shape(_first(node))
        if shape is not None and len(shape) != needs_ndim:
            raise self.refuse(node, f"it gets a {len(shape)}-D input; (N, features) only")
        name, out = node.target, self.groups.new()
        self.groups.add(source, f"{name}.weight", 1)
        self.groups.add((out, 1), f"{name}.weight", 0)
        if getattr(mod, "bias", None) is not None:
            self.groups.add((out, 1), f"{name}.bias", 0)
        return (out, 1)

    def _conv(self, node: fx.Node, mod: nn.modules.conv._ConvNd, source: Label) -> Label:
        if source is not None and source[1] != 1:
            raise self.refuse(node, "a convolution after a flatten")
        if mod.transposed:
            raise self.refuse(node, "transposed convolutions are not supported")
        if mod.groups == 1:
            name, out = node.target, self.groups.new()
            self.groups.add(source, f"{name}.weight", 1)
            self.groups.add((out, 1), f"{name}.weight", 0)
            if mod.bias is not None:
                self.groups.add((out, 1), f"{name}.bias", 0)
            return (out, 1)
        if mod.groups == mod.in_channels == mod.out_channels:  # depthwise: per channel
            self.groups.add(source, f"{node.target}.weight", 0)
            if mod.bias is not None:
                self.groups.add(source, f"{node.target}.bias", 0)
            return source
        raise self.refuse(node, f"a grouped convolution ({mod.groups} groups) mixes channels")

    def _norm(self, node: fx.Node, mod: nn.Module, source: Label) -> None:
        shape = _shape(_first(node)) or ()
        if isinstance(mod, nn.GroupNorm) and mod.num_groups not in (1, mod.num_channels):
            raise self.refuse(node, f"GroupNorm with {mod.num_groups} groups mixes channels")
        if isinstance(mod, nn.LayerNorm) and (
            len(mod.normalized_shape) != len(shape) - 1 or mod.normalized_shape[0] != shape[1]
        ):
            raise self.refuse(node, "LayerNorm over other axes than channels (and space)")
        if source is not None and source[1] != 1:
            raise self.refuse(node, "a normalisation after a flatten")
        for key, _ in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
            if key != "num_batches_tracked":
                self.groups.add(source, f"{node.target}.{key}", 0)

    # --- functions and Tensor methods --------------------------------------------------------

    def call(self, node: fx.Node) -> Label:
        """A function or method, by what its operation does to the channel axis."""
        op = node.target if node.target is not getattr else node.args[1]
        if "tensor_meta" not in node.meta:  # sizes and other plain values
            if op in SIZES or not self.labelled(node):
                return None
            raise self.refuse(node, "it turns permuted values into plain Python values")
        if op in ELEMENTWISE:
            return self.elementwise(node)
        if op in ACTIVATION_OPS:
            return self.tap(node, ACTIVATION_OPS[op], self.label(_first(node)))
        if op in PER_CHANNEL or op == "data":
            return self.per_channel(node, self.label(_first(node)))
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

    def elementwise(self, node: fx.Node) -> Label:
        """Every operand that varies along the output's channel axis joins one group (an
        operand broadcast along it, a per-example scalar (N, 1), joins none)."""
        out = _shape(node)
        if out is None:
            raise self.refuse(node, "it returns several tensors")
        ids, blocks = [], set()
        for arg in node.all_input_nodes:
            shape, label = _shape(arg), self.labels.get(arg)
            if shape is None:
                continue  # a size or other plain value
            lead = len(out) - len(shape)  # broadcasting aligns the trailing axes
            if label is not None and lead > 0:
                raise self.refuse(node, "it broadcasts a permuted axis onto another axis")
            if 0 <= 1 - lead < len(shape) and shape[1 - lead] != 1:
                ids.append(label[0] if label else FIXED)
                blocks |= {label[1]} if label else set()
        if len(blocks) > 1:
            raise self.refuse(node, f"it combines units of {sorted(blocks)} entries")
        for other in ids[1:]:
            self.groups.union(ids[0], other)
        return (ids[0], blocks.pop()) if blocks else None

    def per_channel(self, node: fx.Node, source: Label) -> Label:
        """An operation that keeps every channel's values in that channel."""
        before, after = _shape(_first(node)), _shape(node)
        if source is not None and (after is None or after[:2] != before[:2]):
            raise self.refuse(node, f"it changes the axes (N, C) {before} into {after}")
        return source

    def reshape(self, node: fx.Node, source: Label) -> Label:
        """A reshape of each example keeps its values in order: a unit's run of entries stays
        whole, over one or more channels (a flatten makes features in blocks of h*w)."""
        if source is None:
            return None
        before, after = _shape(_first(node)), _shape(node)
        run = source[1] * math.prod(before[2:])  # a unit's entries, contiguous in an example
        each = after is not None and len(after) >= 2 and after[0] == before[0]  # per example
        channel = math.prod(after[2:]) if each else 0
        if not channel or run % channel or math.prod(after[1:]) != math.prod(before[1:]):
            raise self.refuse(node, f"reshaping {before} to {after} moves the permuted axis 1")
        return (source[0], run // channel)

    def transpose(self, node: fx.Node, source: Label) -> Label:
        if source is not None and not _keeps_leading_axes(node, len(_shape(_first(node)))):
            raise self.refuse(node, "it moves the batch or the permuted axis")
        return source

    def reduce(self, node: fx.Node, at: int) -> Label:
        """Over the channels the result is invariant to their order; over other axes the
        channels stay."""
        source, before = self.label(_first(node)), _shape(_first(node))
        if source is None:
            return None
        dims = node.args[at] if len(node.args) > at else node.kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else tuple(dims or range(len(before)))
        axes = {d % len(before) for d in dims}
        if 1 in axes:
            return None
        if 0 in axes and len(_shape(node)) != len(before):
            raise self.refuse(node, "a reduction over the batch moves the permuted axis")
        return source

    def index(self, node: fx.Node) -> Label:
        """Indexing that keeps the batch and channel axes whole (x[:, :, 1:]) keeps the label."""
        labelled, index = self.labelled(node), node.args[1]
        if not labelled:
            return None
        whole = isinstance(index, tuple) and index[:2] == (slice(None), slice(None))
        if whole and labelled == [node.args[0]] and len(node.all_input_nodes) == 1:
            return self.label(node.args[0])
        raise self.refuse(node, "indexing picks or moves units of the permuted axis")


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


@dataclass(frozen=True)
class Traced:
    """What the graph says about a network: its spec, where each group's activations can be
    read (a residual group has several taps), and which symmetries beyond permutations hold."""

    spec: PermSpec
    taps: dict[str, tuple[str, ...]]  # group -> graph nodes whose outputs are its activations
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
    tracer = _Tracer(dict(gm.named_modules()), root)
    tracer.run(gm)
    spec, names = _spec(tracer.groups, model)
    taps = _taps(tracer, names)
    return Traced(spec, taps, gm, frozenset(tracer.activations), tracer.norms)


def trace_spec(model: nn.Module, example: torch.Tensor) -> PermSpec:
    """The permutation spec of `model` (see `trace`)."""
    return trace(model, example).spec


def _nodes_by_group(
    tracer: _Tracer, names: dict[int, str], nodes: list[tuple[int, fx.Node]]
) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for gid, node in nodes:
        group = names.get(tracer.groups.find(gid))
        if group is not None and node.name not in found.setdefault(group, []):
            found[group].append(node.name)
    return found


def _taps(tracer: _Tracer, names: dict[int, str]) -> dict[str, tuple[str, ...]]:
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
    """Every key of a tied tensor permuted on the axes of each: one tensor, one permutation."""
    for keys in aliases:
        axes = [(gid, ax) for gid, ax in groups.axes if ax.key in keys]
        for gid, ax in axes:
            clash = [
                o for _, o in axes if o.key != ax.key and o.axis == ax.axis and o.block != ax.block
            ]
            if clash:
                raise DeepAlignError(
                    f"tied tensors '{ax.key}' and '{clash[0].key}' (one tensor) are read in "
                    f"different layouts on axis {ax.axis}: units of {ax.block} and "
                    f"{clash[0].block} entries"
                )
            groups.axes += [(gid, dataclasses.replace(ax, key=k)) for k in keys if k != ax.key]


def _spec(groups: _Groups, model: nn.Module) -> tuple[PermSpec, dict[int, str]]:
    """Groups (FIXED left out) with their axes and sizes, each axis in one group only; and the
    name of each group's root id."""
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    _tie(groups, _aliases(model))
    by_axis: dict[tuple[str, int], int] = {}
    for gid, ax in groups.axes:  # a module called twice: one axis in two groups joins them
        other = by_axis.setdefault((ax.key, ax.axis), gid)
        groups.union(gid, other)
    members: dict[int, list[Axis]] = {}
    for gid, ax in groups.axes:
        root = groups.find(gid)
        if root != FIXED and ax not in members.setdefault(root, []):
            members[root].append(ax)
    names = {root: f"h{i}" for i, root in enumerate(sorted(members))}
    sizes = {}
    for root, axes in sorted(members.items()):
        counts = {shapes[ax.key][ax.axis] // ax.block for ax in axes}
        if len(counts) != 1:
            listed = ", ".join(f"{ax.key}[{ax.axis}]" for ax in axes[:6])
            raise DeepAlignError(f"tied units of different counts {sorted(counts)}: {listed}")
        sizes[names[root]] = counts.pop()
    return PermSpec({names[r]: tuple(a) for r, a in sorted(members.items())}, sizes), names


SpecFn = Callable[[nn.Module, torch.Tensor], PermSpec]
