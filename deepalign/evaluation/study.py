"""Where DEEP-ALIGN's quality comes from: test barrier against zoo size and training steps.

The study's train networks are the zoo's own recipe run for more seeds (network j trains from
`zoo.seed + j`, so the first ones are exactly the default zoo's train networks); validation and
test networks are the default zoo's. For each train-set size an aligner trains with the
`aligner` settings for the largest step count, and its test barrier is scored at every step
count of the grid (the live model, no checkpoint selection), beside weight matching's.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from deepalign.config import GridPoints, Iterations, Name, Positive
from deepalign.core.data import DataCfg, Dataset
from deepalign.core.lmc import barriers, interpolate
from deepalign.core.permspec import apply_permutation
from deepalign.core.weightspace import WeightSpace, stack
from deepalign.io import fingerprint, load_checkpoint, load_current, save_current
from deepalign.methods import Problem
from deepalign.methods.deep_align.checkpoint import predict
from deepalign.methods.deep_align.model import DeepAlign
from deepalign.methods.deep_align.train import TRAINING_CODE, AlignerCfg, train
from deepalign.methods.weight_matching import WeightMatchingCfg, weight_matching
from deepalign.zoo.build import (
    NetCfg,
    ZooCfg,
    is_done,
    make_arch,
    planned,
    resolve_device,
    train_chunk,
)
from deepalign.zoo.store import Zoo, ring_pairs


@dataclass(frozen=True)
class StudyCfg:
    """Section `study` of params.yaml."""

    arch: Name  # a zoo architecture
    train_sizes: list[Positive]  # train networks per aligner
    steps: list[Iterations]  # training steps at which the test barrier is scored
    pairs: Positive  # test ring pairs scored
    points: GridPoints  # lambda grid of each barrier


def build_train_networks(
    folder: Path, net: NetCfg, zoo: ZooCfg, data_cfg: DataCfg, data: Dataset, n: int
) -> WeightSpace:
    """The zoo recipe's first n train networks (trained, or read where already done)."""
    wide = dataclasses.replace(net, n_train=n, n_val=0, n_test=0)
    arch = make_arch(wide, data)
    jobs, fps = planned(folder, wide, zoo.seed, arch, data_cfg, key=net)
    todo = [j for j in jobs if not is_done(j, fps[j.index])]
    device = resolve_device(zoo.device)
    for start in range(0, len(todo), zoo.chunk_size):
        train_chunk(arch, todo[start : start + zoo.chunk_size], data, net, fps, device)
    return stack([load_checkpoint(j.path).ws for j in jobs])


def study_zoo(train_nets: WeightSpace, base: Zoo) -> Zoo:
    """Train networks of the study beside the default zoo's val and test networks."""
    keep = torch.tensor(base.indices("val") + base.indices("test"))
    nets = train_nets.replace(
        [torch.cat([t, u]) for t, u in zip(train_nets.tensors(), base.nets[keep].tensors())]
    )
    records = [{"split": "train"}] * train_nets.batch_size + [base.records[i] for i in keep]
    return Zoo(base.arch, records, nets)


def test_barrier(model: DeepAlign, zoo: Zoo, data: Dataset, cfg: StudyCfg) -> float:
    """Mean test loss barrier of the model's hard alignments of the test ring pairs."""
    pairs = ring_pairs(zoo.indices("test"), cfg.pairs)
    ref, other = (zoo.nets[torch.tensor([p[k] for p in pairs])] for k in (0, 1))
    aligned = apply_permutation(other, predict(model.eval(), ref, other), zoo.arch.spec)
    model.train()
    found = [
        barriers(interpolate(zoo.arch, ref[k], aligned[k], data.test, cfg.points))["loss_barrier"]
        for k in range(len(pairs))
    ]
    return sum(found) / len(found)


def weight_matching_barrier(zoo: Zoo, data: Dataset, cfg: StudyCfg, wm: WeightMatchingCfg) -> float:
    pairs = ring_pairs(zoo.indices("test"), cfg.pairs)
    found = []
    for i, j in pairs:
        perm = weight_matching(Problem.of(zoo.nets[i], zoo.nets[j], zoo.arch), wm)
        curve = interpolate(
            zoo.arch,
            zoo.nets[i],
            apply_permutation(zoo.nets[j], perm, zoo.arch.spec),
            data.test,
            cfg.points,
        )
        found.append(barriers(curve)["loss_barrier"])
    return sum(found) / len(found)


def scaling_run(
    zoo: Zoo, data: Dataset, aligner: AlignerCfg, cfg: StudyCfg, state: Path
) -> dict[int, tuple[int, float]]:
    """Train one aligner on `zoo` for max(steps) steps: {mark: (steps taken, test barrier)}.

    Scores are taken at the end of the first epoch that reaches each mark.
    """
    n_train = len(zoo.indices("train"))
    per_epoch = max(1, n_train // aligner.pairs_per_step)
    epochs = math.ceil(max(cfg.steps) / per_epoch)
    run_cfg = dataclasses.replace(aligner, epochs=epochs, val_every=epochs)
    marks: dict[int, tuple[int, float]] = {}

    def score(epoch: int, _: dict, model: DeepAlign) -> None:
        done = (epoch + 1) * per_epoch
        for k in cfg.steps:
            if k not in marks and done >= k:
                marks[k] = (done, test_barrier(model, zoo, data, cfg))

    record = [dataclasses.asdict(run_cfg), n_train, cfg.steps]  # other settings: start over
    fp = fingerprint(record, TRAINING_CODE)
    done = state.with_suffix(".marks.json")  # scores of a finished run: a rerun skips it
    saved = load_current(done, fp)
    if saved is not None:
        return {int(k): tuple(v) for k, v in saved["marks"].items()}
    train(zoo, data, run_cfg, resolve_device(aligner.device), state, fp, score, False)
    save_current(done, {"marks": marks}, fp)
    return marks


def scaling_rows(
    nets: WeightSpace, base: Zoo, data: Dataset, aligner: AlignerCfg, cfg: StudyCfg, states: Path
) -> list[dict]:
    """One row per (train-set size, step mark): the live aligner's test barrier."""
    rows = []
    for n in cfg.train_sizes:
        state = states / f"aligner-{n}.state.pt"  # resumable training state
        found = scaling_run(study_zoo(nets[:n], base), data, aligner, cfg, state)
        rows += [
            {"train_networks": n, "mark": mark, "steps": steps, "deep_align": barrier}
            for mark, (steps, barrier) in found.items()
        ]
    return rows
