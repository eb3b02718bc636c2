"""params.yaml sections loaded into frozen dataclasses that reject missing and unknown keys.

Values are checked by meaning where they load: a field typed `Annotated[int, at_least(1)]`
(or one of the aliases below) names its key, the value and what is allowed when it fails;
checks across fields live in the dataclass's `__post_init__` and raise `invalid(...)`.
A base class registered with `tagged_union` loads as the subclass its mapping's tag names
(a zoo recipe's `kind`); mapping keys are checked like values (`dict[Name, ...]`).

A params file cannot make the loader hang or explode: it is read as UTF-8 of at most
MAX_BYTES, its YAML events are counted and its nesting bounded before anything is built
(PyYAML builds recursively), aliases and merge keys (`<<:`) work but the expanded values are
counted against MAX_VALUES (an alias bomb stops there), every number must be finite and every
count has an upper bound, and an error prints a bounded excerpt of the value at fault.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import stat
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml

from deepalign.errors import DeepAlignError, shown

T = TypeVar("T")


@dataclass(frozen=True)
class Check:
    """A constraint on one params value, attached as `Annotated[type, Check(...)]`."""

    ok: Callable[[Any], bool]
    allowed: str  # completes "must be ..."


def at_least(lo: float) -> Check:
    return Check(lambda v: v >= lo, f">= {lo}")


def at_most(hi: float) -> Check:
    return Check(lambda v: v <= hi, f"<= {hi:,}")


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


MAX_COUNT = 10_000_000  # networks, pairs, examples, widths: beyond this no run ends in a day
MAX_STEPS = 100_000  # epochs, iterations, steps, sweeps, rounds: the same, for loops
Positive = Annotated[int, at_least(1), at_most(MAX_COUNT)]
Count = Annotated[int, at_least(0), at_most(MAX_COUNT)]
Iterations = Annotated[int, at_least(1), at_most(MAX_STEPS)]
Steps = Annotated[int, at_least(0), at_most(MAX_STEPS)]
Seed = Annotated[int, between(0, 2**63 - 1)]
PositiveFloat = Annotated[float, above(0)]
NonNegative = Annotated[float, at_least(0)]
Fraction = Annotated[float, Check(lambda v: 0 <= v < 1, "in [0, 1)")]
Device = Annotated[str, Check(is_device, "cpu, cuda, cuda:N or auto")]
MAX_POINTS = 10_001  # a grid beyond this costs minutes per pair and tells nothing new
GridPoints = Annotated[  # lambda grid with both ends and 0.5
    int, Check(lambda v: 3 <= v <= MAX_POINTS and v % 2 == 1, f"odd, in [3, {MAX_POINTS}]")
]
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
# A name that becomes a folder or file (a zoo, an architecture): one plain path component
Name = Annotated[
    str,
    Check(
        lambda v: _NAME.fullmatch(v) is not None,
        "a plain name: up to 100 letters, digits, '_', '.' or '-', not starting with '.' or '-'",
    ),
]


@dataclass(frozen=True, eq=False)
class Tagged:
    """A tagged union: the mapping's `key` names, in `kinds` (a live registry), the dataclass
    that its other keys load into."""

    key: str
    kinds: Mapping[str, type]

    def load(self, value: Any, where: str) -> Any:
        """The dataclass of the kind `value` names, built from its other keys."""
        if not isinstance(value, dict):
            raise DeepAlignError(f"{where}: expected a mapping, got {shown(value)}")
        known = ", ".join(self.kinds)
        if self.key not in value:
            raise DeepAlignError(f"{where}: missing key '{self.key}' (one of: {known})")
        kind = value[self.key]
        if not isinstance(kind, str) or kind not in self.kinds:
            raise DeepAlignError(
                f"{where}.{self.key}: {shown(kind)} is not allowed (must be one of: {known})"
            )
        rest = {k: v for k, v in value.items() if k != self.key}
        return build(self.kinds[kind], rest, where)


UNIONS: dict[type, Tagged] = {}  # base class -> how its params mapping picks a subclass


def tagged_union(base: type, key: str, kinds: Mapping[str, type]) -> None:
    """Wherever a params type names `base`, load the dataclass of `kinds` that the mapping's
    `key` names (`zoo.archs.mlp.kind: mlp`); an unknown or missing kind names the key."""
    UNIONS[base] = Tagged(key, kinds)


def invalid(key: str, value: Any, allowed: str) -> DeepAlignError:
    """The error of a check across fields, raised in __post_init__ (the loader adds the path)."""
    return DeepAlignError(f"{key}: {shown(value)} is not allowed (must be {allowed})")


def suggest(key: str, known: list[str]) -> str:
    known = [str(k) for k in known[:50]]
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {shown(known)})"


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check and convert one YAML value to the annotated type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        value = _convert(value, args[0], where)
        for check in args[1:]:
            if isinstance(check, Check) and not check.ok(value):
                raise DeepAlignError(
                    f"{where}: {shown(value)} is not allowed (must be {check.allowed})"
                )
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        return _convert(value, next(a for a in args if a is not type(None)), where)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise DeepAlignError(f"{where}: expected a list, got {shown(value)}")
        items = [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise DeepAlignError(f"{where}: expected a mapping, got {shown(value)}")
        return {
            _convert(k, args[0], f"{where} key"): _convert(v, args[1], f"{where}.{k}")
            for k, v in value.items()
        }
    if tp is float:
        return _finite(value, where)
    if tp is Any or (isinstance(tp, type) and isinstance(value, tp)):
        if tp is int and isinstance(value, bool):
            raise DeepAlignError(f"{where}: expected int, got {shown(value)}")
        return value
    raise DeepAlignError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {shown(value)}")


def _finite(value: Any, where: str) -> float:
    """A float field's value: an int or float that is finite (.inf and .nan refused)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DeepAlignError(f"{where}: expected float, got {shown(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int of hundreds of digits
        number = math.inf
    if not math.isfinite(number):
        raise DeepAlignError(f"{where}: {shown(value)} is not allowed (must be a finite number)")
    return number


