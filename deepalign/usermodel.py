"""A user's own module for the command line: `--model pkg.module:callable` or
`--model path/to/file.py:callable`, the callable building the module with no arguments."""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from pathlib import Path

from torch import nn

from deepalign.core.data import Dataset
from deepalign.errors import DeepAlignError, UsageError

FALLBACK_SIDE = 32  # image side used to trace a conv network when no data set says it


def is_reference(text: str) -> bool:
    """Whether a --model value names a callable (`x:y`) rather than a checkpoint file."""
    head, sep, tail = text.rpartition(":")
    return bool(sep and head and tail.isidentifier())


def reference_file(text: str) -> Path | None:
    """The source file a `path/to/file.py:callable` reference reads (for the input guard)."""
    head = text.rpartition(":")[0]
    return Path(head) if head.endswith(".py") else None


def _import(head: str) -> object:
    if head.endswith(".py"):
        path = Path(head)
        if not path.is_file():
            raise DeepAlignError(f"{path}: no such Python file for --model")
        spec = importlib.util.spec_from_file_location(f"_deepalign_model_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise DeepAlignError(f"{path}: cannot be imported")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(head)
    except ImportError as e:
        raise DeepAlignError(f"--model: cannot import '{head}' ({e})") from e


def build_module(text: str) -> nn.Module:
    """Import `text`'s module and call its callable with no arguments."""
    if not is_reference(text):
        raise UsageError(f"--model: '{text}' is neither a checkpoint nor pkg.module:callable")
    head, _, name = text.rpartition(":")
    source = _import(head)
    factory = getattr(source, name, None)
    if not callable(factory):
        raise DeepAlignError(f"--model: '{head}' has no callable '{name}'")
    try:
        module = factory()
    except Exception as e:  # the user's code
        raise DeepAlignError(f"--model: {text}() failed ({type(e).__name__}: {e})") from e
    if not isinstance(module, nn.Module):
        raise DeepAlignError(f"--model: {text}() returned {type(module).__name__}, not a module")
    return module


def guess_input_shape(module: nn.Module) -> tuple[int, ...]:
    """One example's shape from the first layer: (C, 32, 32) for a conv, (features,) for a
    Linear. Only the tracing needs it; `--input-shape` or `--data` say it exactly."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.conv._ConvNd):
            return (layer.in_channels, *[FALLBACK_SIDE] * (layer.weight.ndim - 2))
        if isinstance(layer, nn.Linear):
            return (layer.in_features,)
    raise DeepAlignError("--model: no Linear or Conv layer to read the input shape from")


def input_shape_for(
    module: nn.Module, given: tuple[int, ...] | None, data: Dataset | None
) -> tuple[int, ...]:
    """One example's shape: given, else the data set's (flattened for a Linear first layer),
    else guessed from the first layer."""
    if given:
        return tuple(given)
    guess = guess_input_shape(module)
    if data is None:
        return guess
    images = tuple(data.image_shape)
    return (math.prod(images),) if len(guess) == 1 else images
