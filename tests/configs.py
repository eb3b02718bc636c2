"""Configs for tests, built by the params loader itself (so every check runs on them)."""

from typing import Any

from deepalign.config import build
from deepalign.zoo.kinds import ZOO_KINDS, NetCfg

# A small recipe of each kind; tests override what they need
TRAINING = {
    "n_train": 2,
    "n_val": 0,
    "n_test": 0,
    "epochs": 1,
    "batch_size": 64,
    "lr": 3e-3,
    "weight_decay": 0.0,
    "optimizer": "adam",
    "momentum": 0.0,
}
ARCHITECTURE = {
    "mlp": {"hidden": [8, 8], "activation": "relu"},
    "cnn": {"hidden": [4, 4], "strides": [1, 2], "activation": "relu"},
    "resnet": {"hidden": [4, 8], "blocks": 1},
    "siren": {"hidden": [16, 12]},
}


def net_cfg(kind: str = "mlp", **overrides: Any) -> NetCfg:
    """A zoo recipe of `kind`: the small defaults above with `overrides`, loaded and checked
    as a params mapping (a key the kind does not have is refused)."""
    keys = TRAINING | ARCHITECTURE[kind] | overrides
    return build(ZOO_KINDS[kind], keys, f"net_cfg({kind})")
