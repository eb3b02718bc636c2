"""The numbers each stage's summary shows: the report's columns per stage (what MLflow gets
per run) and the headline metrics (`dvc metrics show`)."""

from __future__ import annotations


def keys_of(names: str, suffix: str = "") -> list[str]:
    """Metric keys from a list in words: "a b" -> ["a", "b"] (each with `suffix`)."""
    return [f"{n}{suffix}" for n in names.split()]


EVALUATED = "loss_barrier acc_barrier loss_auc merged_acc seconds_per_pair planted_recovery"
COMPARED = "mean_diff ci_low ci_high frac_pairs_a_le_b"
CURVED = "mean_acc min_acc curve_barrier linear_mean_acc linear_curve_barrier seconds_to_fit"
ZOO_COLUMNS = "n_networks test_acc_mean test_acc_std test_acc_min train_seconds networks_per_second"
TRAINED = "train_seconds best_epoch best_val_loss_barrier device_cuda"
CONVERGED = "steps_to_target seconds_to_target final_loss_barrier"

SHOWN = {  # per stage, the numbers the report's tables show: what MLflow gets per run
    "zoo": keys_of(ZOO_COLUMNS),
    "train_aligner": keys_of(TRAINED),
    "evaluate": [*keys_of(EVALUATED, "_mean"), "loss_barrier_std"],
    "curves": keys_of(CURVED),
    "converge": [*keys_of(CONVERGED), "loss_barrier"],  # and the barrier against steps
}


def shown(stage: str, metrics: dict) -> dict:
    """The numbers of `metrics` the report shows for `stage` (all of them for a stage it does
    not tabulate); the metrics files keep the rest."""
    keys = SHOWN.get(stage)
    return metrics if keys is None else {k: metrics[k] for k in keys if k in metrics}


HEADLINE = {  # `dvc metrics show` / `dvc exp show`: a few short columns per architecture
    "acc": ("zoo", "test_acc_mean"),  # the zoo's mean test accuracy
    "wm": ("evaluate", "weight_matching", "loss_barrier_mean"),  # mean test loss barriers
    "da": ("evaluate", "deep_align", "loss_barrier_mean"),
    "da_sinkhorn": ("evaluate", "deep_align+sinkhorn", "loss_barrier_mean"),
}


def headline(metrics: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Per architecture, the zoo's test accuracy and the loss barriers of weight matching,
    DEEP-ALIGN and DEEP-ALIGN + Sinkhorn (those the run has)."""
    out: dict[str, dict[str, float]] = {}
    for arch in metrics.get("evaluate", metrics.get("zoo", {})):
        for name, (stage, *path) in HEADLINE.items():
            node = metrics.get(stage, {}).get(arch, {})
            for key in path:
                node = node.get(key, {}) if isinstance(node, dict) else {}
            if isinstance(node, float | int):
                out.setdefault(arch, {})[name] = round(float(node), 4)
    return out
