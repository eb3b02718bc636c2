"""Stage `scale` (study pipeline): a zoo of thousands of networks on one machine, and aligning
as many pairs with DEEP-ALIGN (batched) and weight matching; wall time and peak memory."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import flow

import flows  # noqa: F401  (offline defaults first)
from deepalign.core.data import DataCfg
from deepalign.evaluation import scale as sc
from deepalign.methods import MethodsCfg
from deepalign.threads import threads_for
from deepalign.zoo.build import ZooCfg
from flows.common import cli, stage_run
from flows.stages import Paths, Stage

STAGE = Stage(
    "scale",
    configs={"data_cfg": "data", "zoo_cfg": "zoo", "methods": "align", "cfg": "scale"},
    params=("data", "zoo.archs", "align.weight_matching", "align.deep_align", "scale"),
    partial=("methods",),  # the method settings of `align`
    reads=("aligner",),
    metrics={"metrics": "metrics/scale.json"},
    notes={"metrics": "(10,000 networks: ~15 min on 2 cores)"},
    pipeline="study/dvc.yaml",
)


def _growth(parts: dict[str, dict], key: str) -> float:
    """How `key` grows from the smallest size to the largest (1.0: flat)."""
    first, last = parts[min(parts, key=int)], parts[max(parts, key=int)]
    return last[key] / first[key]


@flow(name="scale", validate_parameters=False)
def scale(
    io: Paths, data_cfg: DataCfg, zoo_cfg: ZooCfg, methods: MethodsCfg, cfg: sc.ScaleCfg
) -> dict:
    """Per size n: build an n-network zoo, then align n pairs of it with DEEP-ALIGN and with
    weight matching, each in a fresh process (wall time, peak memory)."""
    net = zoo_cfg.archs[cfg.arch]
    cores = threads_for(workers=1)
    results: dict[str, dict] = {"zoo": {}, "deep_align": {}, "weight_matching": {}}
    with stage_run(STAGE, io, cfg=cfg) as run:
        results["process_memory_mb"] = sc.in_fresh_process(sc.idle, n_threads=1)["peak_memory_mb"]
        for n in cfg.sizes:
            with tempfile.TemporaryDirectory(prefix="deepalign-scale-") as scratch:
                out = Path(scratch)
                zoo = sc.in_fresh_process(sc.build_zoo, net, data_cfg, n, cfg, out, n_threads=cores)
                stack_file = out / "stack.pt"
                da = sc.in_fresh_process(
                    sc.align_deep,
                    stack_file,
                    net,
                    data_cfg,
                    methods.deep_align,
                    cfg.pair_chunk,
                    n_threads=cores,
                )
                wm = sc.in_fresh_process(
                    sc.align_wm, stack_file, net, data_cfg, methods, n_threads=1
                )
            for part, found in (("zoo", zoo), ("deep_align", da), ("weight_matching", wm)):
                results[part][str(n)] = found
        for part in ("zoo", "deep_align", "weight_matching"):
            sizes = dict(results[part])
            results[part]["seconds_growth"] = _growth(sizes, "seconds")
            results[part]["memory_growth"] = _growth(sizes, "peak_memory_mb")
        results["cores"] = cores
        run.metrics["metrics"] = results
    return run.metrics


if __name__ == "__main__":
    cli(scale)
