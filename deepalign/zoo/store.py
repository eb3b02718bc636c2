"""A zoo on disk, read back: the networks of one architecture as listed by its manifest."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from deepalign.core.arch import Arch
from deepalign.core.weightspace import WeightSpace, stack
from deepalign.errors import DeepAlignError
from deepalign.io import load_checkpoint


@dataclass(frozen=True)
class Zoo:
    """The networks of one architecture, as listed by its manifest."""

    arch: Arch
    records: list[dict]
    nets: WeightSpace  # batched, in manifest order

    def indices(self, split: str) -> list[int]:
        return [i for i, r in enumerate(self.records) if r["split"] == split]


def load_zoo(folder: Path) -> Zoo:
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        raise DeepAlignError(f"{manifest}: missing; run the zoo stage first (dvc repro zoo)")
    records = json.loads(manifest.read_text())["networks"]
    ckpts = [load_checkpoint(folder / r["path"]) for r in records]
    return Zoo(ckpts[0].arch, records, stack([c.ws for c in ckpts]))


def ring_pairs(indices: list[int], k: int) -> list[tuple[int, int]]:
    """(i, i+1 mod n) over the given networks, at most k pairs; each network is in two pairs."""
    if len(indices) < 2:
        raise DeepAlignError(f"need at least 2 networks to pair, got {len(indices)}")
    n = len(indices)
    return [(indices[i], indices[(i + 1) % n]) for i in range(min(k, n))]
