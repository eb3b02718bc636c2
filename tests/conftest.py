"""Shared fixtures: small nets and the digits data (bundled with scikit-learn, no download)."""

import pytest
import torch

import flows  # noqa: F401  (offline defaults before Prefect/MLflow load)
from deepalign.core.chain import cnn_arch, mlp_arch
from deepalign.core.data import DataCfg, load_dataset
from deepalign.zoo.build import init_network

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
