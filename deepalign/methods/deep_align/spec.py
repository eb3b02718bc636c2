"""An encoder over any traced network's permutation spec (graph-metanetwork style), for
DEEP-ALIGN beyond chains.

Nodes are the units of each permutation group (a residual stream is one group, read and written
by several tensors). A tensor's role comes from the spec alone:
- two permuted axes (a Linear's or a Conv's weight, a residual Linear reading and writing one
  stream): an edge set between the two groups' units, its other entries (kernel taps, the
  Flatten block) the edge's features;
- one permuted axis (biases, norm weights and biases, running statistics, the first layer's
  weight over input pixels, the last one's over classes): features of its group's units, the
  unpermuted entries in their fixed positions (a learned linear map over them is a position
  embedding);
- none (the output bias): features of the whole network, given to every unit.
Each round, every edge set sends a message to both ends (an MLP of the edge and its two
units, averaged over the other end) and every unit updates from its state, its messages and
its group's mean. Means and per-unit maps commute with permuting any group's units, so the
features of group g's units move with them and nothing else changes (tests/test_spec_encoder.py).

For now one group per tensor axis: runs side by side (concatenation) or nested (grouped
convolutions) are refused by name. DEEP-ALIGN uses it for every network that is not a chain of
Linear/Conv2d layers with biases (`model.build_encoder`), and for chains when asked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepalign.core.permspec import PermSpec
from deepalign.core.weightspace import WeightSpace
from deepalign.errors import DeepAlignError


@dataclass(frozen=True)
class Role:
    """A tensor's place in the spec: the groups of its permuted axes (0, 1 or 2, in axis
    order), those axes, the entries each unit owns on them, and the entries left per unit
    (or unit pair): the tensor's canonical form is (B, *units, features)."""

    key: str
    groups: tuple[str, ...]
    axes: tuple[int, ...]
    blocks: tuple[int, ...]
    features: int


def roles_of(spec: PermSpec, shapes: dict[str, tuple[int, ...]]) -> list[Role]:
    """Every tensor's role, in the order of `shapes`; a layout the encoder cannot read yet
    is one line naming the tensor."""
    runs: dict[str, dict[int, list[tuple[str, int, int]]]] = {}
    for g in spec.groups:
        for ax in spec.acting(g):
            runs.setdefault(ax.key, {}).setdefault(ax.axis, []).append((g, ax.block, ax.offset))
    roles = []
    for key, shape in shapes.items():
        found = sorted(runs.get(key, {}).items())
        for axis, on in found:
            if len(on) > 1 or on[0][2] != 0:
                names = ", ".join(g for g, _, _ in on)
                raise DeepAlignError(
                    f"the spec encoder reads one group per tensor axis: '{key}' axis {axis} holds "
                    f"runs of {names} (a concatenation or a grouped convolution)"
                )
        if len(found) > 2:
            raise DeepAlignError(
                f"the spec encoder reads tensors of at most 2 permuted axes: '{key}'"
            )
        groups = tuple(on[0][0] for _, on in found)
        units = math.prod(spec.sizes[g] for g in groups)
        roles.append(
            Role(
                key,
                groups,
                tuple(axis for axis, _ in found),
                tuple(on[0][1] for _, on in found),
                max(1, math.prod(shape) // units),
            )
        )
    return roles


def canonical(t: Tensor, role: Role, sizes: dict[str, int]) -> Tensor:
    """(B, *shape) -> (B, *units, features): each permuted axis split into (units, block), the
    unit dims brought forward in axis order, the rest flattened in place."""
    batch, split, unit_dims = t.shape[0], [t.shape[0]], []
    for axis, size in enumerate(t.shape[1:]):
        if axis in role.axes:
            k = role.axes.index(axis)
            unit_dims.append(len(split))
            split += [sizes[role.groups[k]], role.blocks[k]]
        else:
            split.append(size)
    x = t.reshape(split).movedim(unit_dims, list(range(1, 1 + len(unit_dims))))
    return x.reshape(batch, *x.shape[1 : 1 + len(unit_dims)], -1)


def _pool(x: Tensor, dim: int) -> Tensor:
    """A symmetric reduction over one group's units (the mean; tests break it on purpose)."""
    return x.mean(dim)


def _mlp(inputs: int, dim: int, ratio: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, ratio * dim), nn.GELU(), nn.Linear(ratio * dim, dim))


