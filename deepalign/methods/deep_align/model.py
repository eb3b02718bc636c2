"""The equivariant encoders over weight space and the pair head.

Two encoders read a network: the chain encoder below (chains of Linear/Conv2d layers with
biases) and the spec encoder (`spec.py`: any traced network, units of each permutation group
as nodes). `encoder: auto` picks the chain encoder where it applies (on the default MLP zoo
its best validation barrier was 0.091 against the spec encoder's 0.197, in less time;
docs/results.md), and the spec encoder everywhere else.

The chain encoder:
Every neuron is a node. A network's layer m (weights (out, in, *kernel)) becomes edge
features E_m of shape (B, out, in_units, e): e = kh*kw for convs, h*w for the Linear after
Flatten (one channel owns a block of features), 1 otherwise. Input and output neurons are
never permuted, so they carry learned position embeddings; hidden neurons start from an
embedding of their bias. Each block updates one layer's nodes from
  its own state, the forward message  sum_j E_m[i, j] (.) A h_{m-1, j},
  the backward message sum_i E_{m+1}[i, j] (.) B h_{m+1, i}, and the layer mean,
all of which commute with permutations of the hidden nodes (sums over neighbours, per-node
MLPs, LayerNorm over features). Blocks sweep forward 1..M then backward M-1..0, `rounds`
times. The head compares two networks' hidden-node features by cosine with a learnable scale;
with `cross_rounds`, each round first lets every unit read its soft partners in the other
network (Sinkhorn over the current similarities) and update itself from them, with one update
shared by both sides (permuting either network permutes its side; swapping them transposes).
With `coupling`, each round adds to every group's logits a learned multiple (0 at the start)
of its weight-matching score (Git Re-Basin's <ref unit i, other unit j> over the tensors the
group touches), the other groups' permutations being the Sinkhorn matrices of the current
logits: the groups are no longer predicted apart. The score is standardised per pair, and
it is equivariant too (permuting a group of either network permutes its rows or columns
and its neighbours' matrices alike); swapping the networks transposes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepalign.config import Iterations, Positive, PositiveFloat, Steps, one_of
from deepalign.core.arch import Arch
from deepalign.core.assignment import sinkhorn, sinkhorn_groups
from deepalign.core.matching import soft_group_score
from deepalign.core.permspec import PermSpec
from deepalign.core.weightspace import WeightSpace
from deepalign.errors import DeepAlignError
from deepalign.methods.deep_align.spec import SpecEncoder


@dataclass(frozen=True)
class ModelCfg:
    dim: Positive  # node feature width D
    rounds: Iterations  # forward + backward sweeps over the layers
    mlp_ratio: Positive  # hidden width of each block's update MLP, in units of D
    head_dim: Positive  # width of the features compared by cosine
    scale_init: PositiveFloat  # initial cosine scale (learned)
    cross_rounds: Steps  # rounds of the pair head letting each network's units see the other's
    # chain: layer by layer (chains of Linear/Conv2d with biases); spec: any traced network;
    # auto: chain where it applies, else spec
    encoder: Annotated[str, one_of("auto", "chain", "spec")]
    # rounds of pair-aware coupling: each group's logits plus a learned multiple (from 0) of
    # its weight-matching score given the other groups' soft permutations
    coupling: Steps


@dataclass(frozen=True)
class Layout:
    """Node counts per layer (input .. output), edge feature sizes per weight layer, and the
    keys of each layer's weight and bias."""

    nodes: tuple[int, ...]  # (n_0, ..., n_M)
    edge_dims: tuple[int, ...]  # (e_1, ..., e_M)
    weights: tuple[str, ...]  # layer m's weight key
    biases: tuple[str, ...]  # layer m's bias key

    @classmethod
    def of(cls, arch: Arch) -> Layout:
        """The layout of a chain with a bias on every layer; the Linear after Flatten sees
        each channel as a block of h*w features (the spec says how many)."""
        layers = getattr(arch, "param_indices", None)
        if layers is None or any(not arch.modules[i].bias for i in layers):
            raise DeepAlignError(
                "DEEP-ALIGN aligns chains of Linear/Conv2d layers with biases, "
                f"not {arch.describe()}"
            )
        shapes = arch.weight_shapes()
        blocks = {
            ax.key: ax.block for axes in arch.spec.members.values() for ax in axes if ax.axis == 1
        }
        nodes, edges = [shapes[0][1]], []
        for i, shape in zip(layers, shapes):
            nodes.append(shape[0])
            edges.append(math.prod(shape[2:]) * blocks.get(f"{i}.weight", 1))
        weights = tuple(f"{i}.weight" for i in layers)
        return cls(tuple(nodes), tuple(edges), weights, tuple(f"{i}.bias" for i in layers))


