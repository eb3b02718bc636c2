"""The report: one self-contained HTML page (inline CSS, embedded PNGs) of every stage's
results. Only the report stage runs it; the stages' figures are `figures.py`, the numbers each
stage shows `summary.py`."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from PIL import Image

from deepalign.evaluation.summary import (
    COMPARED,
    CONVERGED,
    CURVED,
    EVALUATED,
    TRAINED,
    ZOO_COLUMNS,
    keys_of,
)

# headers are metric keys in words: `loss_barrier_std` -> "loss barrier (std)"
_WORDS = dict(
    w.split("=", 1)
    for w in [
        "acc=accuracy",
        "auc=AUC",
        "std=(std)",
        "val=validation",
        "diff=difference",
        "n=",
        "ci=95%-CI",
        "frac=share",
        "a=A",
        "le=<=",
        "b=B",
        "nets=networks",
        "s=second",
        "device=on",
        "cuda=GPU",
    ]
)


def _header(key: str) -> str:
    words = (_WORDS.get(w, w) for w in key.removesuffix("_mean").split("_"))
    return " ".join(w for w in words if w).replace("95%-CI", "95 % CI")


def _cell(key: str, value: float) -> str:
    """One number at a fixed precision per kind of metric."""
    if "recovery" in key or key.startswith("frac"):
        return f"{value:.1%}"
    if key in ("mean_diff", "ci_low", "ci_high"):
        return f"{value:+.3f}"
    if float(value).is_integer():
        return f"{value:.0f}"
    return f"{value:.4f}" if "seconds" in key and abs(value) < 1 else f"{value:.3f}"


def timing(key: str) -> bool:
    """Whether a metric is a wall-clock time or a rate (it changes from run to run)."""
    return "seconds" in key or "per_second" in key


def _table(rows: dict[str, dict[str, float]], columns: list[str], first: str = "") -> str:
    """An HTML table: one row per key, the given metric columns but timings (missing values
    blank)."""
    columns = [c for c in columns if not timing(c)]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in [first, *map(_header, columns)])
    body = ""
    for name, values in rows.items():
        cells = "".join(f"<td>{_cell(k, values[k]) if k in values else ''}</td>" for k in columns)
        body += f"<tr><th>{html.escape(name)}</th>{cells}</tr>"
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def winner(methods: dict[str, dict[str, float]]) -> str:
    """One sentence: the method with the lowest mean test loss barrier, and against weight
    matching (the classical reference) and naive averaging."""
    scored = {m: v["loss_barrier_mean"] for m, v in methods.items() if "loss_barrier_mean" in v}
    if not scored:
        return ""
    best = min(scored, key=scored.get)
    parts = [f"Lowest loss barrier: <b>{html.escape(best)}</b> ({scored[best]:.3f})"]
    for other in ("weight_matching", "naive"):
        if other in scored and other != best:
            parts.append(f"; {other} {scored[other]:.3f}")
    return f"<p class='winner'>{''.join(parts)}.</p>"


def _image(path: Path) -> str:
    if not path.is_file():
        return f"<p><em>{html.escape(path.name)} missing</em></p>"
    data = base64.b64encode(_palette_png(path)).decode()
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'


def _palette_png(path: Path) -> bytes:
    """The figure as a 256-colour PNG: plots have few colours, and it is a third of the bytes
    (the page inlines every figure; it stays under 1 MiB)."""
    out = io.BytesIO()
    with Image.open(path) as figure:
        figure.convert("RGB").quantize(256).save(out, "PNG", optimize=True)
    return out.getvalue()


def _resnets(found: dict, figures: Path) -> list[str]:
    """The study pipeline's ResNet zoo: lines with BatchNorm statistics reset and kept."""
    rows = {
        method: {
            "loss_barrier_mean": reset["loss_barrier_mean"],
            "acc_barrier_mean": reset["acc_barrier_mean"],
            "merged_acc_mean": reset["merged_acc_mean"],
            "kept_loss_barrier_mean": found["bn_kept"][method]["loss_barrier_mean"],
            "kept_merged_acc_mean": found["bn_kept"][method]["merged_acc_mean"],
        }
        for method, reset in found["bn_reset"].items()
    }
    return [
        "<h2>ResNets with BatchNorm (study pipeline, committed results)</h2>",
        "<p>Every network on a line scored after its BatchNorm statistics are recomputed on "
        "training images; <i>kept</i>: with the averaged statistics instead.</p>",
        winner(found["bn_reset"]),
        _table(rows, list(next(iter(rows.values()))), "method"),
        _image(figures / "resnets" / "interpolation_resnet.png"),
        "<h3>Bezier curves: resnet</h3>",
        _table(found["curves"], keys_of(CURVED), "method"),
        _image(figures / "resnets" / "curves_resnet.png"),
    ]


