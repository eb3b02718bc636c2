"""Trained aligners on disk, and their batched inference."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from deepalign.core.arch import Arch, arch_from_dict
from deepalign.core.assignment import solve_lap
from deepalign.core.permspec import Axis, Perm, PermSpec
from deepalign.core.weightspace import WeightSpace
from deepalign.errors import DeepAlignError
from deepalign.io import save_torch
from deepalign.methods.deep_align.model import DeepAlign, Encoder, Layout, ModelCfg
from deepalign.methods.deep_align.spec import SpecEncoder

FORMAT = "deepalign-aligner/1"


@torch.no_grad()
def predict(model: DeepAlign, ref: WeightSpace, other: WeightSpace) -> Perm:
    """Hard permutations for a batch of pairs: one forward, Hungarian per pair: {g: (K, n)}."""
    logits = model(ref, other)
    return {g: torch.stack([solve_lap(m) for m in lg]) for g, lg in logits.items()}


@dataclass(frozen=True)
class Fit:
    """The networks an aligner reads: the digest of their spec and tensor shapes (two
    architectures with one digest share an aligner), and their architecture for people."""

    digest: str
    description: str


def spec_record(spec: PermSpec, shapes: dict[str, tuple[int, ...]]) -> dict:
    """A spec and the tensors' shapes as plain data (what an aligner checkpoint stores)."""
    return {
        "shapes": [[k, list(s)] for k, s in shapes.items()],
        "groups": [[g, n, [list(ax) for ax in spec.acting(g)]] for g, n in spec.sizes.items()],
    }


def spec_from_record(record: dict) -> tuple[PermSpec, dict[str, tuple[int, ...]]]:
    """`spec_record` read back."""
    members = {g: tuple(Axis(*ax) for ax in axes) for g, _, axes in record["groups"]}
    sizes = {g: int(n) for g, n, _ in record["groups"]}
    return PermSpec(members, sizes), {k: tuple(s) for k, s in record["shapes"]}


def _digest(record: dict) -> str:
    return hashlib.sha256(json.dumps(record).encode()).hexdigest()[:16]


def spec_fit(arch: Arch) -> Fit:
    """What an aligner needs to read networks of `arch`: every tensor's key and shape, and
    which axes each permutation group acts on, as a digest."""
    return Fit(_digest(spec_record(arch.spec, arch.shapes())), arch.describe())


def save_aligner(path: Path, model: DeepAlign, arch: Arch, meta: dict) -> None:
    """Save a trained aligner with its metadata and the digest of the spec it reads; the same
    model and metadata write the same bytes (keep timings out of `meta`:
    `train.checkpoint_meta`)."""
    encoder, fit = model.encoder, spec_fit(arch)
    blob = {
        "format": FORMAT,
        "arch": arch.to_dict(),
        "fits": {"digest": fit.digest, "description": fit.description},
        "spec": spec_record(arch.spec, arch.shapes()),
        "encoder": model.kind,
        "model": asdict(model.cfg),
        "groups": model.groups,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": meta,
    }
    if isinstance(encoder, Encoder):
        blob["layout"] = asdict(encoder.layout)
    else:
        blob["shapes"] = [[k, list(shape)] for k, shape in encoder.shapes.items()]
    save_torch(path, blob)


def load_aligner(path: Path) -> tuple[DeepAlign, Fit, dict]:
    """A trained aligner, the networks it reads and its metadata. The architecture record is
    not rebuilt (a user's `--model` network is imported only when the user names it): the
    spec and shapes stored beside it describe the networks."""
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


def _build(blob: dict) -> tuple[DeepAlign, Fit, dict]:
    """The aligner a checkpoint blob describes, its weights loaded (files without an
    `encoder` record are chain aligners of a chain architecture)."""
    std = blob["state_dict"]["encoder.tensor_std"]
    kind = blob.get("encoder", "chain")
    old = {"cross_rounds": 0, "coupling": 0}  # keys older files lack
    model_cfg = ModelCfg(**(old | blob["model"] | {"encoder": kind}))
    if "fits" in blob:
        fit = Fit(str(blob["fits"]["digest"]), str(blob["fits"]["description"]))
        spec = spec_from_record(blob["spec"])[0]
    else:  # older files: a chain's record, rebuilt
        arch = arch_from_dict(blob["arch"])
        fit, spec = spec_fit(arch), arch.spec
    if kind == "chain":
        layout = Layout(**{k: tuple(v) for k, v in blob["layout"].items()})
        encoder: Encoder | SpecEncoder = Encoder(layout, model_cfg, std)
    else:
        shapes = {k: tuple(s) for k, s in blob["shapes"]}
        c = model_cfg
        encoder = SpecEncoder(spec, shapes, c.dim, c.rounds, c.mlp_ratio, std)
    model = DeepAlign(encoder, model_cfg, spec)
    model.load_state_dict(blob["state_dict"])
    return model.eval(), fit, blob["meta"]
