"""Stage `converge`: Sinkhorn re-basin from the identity, weight matching and DEEP-ALIGN."""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

import flows  # noqa: F401  (offline defaults first)
from deepalign.core.data import DataCfg, Dataset, load_dataset
from deepalign.evaluation import convergence as cv
from deepalign.evaluation.figures import plot_convergence
from deepalign.io import write_csv
from deepalign.methods import MethodsCfg
from deepalign.zoo.store import load_zoo
from flows.common import StageRun, cli, log_method_run, stage_run, track, untimed
from flows.stages import Paths, Plot, Stage

STAGE = Stage(
    "converge",
    configs={"data_cfg": "data", "methods": "align", "cfg": "converge"},
    params=("data", "align.weight_matching", "align.sinkhorn", "align.deep_align", "converge"),
    partial=("methods",),  # the method settings of `align`
    reads=("aligner",),
    deps={"zoo": "zoo"},
    plots={"plots": "plots/converge"},
    uncached={"figures": "figures/converge"},
    metrics={"metrics": "metrics/converge.json"},
    nested=("metrics",),  # per architecture and start, the barrier as a metric with steps
    plot={
        "plots": Plot(
            "steps", "loss_barrier", "Sinkhorn steps", "test loss barrier", "by_method_log"
        )
    },
    notes={
        "plots": "(`refine_convergence_<arch>.csv`)",
        "figures": "(`refine_convergence_<arch>.png`)",
    },
)


@task(cache_policy=NO_CACHE)
def converge_arch(
    arch: str, run: StageRun, data: Dataset, methods: MethodsCfg, cfg: cv.ConvergeCfg
) -> dict:
    """Barrier-vs-steps of the three starts on one architecture's test pairs."""
    rows, layers = cv.refine_rows(arch, load_zoo(run.io.zoo / arch, data), data, methods, cfg)
    summary = cv.summarize_convergence(rows, cfg.steps, methods.sinkhorn.steps)
    target = summary["target_loss_barrier"]["value"]
    for start, found in summary.items():
        if start != "target_loss_barrier":
            log_method_run(run, STAGE.name, arch, start, found | {"target_loss_barrier": target})
    summary["deep_align"]["per_group"] = cv.summarize_layers(layers)
    figure = run.io.figures / f"refine_convergence_{arch}.png"
    write_csv(run.io.plots / f"refine_convergence_{arch}.csv", untimed(rows))
    plot_convergence(figure, rows, target, f"digits {arch}")
    return summary


@flow(name="converge", validate_parameters=False)
def converge(io: Paths, data_cfg: DataCfg, methods: MethodsCfg, cfg: cv.ConvergeCfg) -> dict:
    """How many Sinkhorn steps each start needs to reach plain Sinkhorn's final barrier."""
    data = load_dataset(data_cfg)
    with stage_run(STAGE, io, data_cfg=data_cfg, methods=methods, cfg=cfg) as run:
        futures = {a: converge_arch.submit(a, run, data, methods, cfg) for a in cfg.archs}
        run.metrics["metrics"] = track(futures, STAGE.name, "arch")
    return run.metrics


if __name__ == "__main__":
    cli(converge)
