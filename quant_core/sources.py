"""What `convert` reads tensors from: the `TensorSource` protocol, and `StateDictSource` for tensors in memory.

A file is a `safetensors_io.SafetensorsReader`; `StateDictSource` serves a ComfyUI model's weights (for instance
with a LoRA applied), producing each tensor only when it is asked for, so a whole second copy of the model never
exists in memory.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Protocol

import torch

from .errors import ConversionError
from .safetensors_io import DTYPES, TORCH_TO_ST, Header, TensorInfo


class TensorSource(Protocol):
    """Tensors by key, in the order of `header` (safetensors_io.Header: keys, dtypes, shapes).

    `read(key, buf)` returns the tensor; a source with `reads_into_buffers` places its bytes in `buf` (uint8 CPU
    memory of at least the tensor's size, reused by the caller once it is done with the tensor), the others ignore
    `buf` (the caller then passes None). `path` names the source in messages and in the output's metadata."""

    path: str
    header: Header
    reads_into_buffers: bool

    def read(self, key: str, buf: torch.Tensor | None) -> torch.Tensor: ...

    def close(self) -> None: ...


class StateDictSource:
    """Serve tensors by key, in the order given.

    `specs` maps key -> (torch dtype, shape) of what `getter(key)` will return; `getter` may compute the tensor
    on demand (e.g. patch a weight with its LoRA). With a plain mapping of tensors use `from_tensors`.
    """

    reads_into_buffers = False

    def __init__(self, name: str, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                 getter: Callable[[str], torch.Tensor], metadata: Mapping[str, str] | None = None):
        self.path = name
        infos, offset = {}, 0
        for key, (dtype, shape) in specs.items():
            st = TORCH_TO_ST.get(dtype)
            if st is None:
                raise ConversionError(f"{name}: tensor '{key}' has dtype {dtype}, which safetensors cannot store")
            n = math.prod(shape) * DTYPES[st][1]
            infos[key] = TensorInfo(key, st, tuple(shape), offset, offset + n)
            offset += n
        self.header = Header(name, infos, dict(metadata or {}), 0, offset)
        self._getter = getter

    @classmethod
    def from_tensors(cls, name: str, tensors: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str] | None = None) -> "StateDictSource":
        specs = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
        return cls(name, specs, lambda k: tensors[k], metadata)

    def read(self, key: str, buf: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor `getter(key)` returns (`buf` is not used), checked against its announced dtype and shape."""
        info = self.header.tensors[key]
        t = self._getter(key)
        if TORCH_TO_ST.get(t.dtype) != info.dtype or tuple(t.shape) != info.shape:
            raise ConversionError(f"{self.path}: tensor '{key}' came as {t.dtype}{list(t.shape)}, "
                                  f"expected {info.dtype}{list(info.shape)}")
        return t.detach()

    def close(self) -> None:
        pass

    def __enter__(self) -> "StateDictSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
