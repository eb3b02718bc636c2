"""deepalign: align, merge and compare neural networks through their permutation symmetries.

`deepalign.align`, `deepalign.merge` and `deepalign.interpolate` take `nn.Module`s, and
`deepalign.train_aligner` trains DEEP-ALIGN on your own networks (`deepalign.api`); they load
on first use, so `import deepalign` stays light (and a pipeline
stage's dependencies, its static imports, do not include the API).
"""

import importlib
from typing import Any

__all__ = ["align", "interpolate", "merge", "train_aligner"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("deepalign.api"), name)
    raise AttributeError(f"module 'deepalign' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
