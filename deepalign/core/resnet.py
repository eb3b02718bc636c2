"""A small ResNet with BatchNorm (He et al. 2016's basic blocks), sized for 8x8 digits.

stem: conv3x3 -> BN -> ReLU; stages of `blocks` basic blocks (conv3x3 -> BN -> ReLU ->
conv3x3 -> BN, plus the stream, then ReLU), the first block of a stage striding by 2 (from the
second stage on) with a 1x1 conv + BN on its shortcut; global average pooling; a Linear head.
Each stage's residual stream is one permutation group (its blocks add into it), each block's
inner channels another: the traced spec finds both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from deepalign.core.arch import Arch, record_kind
from deepalign.errors import DeepAlignError, shown

MAX_WIDTH = 4096


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:  # (N, c_in, H, W) -> (N, c_out, H', W')
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetModule(nn.Module):
    def __init__(self, channels: int, widths: tuple[int, ...], blocks: int, classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        stages, c = [], widths[0]
        for s, width in enumerate(widths):
            for b in range(blocks):
                stride = 2 if s > 0 and b == 0 else 1
                stages.append(BasicBlock(c, width, stride))
                c = width
        self.blocks = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:  # (N, C, H, W) -> (N, classes)
        return self.head(self.flatten(self.pool(self.blocks(self.stem(x)))))


@record_kind("resnet")
@dataclass(frozen=True)
class ResNet(Arch):
    """The record of a `ResNetModule`: what a checkpoint stores to rebuild it."""

    input_shape: tuple[int, int, int]  # (C, H, W)
    widths: tuple[int, ...]  # channels of each stage
    blocks: int  # basic blocks per stage
    classes: int

    def build(self) -> nn.Module:
        return ResNetModule(self.input_shape[0], self.widths, self.blocks, self.classes)

    def to_dict(self) -> dict:
        return {
            "kind": "resnet",
            "input_shape": list(self.input_shape),
            "widths": list(self.widths),
            "blocks": self.blocks,
            "classes": self.classes,
        }

    @classmethod
    def from_dict(cls, d: Any) -> ResNet:
        """The record checked by type and range."""

        def sizes(key: str, length: int | None, high: int) -> list[int]:
            value = d.get(key)
            ok = isinstance(value, list) and (length is None or len(value) == length) and value
            if not ok or not all(_is_int(v, 1, high) for v in value):
                raise DeepAlignError(f"resnet record: {key} {shown(value)} is not allowed")
            return value

        shape = sizes("input_shape", 3, 4096)
        widths = sizes("widths", None, MAX_WIDTH)
        for key in ("blocks", "classes"):
            if not _is_int(d.get(key), 1, MAX_WIDTH):
                raise DeepAlignError(f"resnet record: {key} {shown(d.get(key))} is not allowed")
        return cls(tuple(shape), tuple(widths), d["blocks"], d["classes"])

    def describe(self) -> str:
        widths = "/".join(map(str, self.widths))
        return f"resnet(widths {widths}, {self.blocks} block(s) per stage, BatchNorm)"


def _is_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def resnet_arch(
    image_shape: tuple[int, ...], widths: list[int], blocks: int, classes: int
) -> ResNet:
    return ResNet(tuple(image_shape), tuple(widths), blocks, classes)  # type: ignore[arg-type]
