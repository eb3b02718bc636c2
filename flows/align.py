"""Stage `align`: every configured method on the zoo's test pairs; resumes per method."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

import flows  # noqa: F401  (offline defaults first)
from deepalign.core.data import DataCfg, Dataset, load_dataset
from deepalign.evaluation.experiment import AlignCfg, run_fingerprint, run_method
from deepalign.evaluation.pairs import load_run, save_run
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
    notes={"out": "(`<arch>/<method>.pt`: permutations, seconds, recovery)"},
    fan_out=True,  # one task per architecture and method
)


_ZOOS: dict[tuple[Path, str], Zoo] = {}


def zoo_of(folder: Path, data: Dataset, digest: str) -> Zoo:
    """The zoo in `folder` with content `digest`, read (and checked against `data`) once per
    process, not once per method."""
    if (folder, digest) not in _ZOOS:
        _ZOOS[(folder, digest)] = load_zoo(folder, data)
    return _ZOOS[(folder, digest)]


@task(cache_policy=NO_CACHE)
def align_method(
    method: str, arch: str, io: Paths, data: Dataset, data_cfg: DataCfg, cfg: AlignCfg
) -> dict[str, float]:
    """Align one architecture's pairs with one method, unless already done with these
    settings; its mean seconds per pair and planted recovery."""
    path = io.out / arch / f"{method}.pt"
    content = zoo_digest(io.zoo / arch)
    fp = run_fingerprint(method, cfg, data_cfg, content)
    result = load_run(path, fp)
    if result is None:
        result = run_method(method, zoo_of(io.zoo / arch, data, content), data, cfg)
        save_run(path, result, fp)
    seconds, recovery = result.seconds.mean().item(), result.planted_recovery.mean().item()
    return {"seconds_per_pair_mean": seconds, "planted_recovery_mean": recovery}


@flow(name="align", validate_parameters=False)
def align(io: Paths, data_cfg: DataCfg, cfg: AlignCfg) -> dict:
    """Run every configured method on every configured architecture."""
    data = load_dataset(data_cfg)
    with stage_run(STAGE, io, data_cfg=data_cfg, cfg=cfg) as run:
        tasks = [(arch, method) for arch in cfg.archs for method in cfg.methods]
        # the iterative (slow) methods first, so that parallel workers finish together
        tasks.sort(key=lambda task: not Method.parse(task[1]).iterative)
        futures = {
            (arch, method): align_method.submit(method, arch, io, data, data_cfg, cfg)
            for arch, method in tasks
        }  # fan-out: one task per architecture and method; MLflow written from here alone
        for (arch, method), found in track(futures, STAGE.name, "method").items():
            log_method_run(run, STAGE.name, arch, method, found)
    return run.metrics


if __name__ == "__main__":
    cli(align)