def edge_features(ws: WeightSpace, layout: Layout) -> list[Tensor]:
    """Batched weights -> [(B, out, in_units, e)] per layer."""
    out = []
    for m, key in enumerate(layout.weights):
        w = ws.named[key]
        out.append(w.reshape(w.shape[0], w.shape[1], layout.nodes[m], layout.edge_dims[m]))
    return out


class Block(nn.Module):
    """Update one layer's nodes from their neighbours in the layers before and after."""

    def __init__(self, dim: int, ratio: int, e_in: int | None, e_out: int | None) -> None:
        super().__init__()
        self.fwd = nn.Linear(dim, dim) if e_in else None
        self.fwd_edge = nn.Parameter(torch.randn(e_in, dim) / math.sqrt(e_in)) if e_in else None
        self.bwd = nn.Linear(dim, dim) if e_out else None
        self.bwd_edge = nn.Parameter(torch.randn(e_out, dim) / math.sqrt(e_out)) if e_out else None
        self.norm = nn.LayerNorm(4 * dim)
        self.update = nn.Sequential(
            nn.Linear(4 * dim, ratio * dim), nn.GELU(), nn.Linear(ratio * dim, dim)
        )

    def forward(
        self,
        h: Tensor,
        prev: Tensor | None,
        e_in: Tensor | None,
        nxt: Tensor | None,
        e_out: Tensor | None,
    ) -> Tensor:  # h: (B, n, D)
        """fwd[o] = sum_{i,c} E_m[o, i, c] A h_prev[i] (.) W_fwd[c], bwd[i] likewise through
        E_{m+1}[o, i, c], each as one batched matmul over (neighbour, edge feature)."""
        zeros = torch.zeros_like(h)
        fwd = bwd = zeros
        if self.fwd is not None:  # e_in: (B, n, n_prev * e), prev: (B, n_prev, D)
            q = self.fwd(prev).unsqueeze(2) * self.fwd_edge  # (B, n_prev, e, D)
            fwd = torch.bmm(e_in, q.flatten(1, 2)) / math.sqrt(prev.shape[1])
        if self.bwd is not None:  # e_out: (B, n, n_next * e), nxt: (B, n_next, D)
            r = self.bwd(nxt).unsqueeze(2) * self.bwd_edge  # (B, n_next, e, D)
            bwd = torch.bmm(e_out, r.flatten(1, 2)) / math.sqrt(nxt.shape[1])
        mean = h.mean(1, keepdim=True).expand_as(h)
        return h + self.update(self.norm(torch.cat([h, fwd, bwd, mean], dim=-1)))


