"""The model zoo: many small networks of one architecture trained from distinct seeds.

Networks train many at a time: their parameters are stacked along a batch dimension, one
batched forward pass (`forward_batched`: batched matmuls, grouped convolutions) serves them
all, and the optimiser (Adam or SGD: elementwise) updates them as independent networks. Each
network keeps its own initialisation and data order, so the batched path matches the
one-by-one reference (`train_one`) up to float rounding.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from deepalign.config import Device, Name, Positive, Seed
from deepalign.core.arch import Arch, as_input
from deepalign.core.data import DataCfg, Dataset, Split
from deepalign.core.lmc import evaluate_networks, reset_statistics
from deepalign.core.task import task_loss
from deepalign.core.weightspace import WeightSpace, stack
from deepalign.errors import DeepAlignError
from deepalign.io import (
    compact_checkpoint,
    digest,
    fingerprint,
    load_checkpoint,
    save_checkpoint,
    write_json,
)
from deepalign.memory import check_fits
from deepalign.zoo.kinds import NetCfg, make_arch

SPLITS = ("train", "val", "test")
_PKG = Path(__file__).resolve().parents[1]
# The code that decides a trained network: a change retrains resumed zoos.
TRAINING_CODE = (
    *(_PKG / "zoo" / f for f in ("build.py", "kinds.py")),
    *(_PKG / "core" / f for f in ("arch.py", "chain.py", "resnet.py", "weightspace.py", "data.py")),
    *(_PKG / "core" / f for f in ("shifts.py", "signals.py", "task.py")),
)


@dataclass(frozen=True)
class ZooCfg:
    seed: Seed  # network j of an architecture is trained from seed + j
    chunk_size: Positive  # networks trained together (and one unit of work for a task runner)
    device: Device
    archs: dict[Name, NetCfg]  # a recipe per architecture, by folder name


@dataclass(frozen=True)
class Job:
    """One network to train."""

    index: int
    seed: int
    split: str
    path: Path
    signal: int | None = None  # INR zoos: the signal it fits (its views are consecutive)


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeepAlignError(f"device '{name}' asked for but no CUDA device is available")
    return torch.device(name)


def network_fingerprint(
    arch: Arch, net: NetCfg, data: DataCfg, seed: int, shift: dict | None = None
) -> str:
    """The resume key of one trained network: its settings, seed, data shift and training
    code."""
    record = {"arch": arch.to_dict(), "net": asdict(net), "data": asdict(data), "seed": seed}
    if shift:
        record["shift"] = shift
    return fingerprint(record, TRAINING_CODE)


def planned(
    folder: Path,
    net: NetCfg,
    seed: int,
    arch: Arch,
    data: DataCfg,
    key: NetCfg | None = None,
    shift: dict | None = None,
    views: int = 0,
) -> tuple[list[Job], dict[int, str]]:
    """Every network of one architecture's plan, and the fingerprint each is trained under
    (from `key`'s settings where given: the study trains more networks of the zoo's recipe)."""
    jobs = plan(folder, net, seed, views)
    fps = {j.index: network_fingerprint(arch, key or net, data, j.seed, shift) for j in jobs}
    return jobs, fps


def train_zoo(
    folder: Path,
    name: str,
    net: NetCfg,
    seed: int,
    data: tuple[Dataset, DataCfg],
    shift: dict | None = None,
    views: int = 0,
) -> tuple[list[dict], int]:
    """Train on the CPU, in one group, the networks of a recipe not yet trained with these
    settings (it resumes), and write the zoo's manifest: every record, and how many trained.

    `data`: the (possibly shifted) data set and the config it was loaded with; `shift`: what
    shifted it (part of each network's resume key); `views`: INR zoos, fits per signal.
    """
    dataset, data_cfg = data
    arch = make_arch(net, dataset)
    jobs, fps = planned(folder, net, seed, arch, data_cfg, shift=shift, views=views)
    todo = [j for j in jobs if not is_done(j, fps[j.index])]
    if todo:
        train_chunk(arch, todo, dataset, net, fps, torch.device("cpu"))
    records = read_records(jobs)
    write_manifest(folder, name, arch, records)
    return records, len(todo)


def plan(out_dir: Path, net: NetCfg, seed: int, views: int = 0) -> list[Job]:
    """Every network of one architecture: seeds, zoo split and checkpoint path (with `views`,
    an INR zoo: network j fits signal j // views)."""
    counts = {"train": net.n_train, "val": net.n_val, "test": net.n_test}
    splits = [s for s in SPLITS for _ in range(counts[s])]
    return [
        Job(j, seed + j, s, out_dir / f"net-{j:04d}.pt", j // views if views else None)
        for j, s in enumerate(splits)
    ]


def is_done(job: Job, fp: str) -> bool:
    """A finished network: its checkpoint loads and was trained with the same settings.

    A finished checkpoint written before zoo files held only their own network is rewritten
    once, compactly (same tensors, same metadata).
    """
    if not job.path.is_file():
        return False
    try:
        ckpt = load_checkpoint(job.path)
    except DeepAlignError:
        return False
    done = ckpt.meta.get("fingerprint") == fp
    bloated = any(t.untyped_storage().nbytes() > t.nbytes for t in ckpt.native.tensors())
    if done and bloated:  # read the file again only where there is something to rewrite
        compact_checkpoint(job.path)
    return done


def init_network(arch: Arch, seed: int) -> WeightSpace:
    """PyTorch's default initialisation, seeded, without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = arch.build()
    state = {k: v.detach() for k, v in model.state_dict().items() if v.is_floating_point()}
    return arch.weightspace(state)


def make_optimizer(params: list[Tensor], net: NetCfg, fused: bool = False) -> torch.optim.Optimizer:
    """The recipe's optimiser; elementwise, so batched networks stay independent. `fused`:
    one kernel per step for all tensors (~10% of an MLP step on CPU otherwise)."""
    if net.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=net.lr, momentum=net.momentum, weight_decay=net.weight_decay
        )
    return torch.optim.Adam(
        params, lr=net.lr, weight_decay=net.weight_decay, fused=True if fused else None
    )


def _epoch_orders(gens: list[torch.Generator], n: int) -> Tensor:
    """A fresh shuffle of the n training examples per network: (B, n)."""
    return torch.stack([torch.randperm(n, generator=g) for g in gens])


def train_batched(
    arch: Arch,
    ws: WeightSpace,
    data: Split,
    net: NetCfg,
    seeds: list[int],
    device: torch.device,
    progress: bool = True,
) -> WeightSpace:
    """Train B networks at once from batched `ws`; network b shuffles data with seeds[b].

    Normalisation layers use batch statistics; the trained networks' running statistics are
    then computed on the training images (`reset_statistics`).
    """
    trained = [k for k in ws.named if k not in ws.buffers]
    params = [ws.named[k].detach().clone().to(device).requires_grad_() for k in trained]
    base = ws.to(device)
    opt = make_optimizer(params, net, fused=True)
    here = data.to(device)
    x = as_input(arch, here.x)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    n, bs = here.size, net.batch_size
    steps = math.ceil(n / bs)
    bar = tqdm(
        total=net.epochs * steps,
        desc=f"training {len(seeds)} nets",
        disable=not progress,
        mininterval=2.0,
        unit="step",
    )
    for _ in range(net.epochs):
        order = _epoch_orders(gens, n).to(device)  # (B, n)
        for s in range(steps):
            idx = order[:, s * bs : (s + 1) * bs]  # (B, b)
            current = base.with_tensors(dict(zip(trained, params)))
            out = arch.forward_batched(current, x[idx], train=True)  # (B, b, C)
            loss = task_loss(out, _batch_targets(here, idx), here.task)
            opt.zero_grad(set_to_none=True)
            (loss / idx.shape[1]).backward()  # sum over networks of each one's mean loss
            opt.step()
            bar.update()
    bar.close()
    out = ws.with_tensors({k: p.detach().cpu() for k, p in zip(trained, params)})
    return reset_statistics(arch, out, data.x)


def _batch_targets(data: Split, idx: Tensor) -> Tensor:
    """Each network's targets of its own batch idx (B, b): (B, b) labels or (B, b, out)."""
    if data.per_network:
        return torch.take_along_dim(data.y, idx.unsqueeze(-1), dim=1)
    return data.y[idx]


def train_one(arch: Arch, ws: WeightSpace, data: Split, net: NetCfg, seed: int) -> WeightSpace:
    """Reference path: one `nn.Module` trained with a plain loop."""
    model = arch.build()
    model.load_state_dict(arch.state_dict(ws))
    opt = make_optimizer(list(model.parameters()), net)
    x = as_input(arch, data.x)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(net.epochs):
        order = torch.randperm(data.size, generator=gen)
        for batch in order.split(net.batch_size):
            _, y = data.examples(batch)
            loss = task_loss(model(x[batch]).unsqueeze(0), y, data.task, reduction="mean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    state = {k: v.detach() for k, v in model.state_dict().items() if v.is_floating_point()}
    return arch.weightspace(state)


def train_chunk(
    arch: Arch,
    jobs: list[Job],
    data: Dataset,
    net: NetCfg,
    fp_of: dict[int, str],
    device: torch.device,
    progress: bool = True,
) -> list[dict]:
    """Train, evaluate and save a group of networks; return their manifest records (no timings:
    the same networks write the same bytes; callers time the call for their metrics)."""
    seeds = [j.seed for j in jobs]
    check_training_memory(arch, net, len(jobs), jobs[0].path.parent)
    ws = stack([init_network(arch, s) for s in seeds])
    index = [j.index for j in jobs]  # each network's own targets, where they differ
    trained = train_batched(arch, ws, data.train.of_networks(index), net, seeds, device, progress)
    trained = arch.canonical(trained)  # stored free of the activation's own symmetries
    check_trained(trained, jobs, net)
    loss, acc = evaluate_networks(arch, trained, data.test.of_networks(index))
    records = []
    for b, job in enumerate(jobs):
        meta = {
            "index": job.index,
            "seed": job.seed,
            "split": job.split,
            "test_loss": float(loss[b]),
            "test_acc": float(acc[b]),
            "fingerprint": fp_of[job.index],
        } | ({"signal": job.signal} if job.signal is not None else {})
        save_checkpoint(job.path, arch, trained[b], meta)
        records.append(meta | {"path": job.path.name})
    return records


def check_training_memory(arch: Arch, net: NetCfg, count: int, folder: Path) -> None:
    """Refuse to train `count` networks at once when their parameters, gradients, Adam's
    moments and the widest activation of a batch cannot fit in memory."""
    params = sum(math.prod(s) for s in arch.shapes().values())
    nbytes = 4 * count * (5 * params + 3 * net.batch_size * arch.widest())
    what = f"{folder}: training {count} networks of {params:,} parameters at once"
    check_fits(nbytes, f"{what} (lower zoo.chunk_size or the widths)")


def check_trained(trained: WeightSpace, jobs: list[Job], net: NetCfg) -> None:
    """Refuse to save networks whose training diverged (NaN or inf weights), naming them."""
    finite = torch.isfinite(trained.flatten()).all(dim=1)  # (B,)
    bad = [j.path.name for j, ok in zip(jobs, finite.tolist()) if not ok]
    if bad:
        folder = jobs[0].path.parent
        raise DeepAlignError(
            f"{folder}: training diverged (NaN or inf weights in {len(bad)} of {len(jobs)} "
            f"networks, e.g. {bad[0]}); nothing saved: lower the learning rate "
            f"(zoo.archs.{folder.name}.lr, now {net.lr:g})"
        )


def read_records(jobs: list[Job]) -> list[dict]:
    """Manifest records of finished networks, from their checkpoints."""
    return [load_checkpoint(j.path).meta | {"path": j.path.name} for j in jobs]


def write_manifest(out_dir: Path, name: str, arch: Arch, records: list[dict]) -> Path:
    path = out_dir / "manifest.json"
    records = sorted(records, key=lambda r: r["index"])
    write_json(path, {"name": name, "arch": arch.to_dict(), "networks": records})
    return path


def manifest_digest(manifest: Path) -> str:
    """A zoo's identity for downstream fingerprints: its manifest (which holds no timings).

    Each record keeps the network's training fingerprint and its exact test loss and
    accuracy, so other weights change the digest; a zoo resumed under another load does not.
    """
    return digest(json.loads(manifest.read_text()), length=64)


def summarize(records: list[dict], trained_this_run: int, seconds: float) -> dict[str, float]:
    """Zoo metrics: test accuracy statistics over all networks; the networks trained this run
    and the `seconds` the caller's clock gave their training (0 when all were resumed)."""
    acc = torch.tensor([r["test_acc"] for r in records])
    loss = torch.tensor([r["test_loss"] for r in records])
    return {
        "n_networks": len(records),
        "test_acc_mean": acc.mean().item(),
        "test_acc_std": acc.std().item() if len(acc) > 1 else 0.0,
        "test_acc_min": acc.min().item(),
        "test_loss_mean": loss.mean().item(),
        "trained_this_run": trained_this_run,
        "train_seconds": seconds,
        "networks_per_second": trained_this_run / seconds if seconds > 0 else 0.0,
    }


def recipe_of(zoo: ZooCfg, arch: str, where: str) -> NetCfg:
    """The default zoo's recipe for `arch`, or an error naming the key `where` asked for it."""
    if arch not in zoo.archs:
        known = ", ".join(zoo.archs)
        raise DeepAlignError(f"{where}: '{arch}' is not in zoo.archs (known: {known})")
    return zoo.archs[arch]
