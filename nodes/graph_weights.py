"""The weights of a model as the graph sees it (LoRAs and other weight patches applied), one tensor at a time.

The converter reads safetensors files, so a model from the graph is first streamed into a temporary source file
beside the output: each weight is patched in float32 on its own and written, so memory grows by about one tensor,
not by a model. Patched and rescaled weights are written as float32 so that the LoRA delta is not rounded twice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import comfy.lora
import torch

from ..quant_core.safetensors_io import TORCH_TO_ST, StreamingWriter

SCALE_SUFFIXES = (".scale_weight", ".scale_input")
# parameters that exist only inside ComfyUI (markers of scaled-fp8 ops)
INTERNAL_KEYS = ("scaled_fp8",)
PLAIN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class GraphTensor:
    """One tensor to write: its key in the saved file, dtype and shape there, and how to compute it."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]


def _is_internal(key: str) -> bool:
    return key.endswith(SCALE_SUFFIXES) or key.rsplit(".", 1)[-1] in INTERNAL_KEYS


def _reader(key: str, weight: torch.Tensor, convert, patches: list, dtype: torch.dtype):
    def read() -> torch.Tensor:
        if not patches and convert is None:
            return weight.detach().to("cpu", dtype=dtype, copy=True)
        t = weight.detach().to(dtype=torch.float32, copy=True)
        if convert is not None:
            t = convert(t, inplace=True)
        if patches:
            t = comfy.lora.calculate_weight(patches, t, key)
        return t.to("cpu", dtype=dtype)
    return read


def graph_tensors(patcher, prefix: str, strip: tuple[str, ...] = ()) -> list[GraphTensor]:
    """The tensors of `patcher`'s model under `prefix`, with `prefix` and then any of `strip` removed from keys.

    A weight is patched when the graph added patches to it (LoRA, merges); a weight stored scaled inside ComfyUI
    (scaled-fp8 ops) is multiplied out; either becomes float32. fp8 weights become float32 too, so the converter
    treats them as weights.
    """
    out = []
    for key, (base, *patches) in patcher.get_key_patches(prefix).items():
        if _is_internal(key):
            continue
        weight, convert = base
        has_scale = _has_scale(patcher, key)
        dtype = weight.dtype
        if patches or has_scale or (dtype.is_floating_point and dtype not in PLAIN_DTYPES):
            dtype = torch.float32
        name = key[len(prefix):]
        for s in strip:
            if name.startswith(s):
                name = name[len(s):]
                break
        out.append(GraphTensor(name, dtype, tuple(weight.shape),
                               _reader(key, weight, convert if has_scale else None, patches, dtype)))
    return out


def _has_scale(patcher, key: str) -> bool:
    if not key.endswith(".weight"):
        return False
    module_path = key[: -len(".weight")]
    module = patcher.model
    for part in module_path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return False
    scale = getattr(module, "scale_weight", None)
    return isinstance(scale, torch.Tensor)


def write_source_file(tensors: list[GraphTensor], path: str, metadata: dict[str, str] | None = None,
                      on_tensor: Callable[[int, int], None] | None = None) -> str:
    """Stream `tensors` into safetensors file `path`; `on_tensor(done, total)` after each (it may raise to cancel,
    leaving no file)."""
    entries = [(t.key, TORCH_TO_ST[t.dtype], t.shape) for t in tensors]
    with StreamingWriter(path, entries, metadata, overwrite=True) as writer:
        for i, t in enumerate(tensors, 1):
            writer.write(t.key, t.read())
            if on_tensor is not None:
                on_tensor(i, len(tensors))
        writer.commit()
    return path


def source_path_for(output_path: str) -> str:
    """A temporary source file beside the output, hidden from ComfyUI's dropdowns (not a model extension)."""
    folder, name = os.path.split(output_path)
    return os.path.join(folder, f".{name}.graph-weights.partial")