def _resnets_learned(found: dict, figures: Path) -> list[str]:
    """DEEP-ALIGN trained on the ResNet zoo: its lines beside the classical methods', and the
    paired differences."""
    return [
        "<h3>DEEP-ALIGN on the ResNets (spec encoder; statistics reset)</h3>",
        winner(found["lines"]),
        _table(
            found["lines"],
            [*keys_of(EVALUATED, "_mean"), "loss_barrier_over_weight_matching"],
            "method",
        ),
        "<p>Paired differences of the loss barrier, A - B, over the same test pairs "
        "(bootstrap interval; pairs share networks, so it is optimistic).</p>",
        _table(found["compare"], keys_of(COMPARED), "A - B"),
        _image(figures / "resnets_learned" / "interpolation_resnet.png"),
    ]


QUALITY = ("coupling", "semi_amortised", "widths", "widths_wide")  # the experiments' stages
QUALITY_COLUMNS = [
    "weight_matching",
    "deep_align",
    "over_weight_matching",
    "gap_closed",
    "ci_high",
    "deep_align+sinkhorn@10",
    "deep_align+sinkhorn",
]


def quality_rows(metrics: dict[str, dict]) -> dict[str, dict]:
    """One row per aligner of the quality experiments' stages present: `variant seed s` on the
    default zoo, `variant w<width> seed s` on the others."""
    found: dict[str, dict] = {}
    for stage in QUALITY:
        scored = metrics.get(stage, {})
        per_zoo = (
            {w: v["variants"] for w, v in scored.items()} if "widths" in stage else {"": scored}
        )
        for zoo, variants in per_zoo.items():
            for variant, seeds in variants.items():
                for seed, numbers in seeds.items():
                    label = " ".join(p for p in (variant, zoo, f"seed {seed}") if p)
                    found[label] = _quality_row(numbers)
    return found


def _quality_row(numbers: dict) -> dict[str, float]:
    """Every method's barrier, and the one pass against weight matching."""
    methods = numbers["methods"]
    one = methods["deep_align"]
    row = {m: v["loss_barrier"] for m, v in methods.items()}
    row["over_weight_matching"] = one.get("loss_barrier_over_weight_matching", float("nan"))
    row["gap_closed"] = one.get("gap_closed", float("nan"))
    return row | {"ci_high": numbers["compare"]["deep_align - weight_matching"]["ci_high"]}


def _quality(metrics: dict[str, dict]) -> list[str]:
    """DEEP-ALIGN's one pass against weight matching, per variant of its recipe and seed."""
    return [
        "<h2>DEEP-ALIGN's one pass: one change to the recipe at a time (study pipeline)</h2>",
        "<p>Mean test loss barriers on the zoo's 50 test pairs; <i>ci high</i>: the upper end "
        "of the 95% interval of deep_align - weight_matching (below 0: the one pass is "
        "better on these pairs). The project's target for one pass: 0.6x weight matching.</p>",
        _table(quality_rows(metrics), QUALITY_COLUMNS, "aligner"),
    ]


# DEEP-ALIGN's Table 3 (Navon et al. 2024): loss barriers of CIFAR10 CNNs trained with random
# rotations, DEEP-ALIGN trained on plain CIFAR10 CNNs
PAPER_ROTATED = {
    "naive": 1.077,
    "weight_matching": 0.945,
    "activation_matching": 0.586,
    "sinkhorn": 0.596,
    "deep_align": 0.769,
    "deep_align+sinkhorn": 0.430,
}
PAPER_COLUMN = "paper, rotated CIFAR10 CNNs"


