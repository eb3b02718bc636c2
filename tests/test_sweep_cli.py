"""`deepalign sweep KEY=V1,V2 ...`: overrides parsed and checked before any experiment runs."""

import subprocess
import sys
from pathlib import Path

import pytest

from deepalign.errors import DeepAlignError
from flows.pipeline import _combinations, check_grid, parse_grid

ROOT = Path(__file__).resolve().parents[1]


def test_overrides_become_a_grid_of_yaml_values():
    grid = parse_grid(["align.pairs=20,50", "aligner.lr_schedule=cosine", "aligner.ema=0.0,0.99"])
    assert grid == {
        "align.pairs": [20, 50],
        "aligner.lr_schedule": ["cosine"],
        "aligner.ema": [0.0, 0.99],
    }
    assert len(_combinations(grid)) == 4
    check_grid(grid, ROOT / "params.yaml")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["align.pairs"], "key=value"),
        (["=3"], "key=value"),
        (["align.pairs=1", "align.pairs=2"], "given twice"),
    ],
)
def test_malformed_overrides_are_named(overrides, message):
    with pytest.raises(DeepAlignError, match=message):
        parse_grid(overrides)


@pytest.mark.slow  # starts a process
def test_misspelt_key_stops_the_console_command_before_any_run(tmp_path):
    for name in ("params.yaml", "dvc.yaml"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    done = subprocess.run(
        [str(Path(sys.executable).parent / "deepalign"), "sweep", "align.pairz=20,50"]
        + ["--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "no key 'align.pairz' to sweep" in done.stderr and "params.yaml" in done.stderr
    assert not (tmp_path / "dvc.lock").exists()
