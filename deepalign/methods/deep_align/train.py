"""Training DEEP-ALIGN without labels, validation, and its checkpoints.

Each step draws `pairs_per_step` anchor networks A from the zoo's train split and scores
  (a) A against an augmented, permuted copy of itself: cross-entropy of the logits' rows
      and columns against the planted permutation (`supervised`);
  (b) A against another train network B, softly aligned by Sinkhorn: the weight-L2 distance
      in zoo-normalised units (`l2`) and the task loss of (1 - l) A + l P#B at a random l
      per pair on training images (`lmc`).
Semi-amortised training (`unroll_steps` K > 0) scores (b) after K Sinkhorn re-basin steps
from the predicted logits (its random-lambda loss, Adam at `unroll_lr`: what
`deep_align+sinkhorn@K` runs at inference), differentiated through all K steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from deepalign.config import (
    Check,
    Device,
    GridPoints,
    Iterations,
    Name,
    NonNegative,
    Positive,
    PositiveFloat,
    Seed,
    Steps,
    between,
    invalid,
    one_of,
)
from deepalign.core.arch import Arch, as_input
from deepalign.core.assignment import sinkhorn_groups
from deepalign.core.data import Dataset, Split
from deepalign.core.lmc import barriers, interpolate, recovery
from deepalign.core.permspec import (
    Perm,
    apply_permutation,
    apply_soft_permutation,
    invert,
)
from deepalign.core.rebasin import adam_state, lerp_task_loss, sinkhorn_step
from deepalign.core.task import task_loss
from deepalign.core.weightspace import WeightSpace, lerp
from deepalign.errors import DeepAlignError
from deepalign.io import fingerprint, load_current, save_current
from deepalign.methods.deep_align.augment import AugmentCfg, check_rescalable, planted_copies
from deepalign.methods.deep_align.checkpoint import predict, save_aligner
from deepalign.methods.deep_align.model import DeepAlign, ModelCfg, aligner_for
from deepalign.zoo.build import resolve_device
from deepalign.zoo.store import Zoo


@dataclass(frozen=True)
class LossCfg:
    supervised: NonNegative
    l2: NonNegative
    lmc: NonNegative
    lmc_lambda: list[Annotated[float, between(0, 1)]]  # [low, high]: lambda ~ U(low, high)

    def __post_init__(self) -> None:
        if self.supervised + self.l2 + self.lmc == 0:
            raise invalid("supervised", self.supervised, "> 0 when l2 and lmc are 0")
        if len(self.lmc_lambda) != 2 or self.lmc_lambda[0] > self.lmc_lambda[1]:
            raise invalid("lmc_lambda", self.lmc_lambda, "[low, high] with low <= high")


@dataclass(frozen=True)
class AlignerCfg:
    """Section `aligner` of params.yaml."""

    archs: list[Name]  # zoo architectures to train an aligner for
    device: Device  # auto | cpu | cuda
    seed: Seed
    epochs: Iterations  # one epoch: every train network once as anchor
    pairs_per_step: Positive
    lr: PositiveFloat
    lr_schedule: Annotated[str, one_of("constant", "cosine")]  # cosine: to lr / 20 at the end
    ema: Annotated[float, Check(lambda v: 0 <= v < 1, "in [0, 1)")]  # weight EMA decay; 0: off
    weight_decay: NonNegative
    grad_clip: PositiveFloat
    sinkhorn_iterations: Iterations
    tau: PositiveFloat
    unroll_steps: Steps  # Sinkhorn re-basin steps unrolled after the prediction (0: one pass)
    unroll_lr: PositiveFloat  # their Adam learning rate (align.sinkhorn.lr at inference)
    images_per_step: Positive  # training images for the interpolation (task) loss
    val_every: Iterations  # epochs between validations (barrier on val pairs, hard permutations)
    val_pairs: Positive
    val_points: GridPoints  # lambda grid of the validation barrier
    val_bn_images: Positive  # training images for a validation network's BatchNorm statistics
    model: ModelCfg
    augment: AugmentCfg
    loss: LossCfg


def build_model(zoo: Zoo, cfg: ModelCfg) -> DeepAlign:
    """A fresh aligner for the zoo's architecture, normalised by the train split's stds."""
    train = zoo.nets[torch.tensor(zoo.indices("train"))]
    std = torch.stack([t.std() for t in train.tensors()]).clamp_min(1e-8)  # (T,)
    shapes = {k: tuple(t.shape[1:]) for k, t in train.named.items()}
    return aligner_for(zoo.arch, cfg, shapes, std)


def _supervised(logits: dict[str, Tensor], target: Perm) -> Tensor:
    """Cross-entropy over rows (target[i]) and columns (inverse target) of each group."""
    inverse = invert(target)
    total = 0.0
    for g, lg in logits.items():
        n = lg.shape[-1]
        total = total + F.cross_entropy(lg.reshape(-1, n), target[g].reshape(-1))
        total = total + F.cross_entropy(lg.mT.reshape(-1, n), inverse[g].reshape(-1))
    return total / (2 * len(logits))


def _l2(model: DeepAlign, a: WeightSpace, aligned: WeightSpace) -> Tensor:
    """Mean over tensors of the mean squared difference, in zoo-normalised units."""
    a, aligned = model.encoder.normalise(a), model.encoder.normalise(aligned)
    diffs = [((x - y) ** 2).flatten(1).mean(1) for x, y in zip(a.tensors(), aligned.tensors())]
    return torch.stack(diffs).mean()


def partners_of(anchors: Tensor, n: int, views: int, gen: torch.Generator) -> Tensor:
    """Each anchor's partner, never itself: any of the n train networks (views 0: they all fit
    one data set), or another view of the anchor's signal (an INR zoo's consecutive views)."""
    k = len(anchors)
    if not views:
        return (anchors + torch.randint(1, n, (k,), generator=gen)) % n
    first = anchors - anchors % views
    return first + (anchors % views + torch.randint(1, views, (k,), generator=gen)) % views


def views_of(signals: Tensor | None) -> int:
    """Views per signal of an INR zoo's train split (0 for a classifier zoo), checked to be
    consecutive runs of one length, at least 2."""
    if signals is None:
        return 0
    views = len(signals) // len(signals.unique())
    if views < 2 or not torch.equal(signals, signals[::views].repeat_interleave(views)):
        raise DeepAlignError("the zoo's train split needs >= 2 consecutive views per signal")
    return views


def training_step(
    model: DeepAlign,
    arch: Arch,
    train: WeightSpace,
    data: tuple[Split, int],
    cfg: AlignerCfg,
    gen: torch.Generator,
) -> dict[str, Tensor]:
    """The three losses on one batch of pairs (`data`: the train networks' data, and their
    views per signal, 0 for a classifier zoo)."""
    split, views = data
    device = split.x.device
    n, k = train.batch_size, cfg.pairs_per_step
    anchors = torch.randint(n, (k,), generator=gen)
    partners = partners_of(anchors, n, views, gen)
    a, b = train[anchors.to(device)], train[partners.to(device)]
    spec = arch.spec
    copy, target = planted_copies(a, arch, cfg.augment, gen)
    feats = model.features(
        a.replace([torch.cat(ts) for ts in zip(a.tensors(), b.tensors(), copy.tensors())])
    )
    fa, fb, fc = (list(f) for f in zip(*(f.split(k) for f in feats)))
    supervised = _supervised(model.pair_logits((fa, fc), a, copy), target)
    pair = Pair(arch, a, b, split.of_networks(anchors.to(device)))
    logits = unrolled(model.pair_logits((fa, fb), a, b), pair, cfg, gen)
    soft = sinkhorn_groups(logits, cfg.sinkhorn_iterations, cfg.tau)
    aligned = apply_soft_permutation(b, soft, spec)
    low, high = cfg.loss.lmc_lambda
    lam = (low + (high - low) * torch.rand(k, generator=gen)).to(device)
    idx = torch.randint(split.size, (cfg.images_per_step,), generator=gen).to(device)
    x, y = pair.data.examples(idx)
    # BatchNorm: the interpolated networks normalise with their own statistics on these
    # images, as evaluation recomputes them (their parents' running statistics do not fit)
    mixed = lerp(a, aligned, lam)
    out = arch.forward_batched(mixed, as_input(arch, x), train=arch.has_batchnorm)  # (k, I, C)
    lmc = task_loss(out, y, split.task, reduction="mean")
    l2 = _l2(model, a, aligned)
    total = cfg.loss.supervised * supervised + cfg.loss.l2 * l2 + cfg.loss.lmc * lmc
    return {"loss": total, "supervised": supervised, "l2": l2, "lmc": lmc}


@dataclass(frozen=True)
class Pair:
    """Training pairs (ref[k], other[k]) of one architecture and their data (targets per
    pair for an INR zoo)."""

    arch: Arch
    ref: WeightSpace  # (k, ...) batched
    other: WeightSpace  # (k, ...) batched
    data: Split


def unrolled(
    logits: dict[str, Tensor], pair: Pair, cfg: AlignerCfg, gen: torch.Generator
) -> dict[str, Tensor]:
    """`cfg.unroll_steps` Sinkhorn re-basin steps (random-lambda task loss, Adam at
    `cfg.unroll_lr`, `cfg.images_per_step` images a step) from `logits` {g: (k, n, n)},
    differentiable in them; `logits` as they are for 0 steps."""
    groups, values = list(logits), list(logits.values())
    state, k = adam_state(values), pair.ref.batch_size
    device = values[0].device
    for _ in range(cfg.unroll_steps):
        lam = torch.rand(k, generator=gen).to(device)
        idx = torch.randint(pair.data.size, (cfg.images_per_step,), generator=gen).to(device)
        x, y = pair.data.examples(idx)
        batch = Split(x, y, pair.data.task)

        def loss(soft: list[Tensor], part: slice, batch: Split = batch, lam: Tensor = lam):
            aligned = apply_soft_permutation(pair.other, dict(zip(groups, soft)), pair.arch.spec)
            return lerp_task_loss(pair.arch, pair.ref, aligned, batch, lam)

        values, state = sinkhorn_step(
            values,
            state,
            loss,
            cfg.unroll_lr,
            cfg.sinkhorn_iterations,
            cfg.tau,
            create_graph=True,
        )
    return dict(zip(groups, values))


@torch.no_grad()
def validate(
    model: DeepAlign, zoo: Zoo, data: Dataset, cfg: AlignerCfg, device: torch.device
) -> dict[str, float]:
    """Barrier of hard alignments on val pairs (val images), and planted recovery on val nets."""
    model.eval()
    pairs = zoo.pairs("val", cfg.val_pairs)
    ref = zoo.nets[torch.tensor([i for i, _ in pairs])].to(device)
    other = zoo.nets[torch.tensor([j for _, j in pairs])].to(device)
    perms = predict(model, ref, other)
    aligned = apply_permutation(other, {g: p.to(device) for g, p in perms.items()}, zoo.arch.spec)
    splits = [data.val.of_networks(i).to(device) for i, _ in pairs]
    resets = [
        bn_images(zoo.arch, data.train.of_networks(i).to(device), cfg.val_bn_images)
        for i, _ in pairs
    ]
    found = [
        barriers(interpolate(zoo.arch, ref[k], aligned[k], split, cfg.val_points, resets[k]))[
            "loss_barrier"
        ]
        for k, split in enumerate(splits)
    ]
    rec = augmented_recovery(model, zoo.arch, ref, cfg.augment, seed=0)
    model.train()
    return {"val_loss_barrier": sum(found) / len(found), "val_planted_recovery": rec}


def bn_images(arch: Arch, split: Split, count: int) -> Tensor | None:
    """The images that recompute an interpolated network's BatchNorm statistics during
    validation (None without BatchNorm)."""
    return split.x[:count] if arch.has_batchnorm else None


@torch.no_grad()
def augmented_recovery(
    model: DeepAlign, arch: Arch, nets: WeightSpace, augment: AugmentCfg, seed: int
) -> float:
    """Fraction of hidden units recovered on augmented, permuted copies of `nets`."""
    copies, truth = planted_copies(nets, arch, augment, torch.Generator().manual_seed(seed))
    found = predict(model, nets, copies)
    return recovery({g: p.cpu() for g, p in found.items()}, {g: t.cpu() for g, t in truth.items()})


_PKG = Path(__file__).resolve().parents[2]
# The code that decides a trained aligner: a change restarts an interrupted training run.
TRAINING_CODE = (
    *sorted((_PKG / "methods" / "deep_align").glob("*.py")),
    *(_PKG / "core" / f for f in ("arch.py", "assignment.py", "lmc.py", "permspec.py", "task.py")),
)


def aligner_fingerprint(cfg: AlignerCfg, arch: Arch, zoo: str, data: Dataset) -> str:
    """The resume key of a training run: its settings, the zoo it learns from (`zoo_digest`:
    its networks' bytes included), its code."""
    record = {
        "cfg": asdict(cfg),
        "arch": arch.to_dict(),
        "data": data.name,
        "zoo": zoo,
    }
    return fingerprint(record, TRAINING_CODE)


OnEpoch = Callable[[int, dict[str, float], DeepAlign], None]  # epoch, metrics, live model


def train(
    zoo: Zoo,
    data: Dataset,
    cfg: AlignerCfg,
    device: torch.device,
    state: Path,
    fp: str,
    on_epoch: OnEpoch | None = None,
    progress: bool = True,
    desc: str = "train_aligner",
    line: int = 0,
) -> tuple[DeepAlign, dict]:
    """Train with AdamW, validate every `val_every` epochs, keep the best; resumable via `state`.
    The result's `train_seconds` are this call's (0 when nothing was left to train): timings
    stay out of `state` and, through `checkpoint_meta`, out of the saved aligner.
    The progress bar is drawn on terminal line `line` (side-by-side workers get one each)."""
    torch.manual_seed(cfg.seed)
    if cfg.augment.rescale > 0:
        check_rescalable(zoo.arch)
    model = build_model(zoo, cfg.model).to(device)
    # fused: one kernel for the ~200 parameter tensors (a third of an MLP step on the CPU
    # went to the per-tensor update otherwise)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, amsgrad=True, fused=True
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema)) if cfg.ema else None
    run = _resume(state, fp, model, opt, gen, ema)
    judged = ema.module if ema else model  # the weights validated and kept
    seconds = 0.0
    train_idx = zoo.indices("train")
    train_nets = zoo.nets[torch.tensor(train_idx)].to(device)
    views = views_of(zoo.signals(train_idx))
    train_data = (data.train.of_networks(train_idx).to(device), views)
    steps = max(1, train_nets.batch_size // cfg.pairs_per_step)
    bar = tqdm(
        range(run["epoch"], cfg.epochs),
        desc=desc,
        position=line,
        disable=not progress,
        mininterval=2.0,
        unit="epoch",
        initial=run["epoch"],
        total=cfg.epochs,
    )
    for epoch in bar:
        start, sums = time.perf_counter(), {}
        for i in range(steps):
            set_lr(opt, cfg, (epoch * steps + i) / (cfg.epochs * steps))
            losses = training_step(model, zoo.arch, train_nets, train_data, cfg, gen)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=True)
            opt.step()
            if ema:
                ema.update_parameters(model)
            sums = {k: sums.get(k, 0.0) + v.item() / steps for k, v in losses.items()}
        seconds += time.perf_counter() - start
        if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
            sums |= validate(judged, zoo, data, cfg, device)
            _keep_best(run, judged, sums, epoch)
            _save_state(state, fp, (model, opt, gen, ema), run, epoch + 1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in sums.items() if k != "loss"})
        if on_epoch:
            on_epoch(epoch, sums, model)
    judged.load_state_dict(run["best_state"])
    result = {k: v for k, v in run.items() if k != "best_state"}
    return judged.eval(), result | {"train_seconds": seconds}