def build(cls: type[T], data: Any, where: str, allow_extra: bool = False) -> T:
    """Build dataclass `cls` from a mapping, naming the first missing or unknown key.

    `allow_extra` lets a reader take the part of a section it needs (the CLI reads only the
    method settings of `align`); stages never set it.
    """
    if cls in UNIONS:  # a base class: its mapping names the subclass
        return UNIONS[cls].load(data, where)
    if not isinstance(data, dict):
        raise DeepAlignError(f"{where}: expected a mapping, got {shown(data)}")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls) if f.init]  # init=False: not a key
    for key in data:
        if key not in names and not allow_extra:
            key = shown(key) if not isinstance(key, str) else key
            raise DeepAlignError(f"{where}.{key}: unknown key{suggest(str(key), names)}")
    missing = [n for n in names if n not in data]
    if missing:
        raise DeepAlignError(f"{where}: missing key '{missing[0]}'")
    values = {n: _convert(data[n], hints[n], f"{where}.{n}") for n in names}
    try:
        return cls(**values)
    except DeepAlignError as e:  # a check across fields, from __post_init__
        raise DeepAlignError(f"{where}.{e}") from e


MAX_BYTES = 1 << 20  # a params file is a few kB; a larger one is not a params file
MAX_DEPTH = 64  # nesting of mappings and lists
MAX_EVENTS = 200_000  # YAML nodes as written
MAX_VALUES = 200_000  # values after expanding aliases (a YAML alias bomb stops here)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key written twice in one mapping (PyYAML keeps the last) and a key
    that is not a plain value; merge keys (`<<: *base`) still merge, and the keys a mapping
    writes itself override the merged ones, as YAML says."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                kind = "list" if isinstance(key_node, yaml.SequenceNode) else "mapping"
                raise DeepAlignError(f"line {line}: a key must be a plain value, not a {kind}")
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise DeepAlignError(f"line {line}: duplicate key {shown(key)}")
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_text(path: Path) -> str:
    """The params file as text: a regular file of UTF-8, at most MAX_BYTES."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DeepAlignError(f"{path}: no such params file") from None
    except OSError as e:
        raise DeepAlignError(f"{path}: cannot read the params file ({e.strerror})") from e
    if stat.S_ISDIR(mode):
        raise DeepAlignError(f"{path}: is a folder, not a params file")
    if not stat.S_ISREG(mode):  # a FIFO would block the read forever
        raise DeepAlignError(f"{path}: not a regular file (device, FIFO or socket)")
    try:
        with open(path, "rb") as f:
            blob = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise DeepAlignError(f"{path}: cannot read the params file ({e.strerror})") from e
    if len(blob) > MAX_BYTES:
        raise DeepAlignError(f"{path}: larger than {MAX_BYTES:,} bytes; not a params file")
    try:
        return blob.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DeepAlignError(f"{path}: not UTF-8 text (byte {e.start})") from e


def _check_shape(text: str) -> None:
    """Refuse YAML nested deeper than MAX_DEPTH or with more than MAX_EVENTS nodes, before
    PyYAML's recursive composer sees it (the parser itself is iterative)."""
    depth = 0
    for events, event in enumerate(yaml.parse(text, Loader=yaml.SafeLoader), start=1):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                line = event.start_mark.line + 1
                raise DeepAlignError(f"line {line}: nested deeper than {MAX_DEPTH} levels")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
        if events > MAX_EVENTS:
            raise DeepAlignError(f"more than {MAX_EVENTS:,} YAML nodes; not a params file")


