"""The permutation spec of a PyTorch module, read from its `torch.fx` graph.

Every tensor flowing through the graph carries a label for its channel axis (dim 1: the
features of an (N, F) tensor, the channels of an (N, C, ...) one): the hidden group that
permutes it, and how many entries each unit owns there (1, or h*w after a flatten). A Linear or
a Conv starts a new group for its outputs; normalisation layers, activations, pooling, dropout
and flatten carry their input's label through (their own weights and running statistics follow
the channel); an addition or product of two tensors merges their groups (union-find), so a
residual stream is one group. The network's inputs and outputs are never permuted: a group
that reaches an output, or is added to an input, is fixed. Anything else (attention,
concatenation, a custom op, code torch.fx cannot trace) stops with one line naming it.
"""

from __future__ import annotations

import math
import operator
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from deepalign.core.permspec import Axis, PermSpec
from deepalign.errors import DeepAlignError

FIXED = 0  # the group of everything that must not be permuted (inputs, outputs)
Label = tuple[int, int] | None  # (group id, entries per unit) of a tensor's channel axis

PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Softmax, nn.LogSoftmax,
)  # fmt: skip
PASS_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, F.hardtanh,
    F.hardswish, F.softplus, F.dropout, F.dropout1d, F.dropout2d, F.max_pool1d, F.max_pool2d,
    F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d, F.softmax, F.log_softmax, torch.relu, torch.sigmoid, torch.tanh,
    torch.sigmoid, torch.exp, torch.abs, F.sigmoid, F.tanh, operator.neg, operator.pos,
    torch.neg, torch.clamp, torch.softmax, torch.log_softmax,
}  # fmt: skip
PASS_METHODS = {
    "relu", "sigmoid", "tanh", "exp", "abs", "neg", "clamp", "contiguous", "clone", "detach",
    "softmax", "log_softmax", "float", "to", "type_as",
}  # fmt: skip
ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.PReLU,
)  # fmt: skip
ACTIVATION_FUNCTIONS = {
    F.relu: "relu", torch.relu: "relu", F.leaky_relu: "leaky_relu", F.gelu: "gelu",
    F.silu: "silu", F.elu: "elu", F.mish: "mish", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
    torch.tanh: "tanh", F.tanh: "tanh", F.relu6: "relu6", F.hardtanh: "hardtanh",
    F.softplus: "softplus", F.hardswish: "hardswish", F.selu: "selu", torch.sin: "sin",
    torch.cos: "cos",
}  # fmt: skip
ACTIVATION_METHODS = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh", "sin": "sin"}
# ReLU(s x) = s ReLU(x) for s > 0: scaling a unit's inputs by s and its outputs by 1/s keeps the
# function. No other activation here has that symmetry.
POSITIVELY_HOMOGENEOUS = {"relu", "leaky_relu", "prelu"}
MERGING = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul,
           operator.imul, torch.add, torch.sub, torch.mul}  # fmt: skip
SCALING = {operator.truediv, operator.itruediv, torch.div}
MERGING_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_"}
NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


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


def _refuse(node: fx.Node, what: str, why: str) -> DeepAlignError:
    return DeepAlignError(f"{what} '{node.target}' cannot be permuted safely: {why}")


def _shape(node: fx.Node | object) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