def _ood(found: dict, evaluated: dict, figures: Path) -> list[str]:
    """The study pipeline's shifted zoos: each method's loss barrier in and out of the
    distribution its DEEP-ALIGN model was trained on."""
    zoos = {name: z["methods"] for name, z in found["zoos"].items()}
    columns = {"in distribution": evaluated.get(found["arch"], {}), **zoos}
    rows: dict[str, dict[str, float]] = {}
    for name, methods in columns.items():
        for method, values in methods.items():
            rows.setdefault(method, {})[name] = values["loss_barrier_mean"]
    for method, value in PAPER_ROTATED.items():
        rows.setdefault(method, {})[PAPER_COLUMN] = value
    accuracy = {n: {"zoo test_acc": z["zoo"]["test_acc_mean"]} for n, z in found["zoos"].items()}
    parts = [
        "<h2>Out of distribution (study pipeline, committed results)</h2>",
        f"<p>Mean test loss barrier of {html.escape(found['arch'])} pairs; DEEP-ALIGN's model is "
        "the default zoo's, applied unchanged to zoos trained on rotated digits and with SGD "
        "(<i>in distribution</i>: the evaluate stage).</p>",
        _table(rows, ["in distribution", *zoos, PAPER_COLUMN], "method"),
        _table(accuracy, ["zoo test_acc"], "zoo"),
    ]
    for name, methods in zoos.items():
        parts += [f"<h3>{html.escape(name)}</h3>", winner(methods)]
        parts.append(_image(figures / "ood" / f"interpolation_{name}.png"))
    return parts


MERGED = [  # merged at lambda 0.5 against both endpoints; the best point of the line
    "merged_acc",
    "a_acc",
    "b_acc",
    "merged_minus_best_end",
    "best_line_acc",
    "best_lambda",
    "merged_loss",
    "a_loss",
    "b_loss",
]


MERGE_HEADINGS = {
    "mlp": "MLPs (the default zoo's recipe)",
    "cnn": "CNNs (the default zoo's recipe)",
    "resnet": "ResNets with BatchNorm, statistics recomputed after merging",
}


def _disjoint(found: dict, figures: Path) -> list[str]:
    """The study pipeline's disjoint-data merges, per architecture: merged against endpoint
    accuracy."""
    parts = [
        "<h2>Merging networks trained on disjoint data (study pipeline, committed results)</h2>",
        "<p>A trains on 95% of classes 0-4 and 5% of 5-9, B on the mirror; each pair aligned, "
        "averaged and scored on the whole test split (means over pairs). The paper (its "
        "Figure 5, no numbers printed) finds DEEP-ALIGN, Sinkhorn and activation matching "
        "merge to a lower loss than either original.</p>",
    ]
    for arch, result in found.items():
        methods = result["methods"]
        best = max(methods, key=lambda m: methods[m]["merged_acc"])
        parts += [
            f"<h3>{html.escape(MERGE_HEADINGS.get(arch, arch))}</h3>",
            f"<p class='winner'>Best merge: <b>{html.escape(best)}</b> "
            f"({methods[best]['merged_acc']:.3f}; endpoints {methods[best]['a_acc']:.3f} and "
            f"{methods[best]['b_acc']:.3f})</p>",
            _table(methods, MERGED, "method"),
            _image(figures / "merge" / f"interpolation_{arch}.png"),
        ]
    return parts


INR_COLUMNS = "loss_barrier loss_auc acc_barrier seconds_per_pair planted_recovery"


def _inr(found: dict, figures: Path) -> list[str]:
    """The study pipeline's INR zoos: MSE barriers per method, Sinkhorn from three starts."""
    parts = [
        "<h2>Implicit neural representations (study pipeline, committed results)</h2>",
        "<p>SIRENs (omega_0 = 30) fitted twice to each signal; a pair is two fits of one test "
        "signal, the loss their mean squared error on it (acc: R^2). Each zoo has its own "
        "DEEP-ALIGN model, trained on its train signals. The paper (its Figure 4, no numbers "
        "printed) finds DEEP-ALIGN on par with or better than the baselines, and a far better "
        "Sinkhorn start than a random one.</p>",
    ]
    for name, kind in found.items():
        target = kind["converge"]["target_loss_barrier"]["value"]
        starts = {s: v for s, v in kind["converge"].items() if s != "target_loss_barrier"}
        parts += [
            f"<h3>{html.escape(name)} signals (zoo R^2 {kind['zoo']['test_acc_mean']:.4f})</h3>",
            winner(kind["methods"]),
            _table(kind["methods"], keys_of(INR_COLUMNS, "_mean"), "method"),
            _image(figures / "inr" / f"interpolation_{name}.png"),
            f"<p>Sinkhorn re-basin from three starts (target {target:.4f}: plain Sinkhorn's "
            "full run)</p>",
            _table(starts, keys_of(CONVERGED), "start"),
            _image(figures / "inr" / f"converge_{name}.png"),
        ]
    return parts


