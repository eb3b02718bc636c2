"""deepalign: align, merge and compare neural networks through their permutation symmetries.

`deepalign.align`, `deepalign.merge` and `deepalign.interpolate` take `nn.Module`s
(`deepalign.api`); they load on first use, so `import deepalign` stays light.
"""

from typing import Any

__all__ = ["align", "interpolate", "merge"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from deepalign import api

        return getattr(api, name)
    raise AttributeError(f"module 'deepalign' has no attribute '{name}'")
