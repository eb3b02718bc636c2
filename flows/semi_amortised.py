"""Stage `semi_amortised` (study pipeline): DEEP-ALIGN trained through K unrolled Sinkhorn
re-basin steps (`quality.variants`), from every seed of `quality.seeds` on the default zoo,
scored on its test pairs against weight matching (the default recipe's rows: stage
`coupling`). A stage of its own: unrolled training takes about 4x the default's time."""

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
    "semi_amortised",
    configs={"data_cfg": "data", "cfg": "quality", "recipe": "aligner", "align": "align"},
    params=("data", "quality", "aligner", *(k for k in ALIGN_KEYS if k != "align.deep_align")),
    partial=("align",),  # the method settings of `align`
    reads=("zoo",),
    persist={"out": "quality/semi_amortised"},
    metrics={"metrics": "metrics/semi_amortised.json"},
    nested=("metrics",),
    notes={"out": "(`<variant>-seed<seed>.pt`)"},
    pipeline="study/dvc.yaml",
)


@flow(name="semi_amortised", validate_parameters=False)
def semi_amortised(
    io: Paths, data_cfg: DataCfg, cfg: QualityCfg, recipe: AlignerCfg, align: AlignCfg
) -> dict:
    """Train and score this stage's variants (`quality.stages.semi_amortised`); logged to MLflow."""
    return zoo_variants(STAGE, io, data_cfg, (cfg, recipe, align), cfg.stages[STAGE.name])


if __name__ == "__main__":
    cli(semi_amortised)
