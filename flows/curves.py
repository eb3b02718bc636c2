"""Stage `curves`: Bezier curves between the endpoints of every alignment, and PAM."""

from __future__ import annotations

import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from tqdm import tqdm

import flows  # noqa: F401  (offline defaults first)
from deepalign.core.data import DataCfg, Dataset, load_dataset
from deepalign.evaluation import curves as mc
from deepalign.evaluation.figures import plot_curve_accuracy
from deepalign.evaluation.pairs import saved_run
from deepalign.io import write_csv
from deepalign.zoo.store import load_zoo
from flows.common import StageRun, cli, log_method_run, stage_run
from flows.stages import Paths, Plot, Stage

STAGE = Stage(
    "curves",
    configs={"data_cfg": "data", "cfg": "curves"},
    params=("data", "curves"),
    deps={"zoo": "zoo", "aligned": "aligned"},
    plots={"plots": "plots/curves"},
    uncached={"figures": "figures/curves"},
    metrics={"metrics": "metrics/curves.json"},
    plot={"plots": Plot("t", "curve_acc", "t along the curve", "test accuracy")},
    nested=("metrics",),
    notes={"plots": "(`curves_<arch>.csv`)", "figures": "(`curves_<arch>.png`)"},
)


@task(cache_policy=NO_CACHE)
def curves_for_arch(arch: str, run: StageRun, data: Dataset, cfg: mc.CurvesCfg) -> dict:
    """Fit and score curves for every method's alignment of one architecture's pairs."""
    zoo, results, k = load_zoo(run.io.zoo / arch, data), {}, cfg.pairs
    for method in tqdm(cfg.methods, desc=f"curves {arch}", unit="method", mininterval=1.0):
        aligned = saved_run(run.io.aligned, arch, method)
        a, _, b = mc.endpoints(zoo.arch, zoo.nets, aligned.pairs[:k], aligned.perms)
        results[method] = mc.fit_and_evaluate(zoo.arch, a, b, data.train, data.test, cfg)
    if cfg.pam_from:
        aligned = saved_run(run.io.aligned, arch, cfg.pam_from)
        a, b_raw, _ = mc.endpoints(zoo.arch, zoo.nets, aligned.pairs[:k], aligned.perms)
        perms = {g: p[:k] for g, p in aligned.perms.items()}
        pam = mc.pam_and_evaluate(zoo.arch, a, b_raw, perms, data.train, data.test, cfg)
        results[f"{cfg.pam_from}+pam"] = pam[0]
    summary = {m: mc.summarize_curves(r) for m, r in results.items()}
    for method, metrics in summary.items():
        log_method_run(run, STAGE.name, arch, method, metrics)
    write_csv(run.io.plots / f"curves_{arch}.csv", mc.curve_rows(results))
    plot_curve_accuracy(run.io.figures / f"curves_{arch}.png", results, f"digits {arch}")
    return summary


@flow(name="curves", validate_parameters=False)
def curves(io: Paths, data_cfg: DataCfg, cfg: mc.CurvesCfg) -> dict:
    """Mode-connectivity curves for every configured alignment, logged to MLflow."""
    data = load_dataset(data_cfg)
    torch.manual_seed(cfg.fit.seed)
    with stage_run(STAGE, io, data_cfg=data_cfg, cfg=cfg) as run:
        futures = {a: curves_for_arch.submit(a, run, data, cfg) for a in cfg.archs}
        run.metrics["metrics"] = {a: f.result() for a, f in futures.items()}
    return run.metrics


if __name__ == "__main__":
    cli(curves)
