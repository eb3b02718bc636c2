"""A zoo on disk, read back: the networks of one architecture as listed by its manifest."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deepalign.core.arch import Arch, arch_from_dict, check_fits, check_same_arch
from deepalign.core.data import Dataset
from deepalign.core.weightspace import WeightSpace, check_same_shapes, stack
from deepalign.errors import DeepAlignError, shown
from deepalign.io import check_input, digest, file_digest, load_checkpoint, os_error
from deepalign.zoo.build import manifest_digest


@dataclass(frozen=True)
class Zoo:
    """The networks of one architecture, as listed by its manifest."""

    arch: Arch
    records: list[dict]
    nets: WeightSpace  # batched, in manifest order

    def indices(self, split: str) -> list[int]:
        return [i for i, r in enumerate(self.records) if r["split"] == split]

    def signals(self, indices: list[int]) -> Tensor | None:
        """The signal each network fits (INR zoos), (n,); None where all fit one data set."""
        if "signal" not in self.records[0]:
            return None
        return torch.tensor([self.records[i]["signal"] for i in indices])

    def pairs(self, split: str, k: int) -> list[tuple[int, int]]:
        """At most k pairs of one split's networks that fit the same target: ring pairs of the
        split (a classifier zoo), or two views of one signal (an INR zoo, one pair per signal
        before any signal's second)."""
        indices = self.indices(split)
        signals = self.signals(indices)
        if signals is None:
            return ring_pairs(indices, k)
        views: dict[int, list[int]] = {}
        for i, s in zip(indices, signals.tolist()):
            views.setdefault(s, []).append(i)
        rounds = [signal_pairs(v) for v in views.values()]
        found = [ps[r] for r in range(max(map(len, rounds))) for ps in rounds if r < len(ps)]
        if not found:
            raise DeepAlignError(f"the {split} split has no signal fitted twice to pair")
        return found[:k]


SPLITS = ("train", "val", "test")


def _record(manifest: Path, i: int, record: Any) -> dict:
    """One network's manifest record: a file name in the zoo's folder and a known split."""
    if not isinstance(record, dict):
        raise DeepAlignError(f"{manifest}: network {i} is not a record: {shown(record)}")
    name = record.get("path")
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise DeepAlignError(f"{manifest}: network {i} has path {shown(name)}, not a file name")
    if record.get("split") not in SPLITS:
        raise DeepAlignError(
            f"{manifest}: network {i} has split {shown(record.get('split'))} "
            f"(known: {', '.join(SPLITS)})"
        )
    return record


def read_manifest(folder: Path) -> dict:
    """A zoo's manifest, checked: JSON with an architecture and at least one network."""
    manifest = folder / "manifest.json"
    if not manifest.exists():
        raise DeepAlignError(f"{manifest}: missing; run the zoo stage first (dvc repro zoo)")
    check_input(manifest, "zoo manifest")
    try:
        zoo = json.loads(manifest.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise DeepAlignError(f"{manifest}: not a zoo manifest (not JSON: {shown(str(e))})") from e
    except OSError as e:
        raise os_error(manifest, e, "read") from e
    if not isinstance(zoo, dict) or not isinstance(zoo.get("networks"), list):
        raise DeepAlignError(f"{manifest}: not a zoo manifest (no 'networks' list)")
    if not zoo["networks"]:
        raise DeepAlignError(f"{manifest}: the zoo has no networks (run the zoo stage)")
    zoo["networks"] = [_record(manifest, i, r) for i, r in enumerate(zoo["networks"])]
    return zoo


def zoo_digest(folder: Path) -> str:
    """A zoo's identity for the resume keys of the stages that read it: its manifest (without
    timings) and the bytes of every network it lists, so a network changed in place (its
    manifest the same) redoes the work built on it."""
    networks = read_manifest(folder)["networks"]
    files = {r["path"]: file_digest(folder / r["path"]) for r in networks}
    return digest({"manifest": manifest_digest(folder / "manifest.json"), "files": files}, 64)


def load_zoo(folder: Path, data: Dataset | None = None) -> Zoo:
    """The zoo in `folder`: every network it lists, each checked to have the zoo's recorded
    architecture (and, with `data`, to fit the data set)."""
    zoo = read_manifest(folder)
    manifest = folder / "manifest.json"
    try:
        arch = arch_from_dict(zoo.get("arch"))
        if data is not None:
            check_fits(arch, data.image_shape, data.n_classes, data.name)
    except DeepAlignError as e:
        raise DeepAlignError(f"{manifest}: {e}") from e
    records = zoo["networks"]
    ckpts = [load_checkpoint(folder / r["path"]) for r in records]
    for record, ckpt in zip(records, ckpts):
        path = folder / record["path"]
        check_same_arch(arch, ckpt.arch, (f"{manifest}", f"{path}"))
        check_same_shapes(ckpts[0].ws, ckpt.ws, (f"{folder / records[0]['path']}", f"{path}"))
    return Zoo(arch, records, stack([c.ws for c in ckpts]))


def signal_pairs(views: list[int]) -> list[tuple[int, int]]:
    """The ring pairs of one signal's views ((a, b) alone for two)."""
    if len(views) < 2:
        return []
    count = len(views) if len(views) > 2 else 1
    return [(views[i], views[(i + 1) % len(views)]) for i in range(count)]


def ring_pairs(indices: list[int], k: int) -> list[tuple[int, int]]:
    """(i, i+1 mod n) over the given networks, at most k pairs; each network is in two pairs."""
    if len(indices) < 2:
        raise DeepAlignError(f"need at least 2 networks to pair, got {len(indices)}")
    n = len(indices)
    return [(indices[i], indices[(i + 1) % n]) for i in range(min(k, n))]
