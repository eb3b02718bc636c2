"""The error users see: one line naming the file, key or shape at fault."""

from __future__ import annotations

import reprlib
from typing import Any


class DeepAlignError(Exception):
    """Bad input or configuration; the CLI and flows print it as one line and exit non-zero."""


class UsageError(DeepAlignError):
    """The command line itself is wrong (an option's value, an output that is an input):
    exit 2, as click does for its own usage errors."""


# C0 controls, DEL, C1 controls, the Unicode line separators str.splitlines() breaks on, and
# the invisible marks that reorder or hide text (bidirectional overrides, zero-width marks)
_BIDI = (0x061C, 0x200B, 0x200C, 0x200D, 0x200E, 0x200F, *range(0x202A, 0x202F), 0xFEFF)
_BREAKS = (*range(32), *range(127, 160), 0x2028, 0x2029, *_BIDI, *range(0x2066, 0x206A))
_CONTROL = {c: f"\\x{c:02x}" if c < 256 else f"\\u{c:04x}" for c in _BREAKS} | {
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
}
MAX_LINE = 2000  # characters of one error line


def one_line(text: str) -> str:
    """`text` as one printable line: control characters (newlines in a path) and marks that
    reorder text (a right-to-left override in a file name) escaped, at most MAX_LINE
    characters."""
    line = str(text).translate(_CONTROL)
    return line if len(line) <= MAX_LINE else line[: MAX_LINE - 3] + "..."


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxtuple = 3, 6, 6, 6
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 60, 60, 40


def shown(value: Any) -> str:
    """A bounded repr for messages: a value of 10^9 elements prints as a few of them."""
    return _SHORT.repr(value)