@dataclass
class _Tracer:
    modules: dict[str, nn.Module]
    groups: _Groups = field(default_factory=_Groups)
    labels: dict[fx.Node, Label] = field(default_factory=dict)
    taps: list[tuple[int, fx.Node]] = field(default_factory=list)  # activations, by group id
    starts: list[tuple[int, fx.Node]] = field(default_factory=list)  # layer outputs, by group
    activations: set[str] = field(default_factory=set)  # kinds of nonlinearity seen
    norms: bool = False  # a normalisation layer is on some path

    def tap(self, node: fx.Node, kind: str, label: Label) -> Label:
        """Record an activation: its kind, and its output as a tap of its group."""
        self.activations.add(kind)
        if label is not None:
            self.taps.append((label[0], node))
        return label

    def label(self, arg: object) -> Label:
        return self.labels.get(arg) if isinstance(arg, fx.Node) else None

    def merge(self, node: fx.Node, args: list[object]) -> Label:
        """The label of an elementwise op of several tensors: their groups become one."""
        tensors = [a for a in args if isinstance(a, fx.Node) and _shape(a) is not None]
        if len(tensors) < 2:
            return self.label(tensors[0]) if tensors else None
        labels = [self.label(a) for a in tensors]
        shapes = [_shape(a) for a in tensors]
        if any(len(s) < 2 or s[1] == 1 for s in shapes):  # a broadcast scalar per example
            return next((lb for lb in labels if lb), None)
        blocks = {lb[1] for lb in labels if lb}
        if len(blocks) > 1:
            raise _refuse(node, "operation", "it combines tensors of different layouts")
        ids = [lb[0] if lb else FIXED for lb in labels]
        for other in ids[1:]:
            self.groups.union(ids[0], other)
        return (ids[0], blocks.pop() if blocks else 1)

    def run(self, gm: fx.GraphModule) -> None:
        for node in gm.graph.nodes:
            if node.op == "output":
                self._fix_output(node.args)
            elif node.op == "placeholder":
                self.labels[node] = None
            elif node.op == "get_attr":
                raise _refuse(node, "tensor", "the forward reads it directly, not through a module")
            elif node.op == "call_module":
                self.labels[node] = self.module(node, self.modules[node.target])
            elif node.op == "call_function":
                self.labels[node] = self.function(node)
            elif node.op == "call_method":
                self.labels[node] = self.method(node)

    def _fix_output(self, arg: object) -> None:
        if isinstance(arg, list | tuple):
            for a in arg:
                self._fix_output(a)
        elif isinstance(arg, dict):
            for a in arg.values():
                self._fix_output(a)
        elif self.label(arg) is not None:
            self.groups.union(self.label(arg)[0], FIXED)

    def module(self, node: fx.Node, mod: nn.Module) -> Label:
        source = self.label(node.args[0]) if node.args else None
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
        if isinstance(mod, nn.Flatten):
            return self._flatten(node, source, mod.start_dim, mod.end_dim)
        if isinstance(mod, PASS_MODULES):
            return source
        raise _refuse(node, "module", f"{type(mod).__name__} is not known to act per channel")

    def _started(self, node: fx.Node, label: Label) -> Label:
        if label is not None:
            self.starts.append((label[0], node))
        return label

    def _layer(self, node: fx.Node, mod: nn.Module, source: Label, needs_ndim: int) -> Label:
        shape = _shape(node.args[0])
        if shape is not None and len(shape) != needs_ndim:
            raise _refuse(node, "module", f"it gets a {len(shape)}-D input; (N, features) only")
        name, out = node.target, self.groups.new()
        self.groups.add(source, f"{name}.weight", 1)
        self.groups.add((out, 1), f"{name}.weight", 0)
        if getattr(mod, "bias", None) is not None:
            self.groups.add((out, 1), f"{name}.bias", 0)
        return (out, 1)

    def _conv(self, node: fx.Node, mod: nn.modules.conv._ConvNd, source: Label) -> Label:
        if source is not None and source[1] != 1:
            raise _refuse(node, "module", "a convolution after a flatten")
        if mod.transposed:
            raise _refuse(node, "module", "transposed convolutions are not supported")
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
        raise _refuse(node, "module", f"a grouped convolution ({mod.groups} groups)")

    def _norm(self, node: fx.Node, mod: nn.Module, source: Label) -> None:
        shape = _shape(node.args[0]) or ()
        if isinstance(mod, nn.GroupNorm) and mod.num_groups not in (1, mod.num_channels):
            raise _refuse(node, "module", f"GroupNorm with {mod.num_groups} groups mixes channels")
        if isinstance(mod, nn.LayerNorm) and (
            len(mod.normalized_shape) != len(shape) - 1 or mod.normalized_shape[0] != shape[1]
        ):
            raise _refuse(node, "module", "LayerNorm over other axes than channels (and space)")
        if source is not None and source[1] != 1:
            raise _refuse(node, "module", "a normalisation after a flatten")
        for key, _ in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
            if key != "num_batches_tracked":
                self.groups.add(source, f"{node.target}.{key}", 0)

    def _flatten(self, node: fx.Node, source: Label, start: int, end: int) -> Label:
        shape = _shape(node.args[0])
        if shape is None or start != 1 or end not in (-1, len(shape) - 1):
            raise _refuse(node, "flatten", "only flatten(x, 1) of the whole example")
        if source is None:
            return None
        return (source[0], source[1] * math.prod(shape[2:]))

    def function(self, node: fx.Node) -> Label:
        fn = node.target
        if fn in MERGING:
            return self.merge(node, list(node.args))
        if fn in ACTIVATION_FUNCTIONS:
            return self.tap(node, ACTIVATION_FUNCTIONS[fn], self.label(node.args[0]))
        if fn in SCALING or fn in PASS_FUNCTIONS:  # per entry, or along one axis (softmax):
            return self.label(node.args[0])  # either way each channel keeps its place
        if fn is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self._flatten(node, self.label(node.args[0]), start, end)
        if _shape(node) is None:  # sizes and other non-tensor values
            return None
        raise _refuse(node, "function", "it is not known to act per channel")

    def method(self, node: fx.Node) -> Label:
        name, source = node.target, self.label(node.args[0])
        if name in MERGING_METHODS:
            return self.merge(node, list(node.args))
        if name in ACTIVATION_METHODS:
            return self.tap(node, ACTIVATION_METHODS[name], source)
        if name in PASS_METHODS:
            return source
        if name == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self._flatten(node, source, start, end)
        if name in ("view", "reshape"):
            return self._reshape(node, source)
        if name == "mean":
            return self._reduce(node, source)
        if _shape(node) is None or name in ("size", "dim"):
            return None
        raise _refuse(node, "method", "it is not known to act per channel")

    def _reshape(self, node: fx.Node, source: Label) -> Label:
        before, after = _shape(node.args[0]), _shape(node)
        if before and after and len(after) == 2 and after[0] == before[0] and len(before) >= 2:
            return self._flatten(node, source, 1, -1)
        if before == after:
            return source
        raise _refuse(node, "reshape", "only flattening each example")

    def _reduce(self, node: fx.Node, source: Label) -> Label:
        """A mean over space keeps the channels; over the channels it is invariant to them."""
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        ndim = len(_shape(node.args[0]) or ())
        if not dims or 1 in {d % ndim for d in dims}:
            return None
        return source


def _graph(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as e:  # torch.fx raises many kinds on control flow and custom code
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DeepAlignError(
            f"{type(model).__name__} cannot be traced by torch.fx ({first[:200]})"
        ) from e


def _propagate(gm: fx.GraphModule, example: torch.Tensor) -> None:
    """Record every node's output shape (eval mode: batch statistics need no batch)."""
    mode = gm.training
    try:
        with torch.no_grad():
            ShapeProp(gm.eval()).propagate(example)
    except Exception as e:
        raise DeepAlignError(
            f"{type(gm).__name__} does not run on an input of shape {tuple(example.shape)} "
            f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"
        ) from e
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
    with _FX_LOCK:
        gm = _graph(model)
        _propagate(gm, example)
    tracer = _Tracer(dict(gm.named_modules()))
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


def _spec(groups: _Groups, model: nn.Module) -> tuple[PermSpec, dict[int, str]]:
    """Groups (FIXED left out) with their axes and sizes, each axis in one group only; and the
    name of each group's root id."""
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    by_axis: dict[tuple[str, int], int] = {}
    for gid, ax in groups.axes:  # tied weights: one axis in two groups joins them
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
