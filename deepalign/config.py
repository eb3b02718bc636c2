"""params.yaml sections loaded into frozen dataclasses that reject missing and unknown keys."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from deepalign.errors import DeepAlignError

T = TypeVar("T")


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(known)})"


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check and convert one YAML value to the annotated type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        return _convert(value, next(a for a in args if a is not type(None)), where)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise DeepAlignError(f"{where}: expected a list, got {value!r}")
        items = [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise DeepAlignError(f"{where}: expected a mapping, got {value!r}")
        return {k: _convert(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is Any or (isinstance(tp, type) and isinstance(value, tp)):
        if tp is int and isinstance(value, bool):
            raise DeepAlignError(f"{where}: expected int, got {value!r}")
        return value
    raise DeepAlignError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def build(cls: type[T], data: Any, where: str, allow_extra: bool = False) -> T:
    """Build dataclass `cls` from a mapping, naming the first missing or unknown key.

    `allow_extra` lets a reader take the part of a section it needs (the CLI reads only the
    method settings of `align`); stages never set it.
    """
    if not isinstance(data, dict):
        raise DeepAlignError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names and not allow_extra:
            raise DeepAlignError(f"{where}.{key}: unknown key{_suggest(str(key), names)}")
    missing = [n for n in names if n not in data]
    if missing:
        raise DeepAlignError(f"{where}: missing key '{missing[0]}'")
    return cls(**{n: _convert(data[n], hints[n], f"{where}.{n}") for n in names})


def read_params(path: Path | str = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DeepAlignError(f"{path}: no such params file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DeepAlignError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(data, dict):
        raise DeepAlignError(f"{path}: expected a mapping of sections")
    return data


def load_section(
    section: str, cls: type[T], path: Path | str = "params.yaml", allow_extra: bool = False
) -> T:
    """Load one section of params.yaml into `cls`; errors name the file and the key."""
    params = read_params(path)
    if section not in params:
        raise DeepAlignError(
            f"{path}: missing section '{section}'{_suggest(section, list(params))}"
        )
    return build(cls, params[section], f"{path}: {section}", allow_extra)
