"""Exceptions the converter raises on purpose, and the escaping of text that came from a user or a file.

`ConversionError` is bad input or an environment problem a user can fix (exit status 2 on the command line);
its message always names the file and, where there is one, the tensor. File names and tensor names come from
outside, so the message is escaped (`safe_text`): a crafted name cannot send control sequences to a terminal or
reorder the line with bidirectional overrides, and the message stays on one line.
"""

import re
from typing import Callable

# C0 and C1 control characters, DEL, and the Unicode bidirectional controls (embeddings, overrides, isolates,
# marks), plus line/paragraph separators
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(m: "re.Match[str]") -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def safe_text(text: object, keep_newlines: bool = False) -> str:
    """`text` with control characters and bidirectional controls written as \\xNN / \\uNNNN escapes (printable and
    unambiguous); with `keep_newlines`, "\\n" stays a line break (for multi-line output we compose ourselves)."""
    s = str(text)
    if keep_newlines:
        return "\n".join(_UNSAFE.sub(_escape, line) for line in s.split("\n"))
    return _UNSAFE.sub(_escape, s)


class ConversionError(Exception):
    """Bad input or unusable output location; the message names the file/tensor (escaped, one line)."""

    def __init__(self, message: str = "", *args):
        super().__init__(safe_text(message), *args)


class Cancelled(ConversionError):
    """The user cancelled; `index`/`total` say where (1-based tensor index, number of tensors)."""

    def __init__(self, message: str = "cancelled", index: int | None = None, total: int | None = None):
        super().__init__(message)
        self.index = index
        self.total = total


def check_cancel(cancel: Callable[[], object] | None) -> None:
    """Raise `Cancelled` if `cancel()` says so (it cancels by returning True, or by raising itself)."""
    if cancel is not None and cancel() is True:
        raise Cancelled("cancelled during rounding")
