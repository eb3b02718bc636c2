"""Stage `coupling` (study pipeline): DEEP-ALIGN's default recipe and the recipe with
pair-aware coupling (`quality.variants`), each trained from every seed of `quality.seeds` on
the default zoo and scored on its test pairs against weight matching."""

from __future__ import annotations

from prefect import flow

import flows  # noqa: F401  (offline defaults first)
from deepalign.core.data import DataCfg
from deepalign.evaluation.experiment import AlignCfg
from deepalign.evaluation.quality import QualityCfg
from deepalign.methods.deep_align.train import AlignerCfg
from flows.common import cli
from flows.stages import Paths, Stage
from flows.studies import ALIGN_KEYS
from flows.variants import zoo_variants

STAGE = Stage(
    "coupling",
    configs={"data_cfg": "data", "cfg": "quality", "recipe": "aligner", "align": "align"},
    params=("data", "quality", "aligner", *(k for k in ALIGN_KEYS if k != "align.deep_align")),
    partial=("align",),  # the method settings of `align`
    reads=("zoo",),
    persist={"out": "quality/coupling"},
    metrics={"metrics": "metrics/coupling.json"},
    nested=("metrics",),
    notes={"out": "(`<variant>-seed<seed>.pt`)"},
    pipeline="study/dvc.yaml",
)


@flow(name="coupling", validate_parameters=False)
def coupling(
    io: Paths, data_cfg: DataCfg, cfg: QualityCfg, recipe: AlignerCfg, align: AlignCfg
) -> dict:
    """Train and score this stage's variants (`quality.stages.coupling`); logged to MLflow."""
    return zoo_variants(STAGE, io, data_cfg, (cfg, recipe, align), cfg.stages[STAGE.name])


if __name__ == "__main__":
    cli(coupling)
