"""Byte-reproducible outputs: the same inputs write the same bytes (timings go to metrics only),
so `dvc status` and the DVC hashes change only when a result does."""

from pathlib import Path

import pytest
import torch

from deepalign.config import build
from deepalign.methods.deep_align.checkpoint import save_aligner
from deepalign.methods.deep_align.train import AlignerCfg, checkpoint_meta, train
from deepalign.zoo.build import train_zoo
from deepalign.zoo.store import load_zoo
from tests.configs import net_cfg
from tests.conftest import DIGITS
from tests.tiny import tiny_params

CPU = torch.device("cpu")


def differing(a: Path, b: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Files under a and b (by relative path, those under `skip` aside) that are in one tree
    only or whose bytes differ."""

    def files(root: Path) -> dict[str, bytes]:
        found = (p for p in sorted(root.rglob("*")) if p.is_file())
        named = {str(p.relative_to(root)): p for p in found}
        return {k: p.read_bytes() for k, p in named.items() if not k.startswith(skip)}

    left, right = files(a), files(b)
    return sorted(k for k in left.keys() | right.keys() if left.get(k) != right.get(k))


def small_zoo(folder: Path, digits, seed: int) -> None:
    """A zoo of 8 MLPs (4 train, 2 val, 2 test) trained from `seed`, with its manifest."""
    net = net_cfg("mlp", n_train=4, n_val=2, n_test=2)
    train_zoo(folder, "mlp", net, seed, (digits, DIGITS))


def test_a_zoo_trained_twice_writes_the_same_bytes(tmp_path, digits):
    for name, seed in (("a", 0), ("b", 0), ("other_seed", 1)):
        small_zoo(tmp_path / name, digits, seed)
    written = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert written == ["manifest.json", *(f"net-{j:04d}.pt" for j in range(8))]
    assert differing(tmp_path / "a", tmp_path / "b") == []
    # twin: the comparison sees other networks (every checkpoint and the manifest differ)
    assert differing(tmp_path / "a", tmp_path / "other_seed") == written


def test_an_aligner_trained_twice_writes_the_same_bytes_but_not_with_its_timings(tmp_path, digits):
    small_zoo(tmp_path / "zoo", digits, 0)
    zoo = load_zoo(tmp_path / "zoo", digits)
    cfg = build(AlignerCfg, tiny_params()["aligner"], "tiny params: aligner")
    results = {}
    for name in ("a", "b"):
        out = tmp_path / name
        model, results[name] = train(zoo, digits, cfg, CPU, out / "state.pt", "fp", progress=False)
        save_aligner(out / "aligner.pt", model, zoo.arch, checkpoint_meta(results[name]))
        save_aligner(out / "timed.pt", model, zoo.arch, results[name])  # twin, below
    assert results["a"]["train_seconds"] > 0 and "train_seconds" not in checkpoint_meta(
        results["a"]
    )
    assert differing(tmp_path / "a", tmp_path / "b") == ["timed.pt"]  # timings change bytes


@pytest.mark.slow  # a Prefect server and four stages, three times
def test_the_default_stages_run_twice_write_the_same_bytes(tmp_path, monkeypatch):
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect.testing.utilities import prefect_test_harness

    from flows import align, evaluate, train_aligner, zoo
    from tests.tiny import configs

    def run(stage, root: str, params: dict) -> None:
        """A stage's flow in tmp_path/root, one task at a time as its command runs
        `runner.kind: threads` (tasks side by side in one process's threads round differently)."""
        monkeypatch.chdir(tmp_path / root)  # align finds the aligner at params' path
        flow = getattr(stage, stage.STAGE.name)
        alone = flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=1))
        alone(stage.STAGE.paths(tmp_path / root), **configs(flow, params))

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    other = tiny_params()
    other["zoo"]["seed"] += 1
    with prefect_test_harness(server_startup_timeout=90):
        for root, params in (("a", tiny_params()), ("b", tiny_params()), ("other_seed", other)):
            (tmp_path / root).mkdir()
            for stage in (zoo, train_aligner, align, evaluate):
                run(stage, root, params)
        timings = (tmp_path / "a" / "metrics" / "align.json").read_bytes()
        run(align, "a", tiny_params())  # again: every method resumes, with its seconds
    skip = ("metrics", "mlruns")  # timings; MLflow's artifact store (created in a/)
    assert differing(tmp_path / "a", tmp_path / "b", skip) == []
    changed = differing(tmp_path / "a", tmp_path / "other_seed", skip)
    assert "zoo/mlp/net-0000.pt" in changed and "aligner/mlp.pt" in changed  # twin
    differ = differing(tmp_path / "a", tmp_path / "b", ("mlruns",))  # where the timings went
    assert differ and all(path.startswith("metrics/") for path in differ)
    assert (tmp_path / "a" / "metrics" / "align.json").read_bytes() == timings
