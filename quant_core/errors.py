"""Exceptions the converter raises on purpose.

`ConversionError` is bad input or an environment problem a user can fix (exit status 2 on the command line);
its message always names the file and, where there is one, the tensor.
"""


class ConversionError(Exception):
    """Bad input or unusable output location; the message names the file/tensor."""


class Cancelled(ConversionError):
    """The user cancelled; `index`/`total` say where (1-based tensor index, number of tensors)."""

    def __init__(self, message: str = "cancelled", index: int | None = None, total: int | None = None):
        super().__init__(message)
        self.index = index
        self.total = total
