"""The one container that carries a network's parameters between functions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from deepalign.errors import DeepAlignError


@dataclass(frozen=True)
class WeightSpace:
    """Weights and biases of one feed-forward network, or of a batch of networks.

    Layout (the only one in the project), layer i in forward order:
      weights[i]: (out, in) for Linear, (out, in, kh, kw) for Conv2d
      biases[i]:  (out,)
    The batched form prepends a batch dimension B to every tensor: (B, out, in, ...), (B, out).
    A Linear that follows Flatten sees `in = channels * h * w`, channel-major as torch flattens.
    """

    weights: tuple[Tensor, ...]
    biases: tuple[Tensor, ...]

    def __post_init__(self) -> None:
        if len(self.weights) != len(self.biases) or not self.weights:
            raise DeepAlignError(
                f"WeightSpace needs one bias per weight, got {len(self.weights)} weights "
                f"and {len(self.biases)} biases"
            )

    @property
    def is_batched(self) -> bool:
        return self.biases[0].ndim == 2

    @property
    def batch_size(self) -> int:
        if not self.is_batched:
            raise DeepAlignError("batch_size asked of an unbatched WeightSpace")
        return self.biases[0].shape[0]

    @property
    def n_layers(self) -> int:
        return len(self.weights)

    def layer_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Unbatched weight shapes, one per layer."""
        skip = 1 if self.is_batched else 0
        return tuple(tuple(w.shape[skip:]) for w in self.weights)

    def tensors(self) -> tuple[Tensor, ...]:
        """All tensors, weights first then biases (the order `from_tensors` expects)."""
        return self.weights + self.biases

    @classmethod
    def from_tensors(cls, tensors: Sequence[Tensor]) -> WeightSpace:
        n = len(tensors) // 2
        return cls(tuple(tensors[:n]), tuple(tensors[n:]))

    def map(self, fn: Callable[[Tensor], Tensor]) -> WeightSpace:
        """Apply `fn` to every tensor."""
        return WeightSpace(tuple(map(fn, self.weights)), tuple(map(fn, self.biases)))

    def to(self, *args, **kwargs) -> WeightSpace:
        return self.map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> WeightSpace:
        return self.map(Tensor.detach)

    def __getitem__(self, index: int | slice | Tensor) -> WeightSpace:
        """Select networks from a batched WeightSpace (an int gives an unbatched one)."""
        if not self.is_batched:
            raise DeepAlignError("indexing needs a batched WeightSpace")
        return self.map(lambda t: t[index])

    def unbind(self) -> list[WeightSpace]:
        return [self[i] for i in range(self.batch_size)]

    def flatten(self) -> Tensor:
        """All parameters as one vector per network: (P,) or (B, P)."""
        start = 1 if self.is_batched else 0
        return torch.cat([t.flatten(start) for t in self.tensors()], dim=-1)

    def non_finite(self) -> str | None:
        """Name of the first tensor holding NaN or inf ('weights[2]'), else None."""
        for kind, group in (("weights", self.weights), ("biases", self.biases)):
            for i, t in enumerate(group):
                if not torch.isfinite(t).all():
                    return f"{kind}[{i}]"
        return None


def stack(networks: Sequence[WeightSpace]) -> WeightSpace:
    """Batch unbatched WeightSpaces along a new leading dimension."""
    columns = zip(*(ws.tensors() for ws in networks), strict=True)
    return WeightSpace.from_tensors([torch.stack(c) for c in columns])


def lerp(a: WeightSpace, b: WeightSpace, lam: float | Tensor) -> WeightSpace:
    """(1 - lam) * a + lam * b; a Tensor `lam` of shape (B,) interpolates each network apart."""
    pairs = zip(a.tensors(), b.tensors(), strict=True)
    if isinstance(lam, Tensor) and lam.ndim == 1:
        return WeightSpace.from_tensors(
            [x + lam.view(-1, *[1] * (x.ndim - 1)) * (y - x) for x, y in pairs]
        )
    return WeightSpace.from_tensors([x + lam * (y - x) for x, y in pairs])


def check_same_shapes(a: WeightSpace, b: WeightSpace, names: tuple[str, str] = ("a", "b")) -> None:
    """Raise naming the first tensor whose shapes differ between two networks."""
    if a.n_layers != b.n_layers:
        raise DeepAlignError(
            f"architectures differ: {names[0]} has {a.n_layers} layers, {names[1]} has {b.n_layers}"
        )
    for kind, xs, ys in (("weight", a.weights, b.weights), ("bias", a.biases, b.biases)):
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            if x.shape != y.shape:
                raise DeepAlignError(
                    f"architectures differ at layer {i} {kind}: {names[0]} {tuple(x.shape)} "
                    f"vs {names[1]} {tuple(y.shape)}"
                )
