"""The scale benchmark's parts: ring pairs, fresh-process measurement, a tiny zoo built and
aligned by weight matching the way the 10,000-network run does it."""

import os

import pytest
import torch

from deepalign.config import load_section
from deepalign.evaluation import scale as sc
from deepalign.evaluation.experiment import AlignCfg
from tests.configs import net_cfg
from tests.conftest import DIGITS
from tests.tiny import ROOT, tiny_params


def own_pid() -> dict:
    return {"pid": os.getpid(), "threads": torch.get_num_threads()}


def test_ring_pairs_each_network_twice_and_never_with_itself():
    first, second = sc.ring(5)
    assert first.tolist() == [0, 1, 2, 3, 4] and second.tolist() == [1, 2, 3, 4, 0]
    counts = torch.bincount(torch.cat([first, second]), minlength=5)
    assert counts.tolist() == [2] * 5 and bool((first != second).all())


@pytest.mark.slow  # starts a process
def test_a_fresh_process_reports_its_own_peak_memory_and_threads():
    out = sc.in_fresh_process(own_pid, n_threads=1)
    assert out["pid"] != os.getpid() and out["threads"] == 1
    assert out["peak_memory_mb"] > 50  # the interpreter and torch at least


def test_tiny_zoo_is_built_saved_stacked_and_aligned(tmp_path):
    params = tiny_params()
    net = net_cfg(**params["zoo"]["archs"]["mlp"])
    cfg = sc.ScaleCfg(arch="mlp", sizes=[3], chunk_size=2, pair_chunk=2, seed=7)
    zoo = sc.build_zoo(net, DIGITS, 3, cfg, tmp_path)
    assert zoo["networks"] == 3 and 0 < zoo["test_acc_mean"] <= 1
    assert sorted(p.name for p in tmp_path.glob("net-*.pt")) == [
        f"net-0000{j}.pt" for j in range(3)
    ]
    stack = torch.load(tmp_path / "stack.pt", weights_only=True)
    assert stack["0.weight"].shape[0] == 3  # three networks stacked, keyed by state_dict
    methods = load_section("align", AlignCfg, ROOT / "params.yaml")
    wm = sc.align_wm(tmp_path / "stack.pt", net, DIGITS, methods)
    assert wm["pairs"] == 3 and wm["pairs_per_s"] > 0
