"""DEEP-ALIGN trained on the user's own networks (`deepalign train-aligner`,
`deepalign.train_aligner`): the networks become a zoo with held-out validation networks, the
pipeline's trainer runs on it (progress bar, the best validation barrier kept, resumable from
`<out>.state.pt` while the settings and networks stay the same), and the aligner file records
the architecture it fits.

DEEP-ALIGN's encoder reads chains of Linear/Conv2d layers for now; other architectures are
refused before anything trains.
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
from deepalign.methods.deep_align.checkpoint import save_aligner
from deepalign.methods.deep_align.train import (
    AlignerCfg,
    aligner_fingerprint,
    augmented_recovery,
    checkpoint_meta,
    train,
)
from deepalign.methods.learned import layer_shapes
from deepalign.settings import Settings
from deepalign.zoo.build import resolve_device
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


def state_path(out: Path) -> Path:
    """Where an interrupted training run of `out` keeps its progress."""
    return out.with_name(f"{out.stem}.state.pt")


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
    validation barrier and planted recovery, epoch, seconds)."""
    layer_shapes(arch)  # a chain, or one line saying DEEP-ALIGN reads chains alone
    zoo = user_zoo(arch, networks, cfg.seed)
    device = resolve_device(cfg.device)
    fp = aligner_fingerprint(cfg, arch, networks_digest(networks), data)
    model, result = train(
        zoo, data, cfg, device, state_path(out), fp, progress=progress, desc="train-aligner"
    )
    val = zoo.nets[torch.tensor(zoo.indices("val"))].to(device)
    result["val_planted_recovery_augmented"] = augmented_recovery(
        model, arch, val, cfg.augment, seed=1
    )
    result.pop("epoch")  # where this call started: 0, or where a resumed run stopped
    meta = {"fingerprint": fp, "networks": len(networks)} | checkpoint_meta(result)
    save_aligner(out, model, arch, meta)  # the same bytes, resumed or not
    return {k: float(v) for k, v in result.items()}