GAP_CLOSED = (
    "Over weight matching: X / WM of mean loss barriers, WM weight matching's. Gap closed: "
    "(WM - X) / (WM - best), best the lowest of any method here (1: the best, 0: weight "
    "matching; blank where it is the best)."
)


def render_html(metrics: dict[str, dict], figures: Path, title: str = "deepalign report") -> str:
    """A self-contained page (inline CSS, embedded PNGs) of every stage's results; `figures`
    holds each stage's folder of PNGs (evaluate/, curves/, converge/, resnets/)."""
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        "<p>Timings vary from run to run, so this page, reproduced byte for byte by a rerun, "
        "leaves them out: seconds per pair and training seconds are in "
        "<code>metrics/*.json</code>, <code>dvc metrics show</code> and MLflow.</p>",
        "<h2>Model zoo</h2>",
        _table(metrics.get("zoo", {}), keys_of(ZOO_COLUMNS), "architecture"),
    ]
    for arch, methods in metrics.get("evaluate", {}).items():
        parts += [
            f"<h2>Linear interpolation: {arch} (test pairs, mean over pairs)</h2>",
            winner(methods),
            _table(
                methods,
                [
                    *keys_of(EVALUATED, "_mean"),
                    "loss_barrier_std",
                    "loss_barrier_over_weight_matching",
                    "gap_closed",
                ],
                "method",
            ),
            f"<p>{GAP_CLOSED}</p>",
            _image(figures / "evaluate" / f"interpolation_{arch}.png"),
        ]
        if arch in metrics.get("compare", {}):
            parts += [
                f"<h3>Paired differences of the loss barrier, A - B: {arch}</h3>",
                "<p>Same pairs for both methods; bootstrap interval over pairs (pairs share "
                "networks, so it is optimistic). Below zero: A connects better.</p>",
                _table(metrics["compare"][arch], keys_of(COMPARED), "A - B"),
            ]
    for arch, methods in metrics.get("curves", {}).items():
        parts += [
            f"<h2>Bezier curves: {arch}</h2>",
            _table(methods, keys_of(CURVED), "method"),
            _image(figures / "curves" / f"curves_{arch}.png"),
        ]
    for arch, starts in metrics.get("converge", {}).items():
        rows = {k: v for k, v in starts.items() if k != "target_loss_barrier"}
        target = starts.get("target_loss_barrier", {}).get("value", float("nan"))
        parts += [
            f"<h2>Sinkhorn re-basin from three starts: {arch} (target {target:.4f})</h2>",
            _table(rows, keys_of(CONVERGED), "start"),
            _image(figures / "converge" / f"refine_convergence_{arch}.png"),
        ]
    if "resnets" in metrics:
        parts += _resnets(metrics["resnets"], figures)
    if "resnets_learned" in metrics:
        parts += _resnets_learned(metrics["resnets_learned"], figures)
    if any(stage in metrics for stage in QUALITY):
        parts += _quality(metrics)
    if "ood" in metrics:
        parts += _ood(metrics["ood"], metrics.get("evaluate", {}), figures)
    if "merge" in metrics:
        parts += _disjoint(metrics["merge"], figures)
    if "inr" in metrics:
        parts += _inr(metrics["inr"], figures)
    if "train_aligner" in metrics:
        parts += [
            "<h2>DEEP-ALIGN training</h2>",
            _table(metrics["train_aligner"], keys_of(TRAINED), "architecture"),
        ]
    style = (
        "body{font-family:sans-serif;margin:1em auto;padding:0 1em;max-width:1100px}"
        "table{border-collapse:collapse;margin:1em 0;max-width:100%}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
        "tr:first-child th{text-align:center;font-size:90%}img{max-width:100%;height:auto}"
        ".scroll{overflow-x:auto;max-width:100%}.winner{font-size:110%}"
    )
    viewport = "<meta name='viewport' content='width=device-width, initial-scale=1'>"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'>{viewport}<title>{html.escape(title)}"
        f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>\n"
    )
