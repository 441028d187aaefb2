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
# parameters that exist only inside ComfyUI: the scaled-fp8 marker, per-layer quantization configs
INTERNAL_KEYS = ("scaled_fp8", "comfy_quant")
PLAIN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

try:  # ComfyUI 0.8.0 and later: weights of quantized layers are comfy-kitchen QuantizedTensors
    from comfy.quant_ops import QuantizedTensor
except ImportError:  # earlier versions: no such weights
    QuantizedTensor = None


@dataclass
class GraphTensor:
    """One tensor to write: its key in the saved file, dtype and shape there, and how to compute it."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]


def is_quantized(t) -> bool:
    return QuantizedTensor is not None and isinstance(t, QuantizedTensor)


def _reader(key: str, weight: torch.Tensor, convert, patches: list, dtype: torch.dtype):
    """`convert`: the layer's own conversion to the real weight (ComfyUI's `convert_weight` hook), or None."""
    def read() -> torch.Tensor:
        w = weight.detach()
        if is_quantized(w):
            t = w.dequantize().to(torch.float32)  # the tensor's own public API; the result is a plain tensor
        elif not patches and convert is None:
            return w.to("cpu", dtype=dtype, copy=True)
        else:
            t = w.to(dtype=torch.float32, copy=True)
            if convert is not None:
                t = convert(t, inplace=True)
        if patches:
            t = comfy.lora.calculate_weight(patches, t, key)
        return t.to("cpu", dtype=dtype)
    return read


def _module_of(patcher, key: str):
    module = patcher.model
    for part in key.split(".")[:-1]:
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def graph_tensors(patcher, prefix: str, strip: tuple[str, ...] = ()) -> list[GraphTensor]:
    """The tensors of `patcher`'s model under `prefix`, with `prefix` and then any of `strip` removed from keys.

    A weight is patched when the graph added patches to it (LoRA, merges); a weight ComfyUI keeps in another form
    than its real values (scaled layers that define ComfyUI's `convert_weight` hook; comfy-kitchen QuantizedTensors,
    dequantized through their own `dequantize()`) is turned into its real values; either becomes float32. Other
    fp8 weights become float32 too, so the converter treats them as weights. The parameters that only describe a
    quantized layer (its scales, its per-layer config) are not written: the converter gives the layer its own.
    """
    entries = _key_patches(patcher, prefix)
    # layers whose weight is quantized: everything of theirs but weight and bias describes the quantization
    quantized_layers = {k[: -len(".weight")] for k, (base, *_) in entries.items()
                        if k.endswith(".weight") and is_quantized(base[0])}
    out = []
    for key, (base, *patches) in entries.items():
        layer, _, param = key.rpartition(".")
        if key.endswith(SCALE_SUFFIXES) or param in INTERNAL_KEYS:
            continue
        if layer in quantized_layers and param not in ("weight", "bias"):
            continue
        weight, convert = base
        real_convert = convert if _has_convert_hook(patcher, key) else None
        dtype = weight.dtype  # a QuantizedTensor reports the dtype it stands for
        if (patches or real_convert is not None or is_quantized(weight)
                or (dtype.is_floating_point and dtype not in PLAIN_DTYPES)):
            dtype = torch.float32
        name = key[len(prefix):]
        for s in strip:
            if name.startswith(s):
                name = name[len(s):]
                break
        out.append(GraphTensor(name, dtype, tuple(weight.shape), _reader(key, weight, real_convert, patches, dtype)))
    return out


def _key_patches(patcher, prefix: str) -> dict:
    """ModelPatcher.get_key_patches(prefix): per key [(weight, convert function)] + the graph's patches.

    ComfyUI 0.8.0's own version fails on models with quantized layers: their state dict lists entries that only
    describe the quantization (`weight_scale`, `comfy_quant`) and are no attributes of the layer. Then the same is
    gathered here from the model's state-dict keys, skipping such entries (they are not weights)."""
    try:
        return patcher.get_key_patches(prefix)
    except AttributeError:
        pass
    out = {}
    for key in patcher.model_state_dict(prefix):
        module, param = _module_of(patcher, key), key.rpartition(".")[2]
        weight = getattr(module, param, None) if module is not None else None
        if not isinstance(weight, torch.Tensor):
            continue
        backup = patcher.backup.get(key)  # a weight patched in place: the original is kept here
        if backup is not None:
            weight = backup.weight
        hook_backup = getattr(patcher, "hook_backup", {}).get(key)
        if hook_backup is not None:
            weight = hook_backup[0]
        convert = getattr(module, "convert_" + param, None)
        out[key] = [(weight, convert if callable(convert) else (lambda a, **kwargs: a))] + list(
            patcher.patches.get(key, []))
    return out


def _has_convert_hook(patcher, key: str) -> bool:
    """Whether the layer holding `key` converts it to real values itself (ComfyUI's `convert_<param>` hook, as
    ModelPatcher looks it up). Such layers are ComfyUI's scaled ops and this pack's run-time scaled Linear; the
    hook is an identity for their unscaled weights, which then just travel as float32."""
    module = _module_of(patcher, key)
    if module is None:
        return False
    return callable(getattr(module, "convert_" + key.rpartition(".")[2], None))


def graph_source(tensors: list[GraphTensor], name: str) -> StateDictSource:
    """The converter's view of `tensors`: each one is computed (patched, moved to the CPU) only when the converter
    reads it, on its prefetch thread."""
    by_key = {t.key: t for t in tensors}
    return StateDictSource(name, {t.key: (t.dtype, t.shape) for t in tensors}, lambda key: by_key[key].read())
