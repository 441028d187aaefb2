"""The weights of a model as the graph sees it (LoRAs and other weight patches applied), one tensor at a time.

The converter streams them like a file (`quant_core.sources.StateDictSource`): each weight is patched in float32 on
its own when the converter reads it, so memory grows by a few tensors, not by a model, and nothing is written but
the output. Patched and rescaled weights are handed over as float32 so that the LoRA delta is not rounded twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import comfy.lora
import torch

from ..quant_core.sources import StateDictSource

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


def graph_source(tensors: list[GraphTensor], name: str) -> StateDictSource:
    """The converter's view of `tensors`: each one is computed (patched, moved to the CPU) only when the converter
    reads it, on its prefetch thread."""
    by_key = {t.key: t for t in tensors}
    return StateDictSource(name, {t.key: (t.dtype, t.shape) for t in tensors}, lambda key: by_key[key].read())
