"""Zoo kinds: each kind's recipe (its own frozen dataclass) and the architecture it builds.

A recipe in params.yaml (`zoo.archs.<name>`, `resnets.zoo`, `inr.zoos.<name>.net`) names its
`kind`; the loader builds the dataclass registered under that name in `ZOO_KINDS` (unknown
and missing keys refused) and `make_arch` asks the recipe for its architecture on a data set.
Every kind shares `NetCfg`'s training fields. A new kind is a `NetCfg` subclass with its
architecture's fields and an `arch` method, plus its line in `ZOO_KINDS`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Annotated

from deepalign.config import (
    Check,
    Count,
    Fraction,
    Iterations,
    NonNegative,
    Positive,
    PositiveFloat,
    invalid,
    one_of,
    tagged_union,
)
from deepalign.core.arch import Arch
from deepalign.core.chain import ACTIVATIONS, cnn_arch, mlp_arch
from deepalign.core.data import Dataset
from deepalign.core.resnet import resnet_arch
from deepalign.errors import DeepAlignError

OPTIMIZERS = ("adam", "sgd")
Widths = Annotated[list[Positive], Check(lambda v: len(v) > 0, "at least one width")]
# sine units belong to kind siren (its own initialisation and coordinate inputs)
Activation = Annotated[str, one_of(*(a for a in ACTIVATIONS if a != "sine"))]


@dataclass(frozen=True)
class NetCfg(ABC):
    """How a zoo's networks are trained, whatever their kind (a kind adds its architecture's
    fields); `kind` is the name its class is registered under, not a key of its own."""

    kind: str = field(init=False)
    n_train: Count  # networks in each zoo split
    n_val: Count
    n_test: Count
    epochs: Iterations
    batch_size: Positive
    lr: PositiveFloat
    weight_decay: NonNegative
    optimizer: Annotated[str, one_of(*OPTIMIZERS)]
    momentum: Fraction  # SGD's (0 for adam)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", kind_of(type(self)))
        if self.optimizer == "adam" and self.momentum != 0:
            raise invalid("momentum", self.momentum, "0 with adam (momentum is SGD's)")
        if self.n_train + self.n_val + self.n_test == 0:
            raise invalid("n_train", self.n_train, ">= 1 when n_val and n_test are 0")

    @abstractmethod
    def arch(self, data: Dataset) -> Arch:
        """The architecture of the recipe's networks for data set `data`."""


@dataclass(frozen=True)
class MlpCfg(NetCfg):
    """Linear layers of `hidden` widths with `activation` between."""

    hidden: Widths
    activation: Activation

    def arch(self, data: Dataset) -> Arch:
        return mlp_arch(math.prod(data.image_shape), self.hidden, data.n_classes, self.activation)


@dataclass(frozen=True)
class CnnCfg(NetCfg):
    """3x3 'same'-padded convs of `hidden` channels (one stride each), then one Linear."""

    hidden: Widths
    strides: list[Positive]
    activation: Activation

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.strides) != len(self.hidden):
            raise invalid("strides", self.strides, f"one stride per conv ({len(self.hidden)})")

    def arch(self, data: Dataset) -> Arch:
        shape = data.image_shape
        return cnn_arch(shape, self.hidden, self.strides, data.n_classes, self.activation)


@dataclass(frozen=True)
class ResNetCfg(NetCfg):
    """Stages of `blocks` basic blocks with BatchNorm and ReLU, of `hidden` widths."""

    hidden: Widths
    blocks: Positive  # basic blocks per stage

    def arch(self, data: Dataset) -> Arch:
        return resnet_arch(data.image_shape, self.hidden, self.blocks, data.n_classes)


@dataclass(frozen=True)
class SirenCfg(NetCfg):
    """SIREN (Sitzmann et al. 2020): coordinates -> sine layers of `hidden` widths -> the
    signal's value."""

    hidden: Widths

    def arch(self, data: Dataset) -> Arch:
        return mlp_arch(data.image_shape[0], self.hidden, data.n_classes, "sine")


ZOO_KINDS: dict[str, type[NetCfg]] = {
    "mlp": MlpCfg,
    "cnn": CnnCfg,
    "resnet": ResNetCfg,
    "siren": SirenCfg,
}
# wherever a params section holds a NetCfg, its `kind` picks the dataclass its keys load into
tagged_union(NetCfg, "kind", ZOO_KINDS)


def kind_of(cls: type) -> str:
    """The name a recipe class is registered under in `ZOO_KINDS`."""
    for name, registered in ZOO_KINDS.items():
        if registered is cls:
            return name
    known = ", ".join(ZOO_KINDS)
    raise DeepAlignError(f"{cls.__name__} is not a registered zoo kind (known: {known})")


def make_arch(net: NetCfg, data: Dataset) -> Arch:
    """The architecture of a zoo recipe for a data set."""
    return net.arch(data)
