"""DEEP-ALIGN as a registered aligner: a trained checkpoint predicts the permutations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from deepalign.core.arch import Arch
from deepalign.core.assignment import Answer, Scores
from deepalign.core.weightspace import WeightSpace
from deepalign.errors import DeepAlignError
from deepalign.methods.deep_align.checkpoint import Fit, load_aligner, spec_fit
from deepalign.methods.deep_align.model import DeepAlign
from deepalign.methods.problem import Problem


@dataclass(frozen=True)
class DeepAlignCfg:
    checkpoints: list[str]  # aligner files or folders of them; the one fitting the pair is used


def checkpoint_files(cfg: DeepAlignCfg) -> list[Path]:
    """The aligner files `cfg` names: files as given, a folder's `<arch>.pt` files (not the
    `.state.pt` training states); missing paths are kept, for the caller to report."""
    files = []
    for entry in map(Path, cfg.checkpoints):
        if entry.is_dir():
            files += sorted(p for p in entry.glob("*.pt") if not p.name.endswith(".state.pt"))
        else:
            files.append(entry)
    return files


@lru_cache(maxsize=8)
def _load(path: str) -> tuple[DeepAlign, Fit]:
    model, fit, _ = load_aligner(Path(path))
    return model, fit


def model_for(arch: Arch, cfg: DeepAlignCfg) -> DeepAlign:
    """The checkpoint trained for networks of `arch`'s spec (its digest), or one line naming
    the networks' architecture and each aligner's."""
    digest, seen = spec_fit(arch).digest, []
    for path in checkpoint_files(cfg):
        if not path.is_file():  # an architecture not trained (yet): say so if nothing fits
            seen.append(f"{path} (missing)")
            continue
        model, fit = _load(str(path))
        if fit.digest == digest:
            return model
        seen.append(f"{path} (fits {fit.description})")
    raise DeepAlignError(
        f"no aligner fits {arch.describe()}: {', '.join(seen) or 'none given'}; train one on "
        "networks like these with `deepalign train-aligner`"
    )


@torch.no_grad()
def deep_align_batch(arch: Arch, ref: WeightSpace, other: WeightSpace, cfg: DeepAlignCfg) -> Scores:
    """Batched pairs in one forward pass: the model's scores {g: (K, n, n)}.

    As an `Answer`, their permutation is the Hungarian solution; a refinement that can start from
    scores (Sinkhorn) takes them as its initial logits, as in the paper's DEEP-ALIGN + Sinkhorn.
    """
    return model_for(arch, cfg)(ref, other)


def deep_align_problems(
    problems: Sequence[Problem], cfg: DeepAlignCfg, inits: Sequence[Answer | None]
) -> list[Answer]:
    """Every pair's scores {g: (n, n)} from one forward pass (`inits` are ignored: the model
    reads the weights alone)."""
    pairs = Problem.stack(problems)
    scores = deep_align_batch(pairs.arch, pairs.ref, pairs.other, cfg)
    return [Answer(scores={g: s[k] for g, s in scores.items()}) for k in range(len(problems))]


def deep_align(problem: Problem, cfg: DeepAlignCfg, init: Answer | None = None) -> Answer:
    """One pair's scores {g: (n, n)}: `deep_align_problems` of one."""
    return deep_align_problems([problem], cfg, [init])[0]
