"""The one container that carries a network's tensors between functions."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from deepalign.errors import DeepAlignError


@dataclass(frozen=True)
class WeightSpace:
    """One network's tensors by state_dict key, or a batch of networks (leading B).

    Layout (the only one in the project):
      named[key]: the module's own tensor under its state_dict key ('layer1.0.conv1.weight'),
                  (B, *shape) when batched. A bias is optional.
      buffers:    the keys that are floating-point buffers (BatchNorm running statistics):
                  permuted with their channel, interpolated, but no part of a distance or a
                  weight-matching objective. Integer buffers (num_batches_tracked) are not
                  weights and stay with the checkpoint.
    The order of `named` is the order every function walks the tensors in (a chain network
    keeps its weights first, then its biases).
    """

    named: Mapping[str, Tensor]
    buffers: frozenset[str] = field(default_factory=frozenset)
    batched: bool = False

    def __post_init__(self) -> None:
        if not self.named:
            raise DeepAlignError("a WeightSpace needs at least one tensor")
        unknown = self.buffers - set(self.named)
        if unknown:
            raise DeepAlignError(f"buffers {sorted(unknown)} are not among the tensors")

    @property
    def is_batched(self) -> bool:
        return self.batched

    @property
    def batch_size(self) -> int:
        if not self.batched:
            raise DeepAlignError("batch_size asked of an unbatched WeightSpace")
        return next(iter(self.named.values())).shape[0]

    def keys(self) -> list[str]:
        return list(self.named)

    def tensors(self) -> tuple[Tensor, ...]:
        """Every tensor, in the container's order."""
        return tuple(self.named.values())

    def params(self) -> dict[str, Tensor]:
        """The parameters alone (no buffers): what distances and objectives compare."""
        return {k: t for k, t in self.named.items() if k not in self.buffers}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Unbatched shape of every tensor."""
        skip = 1 if self.batched else 0
        return {k: tuple(t.shape[skip:]) for k, t in self.named.items()}

    def replace(self, values: Iterable[Tensor], batched: bool | None = None) -> WeightSpace:
        """The same keys (in order) and buffers holding new tensors."""
        named = dict(zip(self.named, values, strict=True))
        return WeightSpace(named, self.buffers, self.batched if batched is None else batched)

    def with_tensors(self, changed: Mapping[str, Tensor]) -> WeightSpace:
        """Some tensors replaced by key, the rest kept."""
        return self.replace([changed.get(k, t) for k, t in self.named.items()])

    def map(self, fn: Callable[[Tensor], Tensor]) -> WeightSpace:
        """Apply `fn` to every tensor."""
        return self.replace([fn(t) for t in self.named.values()])

    def to(self, *args, **kwargs) -> WeightSpace:
        return self.map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> WeightSpace:
        return self.map(Tensor.detach)

    def __getitem__(self, index: int | slice | Tensor) -> WeightSpace:
        """Select networks from a batched WeightSpace (an int gives an unbatched one)."""
        if not self.batched:
            raise DeepAlignError("indexing needs a batched WeightSpace")
        return self.replace([t[index] for t in self.named.values()], not isinstance(index, int))

    def unbind(self) -> list[WeightSpace]:
        return [self[i] for i in range(self.batch_size)]

    def flatten(self) -> Tensor:
        """All parameters (buffers left out) as one vector per network: (P,) or (B, P)."""
        start = 1 if self.batched else 0
        return torch.cat([t.flatten(start) for t in self.params().values()], dim=-1)

    def non_finite(self) -> str | None:
        """Key of the first tensor holding NaN or inf, else None."""
        return next((k for k, t in self.named.items() if not torch.isfinite(t).all()), None)


def stack(networks: Sequence[WeightSpace]) -> WeightSpace:
    """Batch unbatched WeightSpaces of one layout along a new leading dimension."""
    first = networks[0]
    for k, ws in enumerate(networks[1:], start=1):
        if ws.keys() != first.keys():
            raise DeepAlignError(f"network {k} has other tensors than network 0")
    columns = zip(*(ws.tensors() for ws in networks), strict=True)
    return first.replace([torch.stack(c) for c in columns], batched=True)


def lerp(a: WeightSpace, b: WeightSpace, lam: float | Tensor) -> WeightSpace:
    """(1 - lam) * a + lam * b; a Tensor `lam` of shape (B,) interpolates each network apart."""
    pairs = zip(a.tensors(), b.tensors(), strict=True)
    if isinstance(lam, Tensor) and lam.ndim == 1:
        return a.replace([x + lam.view(-1, *[1] * (x.ndim - 1)) * (y - x) for x, y in pairs])
    return a.replace([x + lam * (y - x) for x, y in pairs])


def average(networks: Sequence[WeightSpace], weights: Sequence[float] | None = None) -> WeightSpace:
    """The weighted mean of unbatched networks of one layout (equal weights by default)."""
    weights = list(weights) if weights is not None else [1.0] * len(networks)
    total = sum(weights)
    stacked = stack(networks)
    w = torch.tensor([x / total for x in weights])
    return networks[0].replace(
        [(w.view(-1, *[1] * (t.ndim - 1)).to(t) * t).sum(0) for t in stacked.tensors()]
    )


def check_same_shapes(a: WeightSpace, b: WeightSpace, names: tuple[str, str] = ("a", "b")) -> None:
    """Raise naming the first tensor whose key or shape differs between two networks."""
    missing = [k for k in a.named if k not in b.named]
    extra = [k for k in b.named if k not in a.named]
    if missing or extra:
        what = f"{names[1]} lacks '{missing[0]}'" if missing else f"{names[0]} lacks '{extra[0]}'"
        raise DeepAlignError(f"architectures differ: {what}")
    sa, sb = a.shapes(), b.shapes()
    for key, shape in sa.items():
        if shape != sb[key]:
            raise DeepAlignError(
                f"architectures differ at '{key}': {names[0]} {shape} vs {names[1]} {sb[key]}"
            )
