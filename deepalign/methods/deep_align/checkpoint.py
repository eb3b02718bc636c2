"""Trained aligners on disk, and their batched inference."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from deepalign.core.arch import Arch, arch_from_dict
from deepalign.core.assignment import solve_lap
from deepalign.core.permspec import Perm
from deepalign.core.weightspace import WeightSpace
from deepalign.errors import DeepAlignError
from deepalign.io import save_torch
from deepalign.methods.deep_align.model import DeepAlign, Layout, ModelCfg

FORMAT = "deepalign-aligner/1"


@torch.no_grad()
def predict(model: DeepAlign, ref: WeightSpace, other: WeightSpace) -> Perm:
    """Hard permutations for a batch of pairs: one forward, Hungarian per pair: {g: (K, n)}."""
    logits = model(ref, other)
    return {g: torch.stack([solve_lap(m) for m in lg]) for g, lg in logits.items()}


def save_aligner(path: Path, model: DeepAlign, arch: Arch, meta: dict) -> None:
    """Save a trained aligner with its metadata; the same model and metadata write the same
    bytes (keep timings out of `meta`: `train.checkpoint_meta`)."""
    blob = {
        "format": FORMAT,
        "arch": arch.to_dict(),
        "model": asdict(model.encoder.cfg),
        "layout": asdict(model.encoder.layout),
        "groups": model.groups,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": meta,
    }
    save_torch(path, blob)


def load_aligner(path: Path) -> tuple[DeepAlign, Arch, dict]:
    """A trained aligner, the architecture it serves and its metadata."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise DeepAlignError(
            f"{path}: no such aligner checkpoint (run dvc repro train_aligner)"
        ) from e
    except Exception as e:  # truncated, foreign or pickled objects
        raise DeepAlignError(
            f"{path}: not a readable aligner checkpoint ({type(e).__name__})"
        ) from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise DeepAlignError(f"{path}: not a deepalign aligner checkpoint")
    try:
        return _build(blob)
    except KeyError as e:
        raise DeepAlignError(f"{path}: aligner checkpoint lacks its {e} record") from e
    except (TypeError, ValueError, RuntimeError, DeepAlignError) as e:
        raise DeepAlignError(f"{path}: malformed aligner checkpoint ({e})") from e


def _build(blob: dict) -> tuple[DeepAlign, Arch, dict]:
    """The aligner a checkpoint blob describes, its weights loaded."""
    layout = Layout(**{k: tuple(v) for k, v in blob["layout"].items()})
    std = blob["state_dict"]["encoder.tensor_std"]
    model_cfg = ModelCfg(**({"cross_rounds": 0} | blob["model"]))  # older files had none
    model = DeepAlign(layout, model_cfg, std, list(blob["groups"]))
    model.load_state_dict(blob["state_dict"])
    return model.eval(), arch_from_dict(blob["arch"]), blob["meta"]
