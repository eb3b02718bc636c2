"""Stage `align`: every configured method on the zoo's test pairs; resumes per method.

A method's saved alignment holds no timings (the same alignment writes the same bytes); its
seconds per pair go to the stage's metrics file, which DVC keeps across runs and the flow
rewrites as each method finishes, so that a resumed method keeps the seconds it took."""

from __future__ import annotations

from pathlib import Path

import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

import flows  # noqa: F401  (offline defaults first)
from deepalign.core.data import DataCfg, Dataset, load_dataset
from deepalign.evaluation.experiment import AlignCfg, run_fingerprint, run_method
from deepalign.evaluation.pairs import load_run, save_run
from deepalign.io import read_result, write_json
from deepalign.methods import Method
from deepalign.zoo.store import Zoo, load_zoo, zoo_digest
from flows.common import cli, log_method_run, stage_run, track
from flows.stages import Paths, Stage

STAGE = Stage(
    "align",
    configs={"data_cfg": "data", "cfg": "align"},
    params=("runner", "data", "align"),
    reads=("aligner",),
    deps={"zoo": "zoo"},
    persist={"out": "aligned"},
    metrics={"metrics": "metrics/align.json"},
    kept=("metrics",),
    nested=("metrics",),
    notes={
        "out": "(`<arch>/<method>.pt`: permutations, recovery)",
        "metrics": "(seconds per pair, kept across runs)",
    },
    fan_out=True,  # one task per architecture and method
)


_ZOOS: dict[tuple[Path, str], Zoo] = {}


def zoo_of(folder: Path, data: Dataset, digest: str) -> Zoo:
    """The zoo in `folder` with content `digest`, read (and checked against `data`) once per
    process, not once per method."""
    if (folder, digest) not in _ZOOS:
        _ZOOS[(folder, digest)] = load_zoo(folder, data)
    return _ZOOS[(folder, digest)]


SHOWN = ("seconds_per_pair_mean", "planted_recovery_mean")  # per method, in MLflow


@task(cache_policy=NO_CACHE)
def align_method(
    method: str, arch: str, io: Paths, data: Dataset, data_cfg: DataCfg, cfg: AlignCfg, kept: dict
) -> dict:
    """Align one architecture's pairs with one method, unless already done with these settings
    (its saved alignment and `kept`, its timings of a former run, under the same fingerprint);
    its seconds per pair, their mean and the planted recovery."""
    path = io.out / arch / f"{method}.pt"
    content = zoo_digest(io.zoo / arch)
    fp = run_fingerprint(method, cfg, data_cfg, content)
    former = kept.get("seconds_per_pair") if kept.get("fingerprint") == fp else None
    result = load_run(path, fp) if isinstance(former, list) else None
    if result is None or len(former) != len(result.pairs):
        result = run_method(method, zoo_of(io.zoo / arch, data, content), data, cfg)
        save_run(path, result, fp)
        kept = {"fingerprint": fp, "seconds_per_pair": result.seconds.tolist()}
    seconds = torch.tensor(kept["seconds_per_pair"], dtype=torch.float64)  # (K,)
    recovery = result.planted_recovery.mean().item()
    return kept | dict(zip(SHOWN, (seconds.mean().item(), recovery)))


def former_timings(path: Path) -> dict[tuple[str, str], dict]:
    """The timings a former run recorded in `path`, by (arch, method); none where unreadable."""
    found = read_result(path) or {}
    return {
        (arch, method): timings
        for arch, methods in found.items()
        if isinstance(methods, dict)
        for method, timings in methods.items()
        if isinstance(timings, dict)
    }


@flow(name="align", validate_parameters=False)
def align(io: Paths, data_cfg: DataCfg, cfg: AlignCfg) -> dict:
    """Run every configured method on every configured architecture."""
    data = load_dataset(data_cfg)
    kept = former_timings(io.metrics)
    with stage_run(STAGE, io, data_cfg=data_cfg, cfg=cfg) as run:
        timings = run.metrics.setdefault("metrics", {})
        tasks = [(arch, method) for arch in cfg.archs for method in cfg.methods]
        # the iterative (slow) methods first, so that parallel workers finish together
        tasks.sort(key=lambda task: not Method.parse(task[1]).iterative)
        futures = {
            (arch, method): align_method.submit(
                method, arch, io, data, data_cfg, cfg, kept.get((arch, method), {})
            )
            for arch, method in tasks
        }  # fan-out: one task per architecture and method; MLflow written from here alone

        def finished(key: tuple[str, str], found: dict) -> None:
            timings.setdefault(key[0], {})[key[1]] = found
            write_json(io.metrics, timings)  # a killed run keeps the seconds of what it did
            log_method_run(run, STAGE.name, *key, {k: found[k] for k in SHOWN})

        track(futures, STAGE.name, "method", finished)
        run.metrics["metrics"] = {a: {m: timings[a][m] for m in cfg.methods} for a in cfg.archs}
    return run.metrics


if __name__ == "__main__":
    cli(align)
