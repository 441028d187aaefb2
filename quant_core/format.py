"""The scaled-FP16 file format.

A quantized weight ``P.weight`` (floating, two or more dimensions) is stored as float16 together with
``P.scale_weight`` (float32, shape [1]); the weight it stands for is ``weight.float() * scale_weight``. Biases and all
other tensors are copied unchanged. A marker tensor ``scaled_fp16`` (float16, shape [2]; shape [0] in T5XXL mode)
tells loaders what the file is. This matches what the reference script writes, so its readers read our files.

T5XXL mode drops decoder/lm_head tensors, keeps norms, biases and embeddings unquantized, and adds
``P.scale_input`` (a copy of the scale) beside each quantized weight. Keep-distillation mode leaves FLUX's
distillation/in/out layers in their source dtype with ``scale_weight`` = 1.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Iterator

import torch
from safetensors import safe_open

from .errors import ConversionError
from .safetensors_io import DTYPES, FLOAT_DTYPES, Header, SafetensorsReader

FORMAT_NAME = "scaled_fp16"
FORMAT_VERSION = "1"
MARKER_KEY = "scaled_fp16"
SCALE_SUFFIXES = (".scale_weight", ".scale_input")
# markers other converters use; a file carrying one is already quantized
FOREIGN_MARKERS = ("scaled_fp8",)

T5_REMOVE = ("decoder", "lm_head")
T5_KEEP = ("norm", "bias", "embed_tokens", "shared")
DISTILL_KEEP = ("distilled_guidance_layer", "final_layer", "img_in", "txt_in")

QUANTIZE, KEEP, REMOVE, KEEP_UNSCALED = "quantize", "keep", "remove", "keep_unscaled"
ACTION_NAMES = {QUANTIZE: "quantized", KEEP: "kept", REMOVE: "removed", KEEP_UNSCALED: "kept"}


FP8_MARKER_KEY = "scaled_fp8"


@dataclass(frozen=True)
class Rules:
    t5xxl: bool = False
    keep_distillation: bool = False
    # also write ComfyUI's own `scaled_fp8` marker (float16, shape [0]) so that stock loaders apply scale_weight
    scaled_fp8_marker: bool = False


def classify(key: str, dtype: str, shape: tuple[int, ...], rules: Rules) -> str:
    """What happens to one input tensor: QUANTIZE, KEEP, REMOVE or KEEP_UNSCALED (source dtype, scale_weight 1)."""
    if rules.t5xxl and any(s in key for s in T5_REMOVE):
        return REMOVE
    if not (key.endswith(".weight") and dtype in FLOAT_DTYPES and len(shape) >= 2):
        return KEEP
    if rules.t5xxl and any(s in key for s in T5_KEEP):
        return KEEP
    if rules.keep_distillation and any(s in key for s in DISTILL_KEEP):
        return KEEP_UNSCALED
    return QUANTIZE


def layer_of(weight_key: str) -> str:
    return weight_key[: -len(".weight")]


@dataclass
class PlanItem:
    """One input tensor and what becomes of it. `outputs` lists (key, dtype, shape) written for it, in order."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    action: str
    nbytes: int
    outputs: list[tuple[str, str, tuple[int, ...]]]


def plan(header: Header, rules: Rules) -> list[PlanItem]:
    """Plan the whole conversion: per input tensor its action and the output entries, in processing order.

    A quantized layer's bias is moved right after its weight so that bias correction can use the weight's rounding
    error while streaming. The marker comes last.
    """
    for key in header.tensors:
        if key in (MARKER_KEY,) + FOREIGN_MARKERS or key.endswith(SCALE_SUFFIXES):
            raise ConversionError(f"{header.path}: already a scaled file (has tensor '{key}'); "
                                  "convert the original model instead")
    items: list[PlanItem] = []
    for info in header.tensors.values():
        action = classify(info.key, info.dtype, info.shape, rules)
        outs: list[tuple[str, str, tuple[int, ...]]] = []
        if action == QUANTIZE:
            layer = layer_of(info.key)
            outs = [(info.key, "F16", info.shape), (layer + ".scale_weight", "F32", (1,))]
            if rules.t5xxl:
                outs.append((layer + ".scale_input", "F32", (1,)))
        elif action == KEEP_UNSCALED:
            outs = [(info.key, info.dtype, info.shape), (layer_of(info.key) + ".scale_weight", "F32", (1,))]
        elif action == KEEP:
            outs = [(info.key, info.dtype, info.shape)]
        items.append(PlanItem(info.key, info.dtype, info.shape, action, info.nbytes, outs))
    quantized_layers = {layer_of(i.key) for i in items if i.action == QUANTIZE}
    biases = {i.key: i for i in items if i.key.endswith(".bias") and i.key[:-5] in quantized_layers}
    ordered: list[PlanItem] = []
    for item in items:
        if item.key in biases:
            continue
        ordered.append(item)
        if item.action == QUANTIZE and layer_of(item.key) + ".bias" in biases:
            ordered.append(biases[layer_of(item.key) + ".bias"])
    return ordered