def checkpoint_meta(result: dict) -> dict:
    """A training result as an aligner checkpoint's metadata: all but its timings (those go to
    the metrics files) and the epoch this call started from (0, or where an interrupted run
    stopped), so that the same training writes the same bytes, resumed or not."""
    return {k: v for k, v in result.items() if k not in ("train_seconds", "epoch")}


def state_path(out: Path) -> Path:
    """Where an interrupted training run of aligner file `out` keeps its progress."""
    return out.with_name(f"{out.stem}.state.pt")


def train_and_save(
    zoo: Zoo,
    data: Dataset,
    cfg: AlignerCfg,
    out: Path,
    fp: str,
    held_out: str,
    meta: dict,
    on_epoch: OnEpoch | None = None,
    progress: bool = True,
    desc: str = "train_aligner",
    line: int = 0,
) -> dict[str, float]:
    """Train (or resume, from `state_path(out)`) an aligner on the zoo's train split, score its
    planted recovery on augmented copies of the `held_out` split's networks and save the best
    epoch's aligner to `out` with `meta`; its numbers (best validation barrier and recovery,
    epoch, seconds, held-out recovery). The pipeline's zoo stages and `deepalign
    train-aligner` both train here."""
    device = resolve_device(cfg.device)
    state = state_path(out)
    model, result = train(zoo, data, cfg, device, state, fp, on_epoch, progress, desc, line)
    nets = zoo.nets[torch.tensor(zoo.indices(held_out))].to(device)
    recovered = augmented_recovery(model, zoo.arch, nets, cfg.augment, seed=1)
    result[f"{held_out}_planted_recovery_augmented"] = recovered
    save_aligner(out, model, zoo.arch, {"fingerprint": fp} | meta | checkpoint_meta(result))
    numbers = {k: float(v) for k, v in result.items() if k != "epoch"}
    return numbers | {"device_cuda": float(device.type == "cuda")}


