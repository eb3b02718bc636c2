"""params.yaml sections loaded into frozen dataclasses that reject missing and unknown keys.

Values are checked by meaning where they load: a field typed `Annotated[int, at_least(1)]`
(or one of the aliases below) names its key, the value and what is allowed when it fails;
checks across fields live in the dataclass's `__post_init__` and raise `invalid(...)`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml

from deepalign.errors import DeepAlignError

T = TypeVar("T")


@dataclass(frozen=True)
class Check:
    """A constraint on one params value, attached as `Annotated[type, Check(...)]`."""

    ok: Callable[[Any], bool]
    allowed: str  # completes "must be ..."


def at_least(lo: float) -> Check:
    return Check(lambda v: v >= lo, f">= {lo}")


def above(lo: float) -> Check:
    return Check(lambda v: v > lo, f"> {lo}")


def between(lo: float, hi: float) -> Check:
    return Check(lambda v: lo <= v <= hi, f"in [{lo}, {hi}]")


def one_of(*choices: str) -> Check:
    return Check(lambda v: v in choices, f"one of: {', '.join(choices)}")


def is_device(name: str) -> bool:
    """cpu, cuda, cuda:N or auto."""
    head, _, index = name.partition(":")
    return name in ("cpu", "auto", "cuda") or (head == "cuda" and index.isdigit())


Positive = Annotated[int, at_least(1)]
Count = Annotated[int, at_least(0)]
Seed = Annotated[int, between(0, 2**63 - 1)]
PositiveFloat = Annotated[float, above(0)]
NonNegative = Annotated[float, at_least(0)]
Fraction = Annotated[float, Check(lambda v: 0 <= v < 1, "in [0, 1)")]
Device = Annotated[str, Check(is_device, "cpu, cuda, cuda:N or auto")]
MAX_POINTS = 10_001  # a grid beyond this costs minutes per pair and tells nothing new
GridPoints = Annotated[  # lambda grid with both ends and 0.5
    int, Check(lambda v: 3 <= v <= MAX_POINTS and v % 2 == 1, f"odd, in [3, {MAX_POINTS}]")
]


def invalid(key: str, value: Any, allowed: str) -> DeepAlignError:
    """The error of a check across fields, raised in __post_init__ (the loader adds the path)."""
    return DeepAlignError(f"{key}: {value!r} is not allowed (must be {allowed})")


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(known)})"


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check and convert one YAML value to the annotated type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        value = _convert(value, args[0], where)
        for check in args[1:]:
            if isinstance(check, Check) and not check.ok(value):
                raise DeepAlignError(f"{where}: {value!r} is not allowed (must be {check.allowed})")
        return value
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
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names and not allow_extra:
            raise DeepAlignError(f"{where}.{key}: unknown key{_suggest(str(key), names)}")
    missing = [n for n in names if n not in data]
    if missing:
        raise DeepAlignError(f"{where}: missing key '{missing[0]}'")
    values = {n: _convert(data[n], hints[n], f"{where}.{n}") for n in names}
    try:
        return cls(**values)
    except DeepAlignError as e:  # a check across fields, from __post_init__
        raise DeepAlignError(f"{where}.{e}") from e


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key written twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise DeepAlignError(f"line {line}: duplicate key '{key}'")
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_params(path: Path | str = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DeepAlignError(f"{path}: no such params file")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except DeepAlignError as e:
        raise DeepAlignError(f"{path}: {e}") from e
    except yaml.YAMLError as e:
        raise DeepAlignError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(data, dict):
        raise DeepAlignError(f"{path}: expected a mapping of sections")
    return data


def pick(params: dict[str, Any], section: str, where: Path | str = "params.yaml") -> Any:
    """params['align']['weight_matching'] for 'align.weight_matching'; errors name the key."""
    data: Any = params
    for depth, key in enumerate(section.split(".")):
        if not isinstance(data, dict) or key not in data:
            known = list(data) if isinstance(data, dict) else []
            at = ".".join(section.split(".")[:depth] + [key])
            raise DeepAlignError(f"{where}: missing section '{at}'{_suggest(key, known)}")
        data = data[key]
    return data


def load_section(
    section: str, cls: type[T], path: Path | str = "params.yaml", allow_extra: bool = False
) -> T:
    """Load one section (or 'section.sub') of params.yaml into `cls`; errors name file and key."""
    data = pick(read_params(path), section, path)
    return build(cls, data, f"{path}: {section}", allow_extra)