class Encoder(nn.Module):
    """Per-hidden-neuron features of a batch of networks: [(B, n_m, D)] for m = 1..M-1."""

    def __init__(self, layout: Layout, cfg: ModelCfg, tensor_std: Tensor) -> None:
        super().__init__()
        self.layout = layout
        m_last = len(layout.nodes) - 1
        self.register_buffer("tensor_std", tensor_std)  # (2M,) zoo std per weight and bias
        self.pos_in = nn.Parameter(torch.randn(layout.nodes[0], cfg.dim))
        self.pos_out = nn.Parameter(torch.randn(layout.nodes[-1], cfg.dim))
        self.bias_embed = nn.ModuleList(nn.Linear(1, cfg.dim) for _ in range(m_last))
        order = [*range(1, m_last + 1), *range(m_last - 1, -1, -1)] * cfg.rounds
        self.order = order
        self.blocks = nn.ModuleList(
            Block(
                cfg.dim,
                cfg.mlp_ratio,
                layout.edge_dims[m - 1] if m > 0 else None,
                layout.edge_dims[m] if m < m_last else None,
            )
            for m in order
        )

    def normalise(self, ws: WeightSpace) -> WeightSpace:
        """Divide every tensor by the zoo's std of that tensor."""
        std = self.tensor_std
        return ws.replace([t / std[k] for k, t in enumerate(ws.tensors())])

    def forward(self, ws: WeightSpace) -> list[Tensor]:
        ws = self.normalise(ws)
        edges = edge_features(ws, self.layout)  # [(B, out, in, e)]
        rows = [e.flatten(2) for e in edges]  # a unit's incoming edges: (B, out, in * e)
        cols = [e.transpose(1, 2).flatten(2) for e in edges]  # outgoing: (B, in, out * e)
        batch = ws.batch_size
        h = [self.pos_in.expand(batch, -1, -1)]
        biases = [ws.named[k] for k in self.layout.biases]
        h += [emb(b.unsqueeze(-1)) for emb, b in zip(self.bias_embed, biases)]
        h[-1] = h[-1] + self.pos_out
        last = len(h) - 1
        for m, block in zip(self.order, self.blocks):
            prev, e_in = (h[m - 1], rows[m - 1]) if m > 0 else (None, None)
            nxt, e_out = (h[m + 1], cols[m]) if m < last else (None, None)
            h[m] = block(h[m], prev, e_in, nxt, e_out)
        return h[1:last]