class Message(nn.Module):
    """The message of an edge set to both of its ends: an MLP of (edge, unit a, unit b), pooled
    over the other end. Its first layer is applied to the three parts apart and summed, the
    same map as on their concatenation without building it; its second, linear, after the
    pooling, which commutes with it: per edge entry D x ratio*D multiply-adds instead of
    4 x ratio*D x D."""

    def __init__(self, dim: int, ratio: int) -> None:
        super().__init__()
        self.edge = nn.Linear(dim, ratio * dim)
        self.end_a = nn.Linear(dim, ratio * dim, bias=False)
        self.end_b = nn.Linear(dim, ratio * dim, bias=False)
        self.out = nn.Linear(ratio * dim, dim)

    def forward(self, e: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        # e: (B, n_a, n_b, D), a: (B, n_a, D), b: (B, n_b, D) -> (B, n_a, D), (B, n_b, D)
        z = self.edge(e) + self.end_a(a).unsqueeze(2) + self.end_b(b).unsqueeze(1)
        z = F.gelu(z)  # (B, n_a, n_b, ratio * D)
        return self.out(_pool(z, 2)), self.out(_pool(z, 1))


class SpecRound(nn.Module):
    """One round of messages along every edge set, both ways, then every unit's update."""

    def __init__(self, roles: list[Role], groups: list[str], dim: int, ratio: int) -> None:
        super().__init__()
        self.edges = [r for r in roles if len(r.groups) == 2]
        self.message = nn.ModuleList(Message(dim, ratio) for _ in self.edges)
        self.norm = nn.ModuleDict({_name(g): nn.LayerNorm(3 * dim) for g in groups})
        self.update = nn.ModuleDict({_name(g): _mlp(3 * dim, dim, ratio) for g in groups})

    def forward(self, h: dict[str, Tensor], edges: dict[str, Tensor]) -> dict[str, Tensor]:
        # h: {g: (B, n_g, D)}; edges: {key: (B, n_a, n_b, D)}
        inbox = {g: torch.zeros_like(x) for g, x in h.items()}
        count = dict.fromkeys(h, 0)
        for role, message in zip(self.edges, self.message):
            a, b = role.groups
            to_a, to_b = message(edges[role.key], h[a], h[b])
            inbox[a], inbox[b] = inbox[a] + to_a, inbox[b] + to_b
            count[a], count[b] = count[a] + 1, count[b] + 1
        out = {}
        for g, x in h.items():
            got = inbox[g] / max(count[g], 1)
            mean = _pool(x, 1).unsqueeze(1).expand_as(x)
            state = torch.cat([x, got, mean], dim=-1)
            out[g] = x + self.update[_name(g)](self.norm[_name(g)](state))
        return out


def _name(key: str) -> str:
    """A state_dict key or group name as a ModuleDict key (no dots)."""
    return key.replace(".", "__")


class SpecEncoder(nn.Module):
    """Per-group unit features [(B, n_g, dim)] of a batch of networks with one spec, in the
    spec's group order; permuting group g's units permutes its rows alone."""

    def __init__(
        self,
        spec: PermSpec,
        shapes: dict[str, tuple[int, ...]],
        dim: int,
        rounds: int,
        ratio: int = 2,
        tensor_std: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.sizes, self.dim = dict(spec.sizes), dim
        self.groups = list(spec.groups)
        self.roles = roles_of(spec, shapes)
        self.shapes = dict(shapes)  # tensor key -> shape, WeightSpace order
        self.keys = list(shapes)
        std = torch.ones(len(shapes)) if tensor_std is None else tensor_std
        self.register_buffer("tensor_std", std)  # (T,) the zoo's std per tensor, `shapes` order
        self.embed = nn.ModuleDict({_name(r.key): nn.Linear(r.features, dim) for r in self.roles})
        self.start = nn.ParameterDict(
            {_name(g): nn.Parameter(0.02 * torch.randn(dim)) for g in self.groups}
        )
        self.rounds = nn.ModuleList(
            SpecRound(self.roles, self.groups, dim, ratio) for _ in range(rounds)
        )

    def normalise(self, ws: WeightSpace) -> WeightSpace:
        """Every tensor divided by the zoo's std of that tensor."""
        std = dict(zip(self.keys, self.tensor_std))
        return ws.replace([t / std[k] for k, t in ws.named.items()])

    def forward(self, ws: WeightSpace) -> list[Tensor]:
        if not ws.is_batched:
            raise DeepAlignError("the spec encoder reads a batch of networks (stack them)")
        ws = self.normalise(ws)
        batch, dim = ws.batch_size, self.dim
        h = {g: self.start[_name(g)].expand(batch, self.sizes[g], dim).clone() for g in self.groups}
        whole = torch.zeros(batch, dim, device=h[self.groups[0]].device)
        edges = {}
        for role in self.roles:
            x = self.embed[_name(role.key)](canonical(ws.named[role.key], role, self.sizes))
            if len(role.groups) == 2:
                edges[role.key] = x  # (B, n_a, n_b, D)
            elif len(role.groups) == 1:
                h[role.groups[0]] = h[role.groups[0]] + x  # (B, n_g, D)
            else:
                whole = whole + x.reshape(batch, dim)  # (B, D)
        h = {g: x + whole.unsqueeze(1) for g, x in h.items()}
        for round_ in self.rounds:
            h = round_(h, edges)
        return [h[g] for g in self.groups]