def _count_values(data: Any, budget: int = MAX_VALUES) -> int:
    """Values in `data` as a reader sees them (aliases expanded), counted up to `budget`."""
    stack, seen = [data], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > budget:
            raise DeepAlignError(
                f"more than {budget:,} values once its aliases are expanded; not a params file"
            )
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return seen


def parse_params(text: str) -> dict[str, Any]:
    """Params YAML text as a mapping of sections, bounded in size, depth and expansion."""
    try:
        _check_shape(text)
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise DeepAlignError(f"invalid YAML ({shown(str(e).splitlines()[0])})") from e
    except RecursionError as e:  # a merge chain deeper than Python's stack
        raise DeepAlignError("nested too deeply to read") from e
    _count_values(data)
    if not isinstance(data, dict):
        raise DeepAlignError(f"expected a mapping of sections, got {shown(data)}")
    return data


def read_params(path: Path | str = "params.yaml") -> dict[str, Any]:
    """A params file's sections; every problem is one DeepAlignError naming the file."""
    path = Path(path)
    text = _read_text(path)
    try:
        return parse_params(text)
    except DeepAlignError as e:
        raise DeepAlignError(f"{path}: {e}") from e


def pick(params: dict[str, Any], section: str, where: Path | str = "params.yaml") -> Any:
    """params['align']['weight_matching'] for 'align.weight_matching'; errors name the key."""
    data: Any = params
    for depth, key in enumerate(section.split(".")):
        if not isinstance(data, dict) or key not in data:
            known = list(data) if isinstance(data, dict) else []
            at = ".".join(section.split(".")[:depth] + [key])
            raise DeepAlignError(f"{where}: missing section '{at}'{suggest(key, known)}")
        data = data[key]
    return data


def load_section(
    section: str, cls: type[T], path: Path | str = "params.yaml", allow_extra: bool = False
) -> T:
    """Load one section (or 'section.sub') of params.yaml into `cls`; errors name file and key."""
    data = pick(read_params(path), section, path)
    return build(cls, data, f"{path}: {section}", allow_extra)
