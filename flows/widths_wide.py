"""Stage `widths` (study pipeline): the paper's regime, DEEP-ALIGN's recipe on MLP zoos of
several widths (`quality.widths.widths_wide`: the default zoo's recipe at that hidden width, a zoo
of its own each), each aligner variant of `quality.stages.widths` trained from every seed and
scored against weight matching on the zoo's test pairs. Width 128 is stage `widths_wide`, so
that each stays within 15 minutes."""

from __future__ import annotations

from prefect import flow

import flows  # noqa: F401  (offline defaults first)
from deepalign.core.data import DataCfg
from deepalign.evaluation.experiment import AlignCfg
from deepalign.evaluation.quality import QualityCfg
from deepalign.methods.deep_align.train import AlignerCfg
from deepalign.zoo import build
from flows.common import cli
from flows.stages import Paths, Stage
from flows.studies import ALIGN_KEYS
from flows.variants import width_variants

STAGE = Stage(
    "widths_wide",
    configs={
        "data_cfg": "data",
        "zoo_cfg": "zoo",
        "cfg": "quality",
        "recipe": "aligner",
        "align": "align",
    },
    params=(
        "data",
        "zoo.archs",
        "quality",
        "aligner",
        *(k for k in ALIGN_KEYS if k != "align.deep_align"),
    ),
    partial=("zoo_cfg", "align"),  # the recipes of `zoo`; the method settings of `align`
    persist={"out": "quality/widths_wide"},
    metrics={"metrics": "metrics/widths_wide.json"},
    nested=("metrics",),
    notes={
        "out": "(a zoo per width, `w<width>/`, and its aligners `w<width>-<variant>-seed<seed>.pt`)"
    },
    pipeline="study/dvc.yaml",
)


@flow(name="widths_wide", validate_parameters=False)
def widths_wide(
    io: Paths,
    data_cfg: DataCfg,
    zoo_cfg: build.ZooCfg,
    cfg: QualityCfg,
    recipe: AlignerCfg,
    align: AlignCfg,
) -> dict:
    """Train each zoo of `quality.widths.widths_wide`, then its aligners, and score them."""
    return width_variants(STAGE, io, data_cfg, zoo_cfg, (cfg, recipe, align))


if __name__ == "__main__":
    cli(widths_wide)