def set_lr(opt: torch.optim.Optimizer, cfg: AlignerCfg, progress: float) -> None:
    """The learning rate at `progress` in [0, 1) of training: constant, or cosine to lr / 20."""
    lr = cfg.lr
    if cfg.lr_schedule == "cosine":
        lr = cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
    for group in opt.param_groups:
        group["lr"] = lr


def _keep_best(run: dict, model: DeepAlign, metrics: dict, epoch: int) -> None:
    if metrics["val_loss_barrier"] < run["best_val_loss_barrier"]:
        run["best_val_loss_barrier"] = metrics["val_loss_barrier"]
        run["best_val_planted_recovery"] = metrics["val_planted_recovery"]
        run["best_epoch"] = epoch
        run["best_state"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


Trainer = tuple[DeepAlign, torch.optim.Optimizer, torch.Generator, AveragedModel | None]


def _save_state(path: Path, fp: str, trainer: Trainer, run: dict, epoch: int) -> None:
    model, opt, gen, ema = trainer
    blob = {
        "epoch": epoch,
        "model": model.state_dict(),
        "opt": opt.state_dict(),
        "gen": gen.get_state(),
        "ema": ema.state_dict() if ema else {},
        "run": run,
    }
    save_current(path, blob, fp)


def _resume(
    path: Path,
    fp: str,
    model: DeepAlign,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    ema: AveragedModel | None,
) -> dict:
    """Training progress saved by an interrupted run with the same settings, else a fresh one."""
    fresh = {
        "epoch": 0,
        "best_val_loss_barrier": float("inf"),
        "best_val_planted_recovery": 0.0,
        "best_epoch": -1,
        "best_state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }
    blob = load_current(path, fp)
    if blob is None:  # no state, a truncated one, or other settings: start over
        return fresh
    model.load_state_dict(blob["model"])
    opt.load_state_dict(blob["opt"])
    gen.set_state(blob["gen"])
    if ema:
        ema.load_state_dict(blob["ema"])
    return blob["run"] | {"epoch": blob["epoch"]}
