"""A tiny configuration for flow tests: the repository's params.yaml, shrunk."""

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def tiny_params() -> dict:
    """The repository's params.yaml shrunk to seconds of work (same keys, real code paths)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for net in params["zoo"]["archs"].values():
        net.update(n_train=2, n_val=2, n_test=2, epochs=1)
        net["hidden"] = net["hidden"][:2]
        if "strides" in net:  # a cnn's, one per conv
            net["strides"] = net["strides"][:2]
    params["zoo"]["chunk_size"] = 3
    params["bench"].update(
        n_one_by_one=1, n_batched=2, wm_widths=[8], wm_pairs=1, busy_pairs=1, runner_networks=2
    )
    params["bench"]["busy_methods"] = ["weight_matching"]
    params["aligner"].update(epochs=2, val_every=1, val_pairs=2, pairs_per_step=2)
    params["aligner"]["model"].update(dim=8, head_dim=8, rounds=1)
    params["align"].update(
        pairs=2, planted_pairs=1, methods=["naive", "weight_matching", "deep_align+weight_matching"]
    )
    params["align"]["ste"]["steps"] = 2
    params["align"]["sinkhorn"]["steps"] = 2
    params["converge"].update(pairs=2, steps=[0, 1, 2])  # 2: align.sinkhorn.steps above
    params["study"].update(train_sizes=[4, 8], steps=[2, 4], pairs=2, points=5)
    params["curves"].update(methods=["naive", "weight_matching"], pairs=2)
    params["curves"]["fit"]["epochs"] = 1
    params["curves"]["pam"]["rounds"] = 1
    params["resnets"]["zoo"].update(hidden=[4, 8], n_train=4, n_val=2, n_test=3, epochs=1)
    params["resnets"].update(pairs=3, points=5, bn_reset_images=64)
    params["resnets"]["curves"]["pairs"] = 1
    learned = params["resnets_learned"]["aligner"]
    learned.update(epochs=1, val_every=1, val_pairs=2, pairs_per_step=2, images_per_step=32)
    learned.update(val_bn_images=64)
    learned["model"].update(dim=8, head_dim=8, rounds=1)
    params["resnets_learned"]["bootstrap"] = 100
    params["ood"].update(networks=3, pairs=3, points=5, methods=["naive", "deep_align"])
    for shifted_zoo in params["ood"]["zoos"].values():
        shifted_zoo["epochs"] = 1
    params["merge"].update(networks=2, points=5, methods=["naive", "weight_matching"])
    params["merge"]["resnet"].update(networks=2, bn_reset_images=64)
    params["merge"]["resnet"]["methods"] = ["naive", "weight_matching"]  # no ResNet aligner
    for inr_zoo in params["inr"]["zoos"].values():
        inr_zoo["net"].update(n_train=4, n_val=2, n_test=4, epochs=5)
    params["inr"]["aligner"].update(epochs=2, val_every=1, val_pairs=1, pairs_per_step=2)
    params["inr"]["aligner"]["model"].update(dim=8, head_dim=8, rounds=1)
    params["inr"].update(pairs=2, points=5, converge_pairs=2, converge_steps=[0, 1, 2])
    params["inr"]["methods"] = ["naive", "weight_matching", "deep_align", "deep_align+sinkhorn"]
    params["quality"].update(seeds=[0], pairs=2, points=5, bootstrap=100)
    params["quality"]["widths"] = {"widths": [6], "widths_wide": [7]}
    params["quality"]["methods"] = ["weight_matching", "deep_align", "deep_align+sinkhorn@1"]
    params["quality"]["variants"]["semi_amortised"].update(unroll_steps=2, epochs=1)
    params["quality"]["variants"]["short"]["epochs"] = 1
    return params


def tiny_repo(tmp_path: Path, params: dict | None = None) -> Path:
    """A git + DVC project with this repo's stages and code, and tiny params."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("deepalign", "flows"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "params.yaml").write_text(yaml.safe_dump(params or tiny_params()))
    for cmd in (
        ["git", "init", "-q"],
        [sys.executable, "-m", "dvc", "init", "-q"],
        [sys.executable, "-m", "dvc", "config", "core.analytics", "false"],
    ):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
    return repo


def configs(flow, params: dict | None = None) -> dict:
    """The typed configs `flow` takes, built in code from `params` (default: tiny_params())."""
    from flows.common import flow_configs

    return flow_configs(flow, params or tiny_params(), "tiny params")
