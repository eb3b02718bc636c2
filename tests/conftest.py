"""Shared fixtures: small nets and the digits data (bundled with scikit-learn, no download);
and the rule that keeps the fast tier fast: a test that starts a process is marked slow."""

import multiprocessing.util
import os
import platform
import subprocess

import pytest
import torch

import flows  # noqa: F401  (offline defaults before Prefect/MLflow load)
from deepalign.core.chain import cnn_arch, mlp_arch
from deepalign.core.data import DataCfg, load_dataset
from deepalign.zoo.build import init_network

platform.processor()  # cached once here: MLflow's import asks it, and it runs `uname -p`
DIGITS = DataCfg("digits", "data", False, 0, 0.1, 0.2)


@pytest.fixture(scope="session")
def digits():
    return load_dataset(DIGITS)


@pytest.fixture
def mlp():
    arch = mlp_arch(64, [12, 10, 8], 10, "relu")
    return arch, init_network(arch, 0)


@pytest.fixture
def cnn():
    arch = cnn_arch((1, 8, 8), [4, 6, 5], [1, 2, 2], 10, "relu")
    return arch, init_network(arch, 0)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(autouse=True)
def no_process_unless_slow(request, monkeypatch):
    """A test without the `slow` mark that starts a process (a subprocess, a fork: a Prefect
    server, a stage, the CLI in a fresh interpreter) fails, naming the rule."""
    if request.node.get_closest_marker("slow"):
        return

    def refuse(*args, **kwargs):
        raise AssertionError("this test starts a process: mark it @pytest.mark.slow")

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)
    monkeypatch.setattr(os, "fork", refuse)
    monkeypatch.setattr(os, "posix_spawn", refuse)
    monkeypatch.setattr(multiprocessing.util, "spawnv_passfds", refuse)
