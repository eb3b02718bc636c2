"""What the quality experiments' stages share (coupling, semi_amortised, widths,
widths_wide): aligners trained per variant of the `aligner` recipe and seed, scored on a zoo's
test pairs and logged as nested MLflow runs; the zoos of other widths they train on."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from deepalign.core.data import DataCfg, Dataset, load_dataset
from deepalign.evaluation import quality
from deepalign.evaluation.experiment import AlignCfg
from deepalign.methods.deep_align import train as trainer
from deepalign.methods.deep_align.train import AlignerCfg
from deepalign.zoo import build
from deepalign.zoo.store import Zoo, load_zoo, zoo_digest
from flows.common import StageRun, log_method_run, stage_run
from flows.stages import Paths, Stage
from flows.studies import trained_zoo

# the settings of a quality stage: the experiment, the recipe it varies, the methods' settings
Settings = tuple[quality.QualityCfg, AlignerCfg, AlignCfg]


@task(cache_policy=NO_CACHE)
def variant_scores(
    run: StageRun,
    stage: str,
    zoo_at: tuple[Zoo, Path],
    data: Dataset,
    settings: Settings,
    names: list[str],
    label: str = "",
) -> dict[str, dict]:
    """Train (or resume) an aligner per variant of `names` and seed on the zoo (`zoo_at`: the
    zoo and its folder), each saved as `<label><variant>-seed<seed>.pt` in the stage's `out`,
    and score it (`quality.score_aligner`): one nested MLflow run per aligner and method;
    variant -> seed -> its training numbers and scores."""
    zoo, folder = zoo_at
    cfg, recipe, align = settings
    out: dict[str, dict] = {}
    for name, seed, change in quality.trained_variants(cfg, names):
        aligner = change.applied(recipe, seed)
        path = run.io.out / f"{label}{name}-seed{seed}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        fp = trainer.aligner_fingerprint(aligner, zoo.arch, zoo_digest(folder), data)
        desc = f"{label}{name} seed {seed}"
        trained = trainer.train_and_save(zoo, data, aligner, path, fp, "test", {}, desc=desc)
        scores = quality.score_aligner(zoo, data, cfg, align, str(path))
        for method, metrics in scores["methods"].items():
            log_method_run(run, stage, f"{label}{name}-seed{seed}", method, metrics)
        out.setdefault(name, {})[str(seed)] = {"aligner": trained} | scores
    return out


def zoo_variants(
    stage: Stage, io: Paths, data_cfg: DataCfg, settings: Settings, names: list[str]
) -> dict:
    """The body of a stage that trains and scores the variants `names` on the default zoo of
    `quality.arch` (the main pipeline's `zoo/<arch>`); its metrics."""
    cfg = settings[0]
    data = load_dataset(data_cfg)
    with stage_run(stage, io, data_cfg=data_cfg, cfg=cfg) as run:
        folder = Path("zoo") / cfg.arch
        zoo = load_zoo(folder, data)
        scores = variant_scores(run, stage.name, (zoo, folder), data, settings, names)
        run.metrics["metrics"] = scores
    return run.metrics


def width_variants(
    stage: Stage, io: Paths, data_cfg: DataCfg, zoo_cfg: build.ZooCfg, settings: Settings
) -> dict:
    """The body of a stage that trains a zoo per width of `quality.widths.<stage>` (the
    default zoo's recipe at that hidden width), then its variants' aligners, and scores them;
    its metrics."""
    cfg = settings[0]
    data = load_dataset(data_cfg)
    base = build.recipe_of(zoo_cfg, cfg.arch, "quality.arch")
    names = cfg.stages[stage.name]
    with stage_run(stage, io, data_cfg=data_cfg, cfg=cfg) as run:
        metrics = {}
        for width in cfg.widths[stage.name]:
            name = f"w{width}"
            net = dataclasses.replace(base, hidden=[width] * len(base.hidden))
            folder = io.out / name
            _, summary = trained_zoo(folder, name, net, cfg.width_seed, (data, data_cfg))
            zoo_at = (load_zoo(folder, data), folder)
            scores = variant_scores(run, stage.name, zoo_at, data, settings, names, f"{name}-")
            metrics[name] = {"zoo": summary, "variants": scores}
        run.metrics["metrics"] = metrics
    return run.metrics
