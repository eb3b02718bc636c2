"""Stage `study` (study/dvc.yaml, outside the default run): DEEP-ALIGN vs zoo size and steps."""

from __future__ import annotations

from prefect import flow

import flows  # noqa: F401  (offline defaults first)
from deepalign.core.data import DataCfg, load_dataset
from deepalign.evaluation.figures import plot_scaling
from deepalign.evaluation.study import (
    StudyCfg,
    build_train_networks,
    scaling_rows,
    weight_matching_barrier,
)
from deepalign.io import write_csv
from deepalign.methods.deep_align.train import AlignerCfg
from deepalign.methods.weight_matching import WeightMatchingCfg
from deepalign.zoo.build import ZooCfg
from deepalign.zoo.store import load_zoo
from flows.common import cli, stage_run
from flows.stages import Paths, Plot, Stage

STAGE = Stage(
    "study",
    configs={
        "data_cfg": "data",
        "zoo_cfg": "zoo",
        "aligner": "aligner",
        "wm": "align.weight_matching",
        "cfg": "study",
    },
    params=("data", "zoo", "aligner", "align.weight_matching", "study"),
    deps={"zoo": "zoo"},
    persist={"out": "study/zoo"},
    plots={"table": "plots/aligner_scaling.csv"},
    uncached={"figure": "figures/aligner_scaling.png"},
    metrics={"metrics": "metrics/study.json"},
    plot={
        "table": Plot(
            "train_networks", "deep_align", "train networks", "test loss barrier", "by_steps"
        )
    },
    notes={"out": "(its own zoo, resumable)"},
    pipeline="study/dvc.yaml",
)


@flow(name="study", validate_parameters=False)
def study(
    io: Paths,
    data_cfg: DataCfg,
    zoo_cfg: ZooCfg,
    aligner: AlignerCfg,
    wm: WeightMatchingCfg,
    cfg: StudyCfg,
) -> dict:
    """Test barrier of DEEP-ALIGN per train-set size and step count, and weight matching's."""
    data, base = load_dataset(data_cfg), load_zoo(io.zoo / cfg.arch)
    with stage_run(STAGE, io, cfg=cfg, aligner=aligner) as run:
        net, size = zoo_cfg.archs[cfg.arch], max(cfg.train_sizes)
        nets = build_train_networks(io.out / cfg.arch, net, zoo_cfg, data_cfg, data, size)
        rows = scaling_rows(nets, base, data, aligner, cfg, io.out)
        wm_barrier = weight_matching_barrier(base, data, cfg, wm)
        marks = {f"n{r['train_networks']}_s{r['mark']}": r["deep_align"] for r in rows}
        run.metrics["metrics"] = {"weight_matching": wm_barrier} | marks
        write_csv(io.table, [r | {"weight_matching": wm_barrier} for r in rows])
        plot_scaling(io.figure, rows, wm_barrier, f"digits {cfg.arch}")
    return run.metrics


if __name__ == "__main__":
    cli(study)