class CrossRound(nn.Module):
    """Units of both networks update from their soft partners in the other network."""

    def __init__(self, dim: int, ratio: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(3 * dim)
        self.update = nn.Sequential(
            nn.Linear(3 * dim, ratio * dim), nn.GELU(), nn.Linear(ratio * dim, dim)
        )

    def _step(self, own: Tensor, partner: Tensor) -> Tensor:
        return own + self.update(self.norm(torch.cat([own, partner, own - partner], dim=-1)))

    def forward(self, a: Tensor, b: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        # a, b: (B, n, D); soft: (B, n, n), rows a's units, columns b's
        soft = sinkhorn(scale * _cosine(a, b), iterations=10)
        return self._step(a, soft @ b), self._step(b, soft.mT @ a)


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    return F.normalize(a, dim=-1, eps=1e-6) @ F.normalize(b, dim=-1, eps=1e-6).mT


def chain_layout(arch: Arch) -> Layout | None:
    """The chain layout of `arch`, or None where the chain encoder does not apply."""
    try:
        return Layout.of(arch)
    except DeepAlignError:
        return None


def encoder_kind(arch: Arch, cfg: ModelCfg) -> str:
    """'chain' or 'spec': the encoder `cfg.encoder` asks for, checked against `arch`."""
    if cfg.encoder == "spec":
        return "spec"
    if chain_layout(arch) is not None:
        return "chain"
    if cfg.encoder == "chain":
        Layout.of(arch)  # raises, naming the architecture
    return "spec"


def aligner_for(
    arch: Arch, cfg: ModelCfg, shapes: dict[str, tuple[int, ...]], tensor_std: Tensor
) -> DeepAlign:
    """A fresh aligner for `arch`; `shapes` (WeightSpace order) and `tensor_std` (T,) the zoo's
    std of each tensor, in that order."""
    if encoder_kind(arch, cfg) == "chain":
        encoder: Encoder | SpecEncoder = Encoder(Layout.of(arch), cfg, tensor_std)
    else:
        encoder = SpecEncoder(arch.spec, shapes, cfg.dim, cfg.rounds, cfg.mlp_ratio, tensor_std)
    return DeepAlign(encoder, cfg, arch.spec)


class DeepAlign(nn.Module):
    """Siamese encoder + cosine head: per hidden group, logits[i, j] = sim(ref i, other j),
    then `cfg.coupling` rounds of pair-aware coupling through the networks' weights."""

    COUPLING_ITERATIONS = 20  # Sinkhorn iterations of the coupling rounds' soft permutations

    @property
    def kind(self) -> str:
        """Which encoder reads the networks: 'chain' or 'spec'."""
        return "spec" if isinstance(self.encoder, SpecEncoder) else "chain"

    def __init__(self, encoder: Encoder | SpecEncoder, cfg: ModelCfg, spec: PermSpec) -> None:
        super().__init__()
        self.spec, self.groups, self.cfg = spec, list(spec.groups), cfg
        self.encoder = encoder
        self.head = nn.ModuleList(nn.Linear(cfg.dim, cfg.head_dim) for _ in self.groups)
        self.cross = nn.ModuleList(
            CrossRound(cfg.head_dim, cfg.mlp_ratio) for _ in range(cfg.cross_rounds)
        )
        self.log_scale = nn.Parameter(torch.tensor(math.log(cfg.scale_init)))
        if cfg.coupling:  # (rounds, groups): 0 at the start, the encoder's logits unchanged
            self.mixing = nn.Parameter(torch.zeros(cfg.coupling, len(self.groups)))

    def features(self, ws: WeightSpace) -> list[Tensor]:
        """Head features per hidden group, of one network alone: [(B, n, head_dim)]."""
        return [head(h) for head, h in zip(self.head, self.encoder(ws))]

    def logits(self, feats_ref: list[Tensor], feats_other: list[Tensor]) -> dict[str, Tensor]:
        """{group: (B, n, n)} similarity logits; swapping the inputs transposes them."""
        scale = self.log_scale.exp()
        out = {}
        for g, a, b in zip(self.groups, feats_ref, feats_other):
            for cross in self.cross:
                a, b = cross(a, b, scale)
            out[g] = scale * _cosine(a, b)
        return out

    def couple(
        self, logits: dict[str, Tensor], ref: WeightSpace, other: WeightSpace
    ) -> dict[str, Tensor]:
        """`cfg.coupling` rounds: logits[g] += mixing[r, g] * z(score of g given the other
        groups' Sinkhorn matrices), z standardising each pair's (n, n) score; ref and other
        batched (B pairs), in the zoo-normalised units the encoder reads."""
        if not self.cfg.coupling:
            return logits
        ref, other = self.encoder.normalise(ref), self.encoder.normalise(other)
        for weights in self.mixing:  # (groups,)
            soft = sinkhorn_groups(logits, self.COUPLING_ITERATIONS)
            logits = {
                g: lg + w * _standardised(soft_group_score(self.spec, ref, other, g, soft))
                for (g, lg), w in zip(logits.items(), weights)
            }
        return logits

    def pair_logits(
        self, feats: tuple[list[Tensor], list[Tensor]], ref: WeightSpace, other: WeightSpace
    ) -> dict[str, Tensor]:
        """The logits of pairs (ref, other) from their features: {g: (B, n, n)}."""
        return self.couple(self.logits(*feats), ref, other)

    def forward(self, ref: WeightSpace, other: WeightSpace) -> dict[str, Tensor]:
        return self.pair_logits((self.features(ref), self.features(other)), ref, other)


def _standardised(score: Tensor) -> Tensor:
    """Each pair's (n, n) score less its mean, over its std: (B, n, n)."""
    mean = score.mean((-2, -1), keepdim=True)
    std = score.std((-2, -1), keepdim=True)
    return ((score - mean) / (std + 1e-6)).float()