def markers(rules: Rules) -> dict[str, torch.Tensor]:
    """The marker tensors written after all weights."""
    out = {MARKER_KEY: torch.zeros((0,) if rules.t5xxl else (2,), dtype=torch.float16)}
    if rules.scaled_fp8_marker:
        # ComfyUI reads the weight dtype from the marker's dtype; for diffusion models a 2-element marker also
        # keeps its fp8 matmul optimisations off (measured correct with either shape for FLUX, [0] for T5XXL)
        out[FP8_MARKER_KEY] = torch.zeros((0,) if rules.t5xxl else (2,), dtype=torch.float16)
    return out


def output_entries(items: list[PlanItem], rules: Rules) -> list[tuple[str, str, tuple[int, ...]]]:
    entries = [e for item in items for e in item.outputs]
    entries += [(k, "F16", tuple(t.shape)) for k, t in markers(rules).items()]
    return entries


def metadata(source_meta: dict[str, str], source_path: str, settings: dict, converter_version: str) -> dict[str, str]:
    """The source file's metadata plus ours, under the ``scaled_fp16.`` prefix."""
    meta = dict(source_meta)
    meta.update({
        "scaled_fp16.format": FORMAT_NAME,
        "scaled_fp16.format_version": FORMAT_VERSION,
        "scaled_fp16.converter": f"comfyui-scaled-fp16 {converter_version}",
        "scaled_fp16.settings": json.dumps(settings, sort_keys=True),
        "scaled_fp16.source": os.path.basename(source_path),
    })
    return meta


def default_output_path(input_path: str, keep_distillation: bool) -> str:
    """The reference script's naming: ``<input base>_float16_scaled_learned[_nodistill]_svd.safetensors``."""
    base = os.path.splitext(input_path)[0]
    return f"{base}_float16_scaled_learned{'_nodistill' if keep_distillation else ''}_svd.safetensors"


# --- reading scaled files back -------------------------------------------------------------------------------

def is_scaled_fp16(header: Header) -> bool:
    return MARKER_KEY in header.tensors


def _lossless_dtype(w: torch.Tensor) -> torch.dtype:
    """The smallest of fp16/bf16/fp32 that holds every value of float32 `w` exactly."""
    for dt in (torch.float16, torch.bfloat16):
        c = w.to(dt)
        if torch.isfinite(c).all() and torch.equal(c.float(), w):
            return dt
    return torch.float32


def iter_dequantized(path: str, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) of a scaled-FP16 (or plain) safetensors file, one tensor at a time.

    Weights come out as ``weight.float() * scale_weight`` cast to `dtype`; with ``dtype=None`` each weight gets the
    smallest dtype that holds the dequantized values exactly (fp16 when the scale is 1 and for in-range values,
    else bf16 or fp32). Scale and marker tensors are dropped. Other tensors keep their dtype unless `dtype` is given
    and they are floating.
    """
    header = SafetensorsReader(path).header  # validates the file, names it in errors
    keyset = set(header.tensors)
    # the loaders hand these tensors to ComfyUI, which copies them into the model: read them through the library's
    # own reader, as ComfyUI's loaders do, so that loading costs what the stock loaders cost
    with safe_open(path, framework="pt", device="cpu") as f:
        for key in header.tensors:
            if key == MARKER_KEY or key in FOREIGN_MARKERS or key.endswith(SCALE_SUFFIXES):
                continue
            t = f.get_tensor(key)
            scale_key = layer_of(key) + ".scale_weight" if key.endswith(".weight") else None
            if scale_key in keyset:
                s = f.get_tensor(scale_key).float().reshape(-1)
                if s.numel() != 1:
                    raise ConversionError(f"{path}: '{scale_key}' must hold one value, has shape {list(s.shape)}")
                scale = float(s[0])
                if not (math.isfinite(scale) and scale > 0.0):  # NaN, inf, 0 or < 0 would load broken weights
                    raise ConversionError(f"{path}: '{scale_key}' is {scale}; a scale must be finite and > 0 "
                                          "(the file is damaged or was not written by a scaled-FP16 converter)")
                if scale != 1.0:
                    w = t.float() * scale
                    t = w.to(dtype) if dtype is not None else w.to(_lossless_dtype(w))
                elif dtype is not None:
                    t = t.to(dtype)
            elif dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            yield key, t


def load_dequantized_state_dict(path: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A state dict of real weights from a scaled-FP16 file (see `iter_dequantized`), built one tensor at a time."""
    return dict(iter_dequantized(path, dtype))


def dtype_name(dtype: str) -> str:
    """Human/torch name of a safetensors dtype code, e.g. BF16 -> bfloat16."""
    dt = DTYPES[dtype][0]
    return str(dt).replace("torch.", "") if dt is not None else dtype
