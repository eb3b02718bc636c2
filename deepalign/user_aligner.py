"""DEEP-ALIGN trained on the user's own networks (`deepalign train-aligner`,
`deepalign.train_aligner`): the networks become a zoo with held-out validation networks, the
pipeline's trainer runs on it (progress bar, the best validation barrier kept, resumable from
`<out>.state.pt` while the settings and networks stay the same), and the aligner file records
the architecture it fits.

Chains of Linear/Conv2d layers get the chain encoder, every other traced network the spec
encoder (`methods/deep_align/model.py`); a layout neither reads is refused before anything
trains.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from deepalign.core.arch import Arch
from deepalign.core.data import Dataset
from deepalign.core.weightspace import WeightSpace, stack
from deepalign.errors import DeepAlignError
from deepalign.methods.deep_align.train import (
    AlignerCfg,
    aligner_fingerprint,
    train_and_save,
)
from deepalign.settings import Settings
from deepalign.zoo.store import Zoo

MIN_NETWORKS = 4  # two to train on, two to validate on
VAL_FRACTION = 0.1  # of the networks, at least 2, held out to pick the best epoch


def aligner_cfg(settings: Settings, epochs: int | None = None) -> AlignerCfg:
    """The `aligner` section of the settings, `epochs` over its own."""
    cfg = settings.section("aligner", AlignerCfg)
    return cfg if epochs is None else dataclasses.replace(cfg, epochs=epochs)


def user_zoo(arch: Arch, networks: list[WeightSpace], seed: int) -> Zoo:
    """The networks as a zoo: `VAL_FRACTION` of them (at least 2, picked by `seed`) held out
    for validation, the rest to train on."""
    if len(networks) < MIN_NETWORKS:
        raise DeepAlignError(
            f"training an aligner needs at least {MIN_NETWORKS} networks of one architecture "
            f"(2 held out to validate), got {len(networks)}"
        )
    n_val = max(2, round(VAL_FRACTION * len(networks)))
    order = torch.randperm(len(networks), generator=torch.Generator().manual_seed(seed))
    held = set(order[:n_val].tolist())
    splits = ["val" if i in held else "train" for i in range(len(networks))]
    records = [{"path": str(i), "split": split} for i, split in enumerate(splits)]
    return Zoo(arch, records, stack(networks))


def networks_digest(networks: list[WeightSpace]) -> str:
    """The networks' identity for resuming: every tensor's bytes, in order."""
    h = hashlib.sha256()
    for ws in networks:
        for key, t in ws.named.items():
            h.update(key.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def train_user_aligner(
    arch: Arch,
    networks: list[WeightSpace],
    data: Dataset,
    cfg: AlignerCfg,
    out: Path,
    progress: bool = True,
) -> dict[str, float]:
    """Train DEEP-ALIGN on `networks` (one architecture) with `data`'s images for the
    interpolation loss, write the best epoch's aligner to `out`; its numbers (best
    validation barrier and planted recovery, epoch, seconds). The positive rescaling
    augmentation is left out where the networks do not have that symmetry (normalisation
    layers, non-ReLU activations)."""
    if cfg.augment.rescale > 0 and not arch.traced.rescalable:
        cfg = dataclasses.replace(cfg, augment=dataclasses.replace(cfg.augment, rescale=0.0))
    zoo = user_zoo(arch, networks, cfg.seed)
    fp = aligner_fingerprint(cfg, arch, networks_digest(networks), data)
    meta = {"networks": len(networks)}
    return train_and_save(
        zoo, data, cfg, out, fp, held_out="val", meta=meta, progress=progress, desc="train-aligner"
    )
