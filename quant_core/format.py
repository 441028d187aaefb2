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
import os
from dataclasses import dataclass

import torch

from .errors import ConversionError
from .safetensors_io import DTYPES, FLOAT_DTYPES, Header, SafetensorsReader

FORMAT_NAME = "scaled_fp16"
FORMAT_VERSION = "1"
MARKER_KEY = "scaled_fp16"
SCALE_SUFFIXES = (".scale_weight", ".scale_input")

T5_REMOVE = ("decoder", "lm_head")
T5_KEEP = ("norm", "bias", "embed_tokens", "shared")
DISTILL_KEEP = ("distilled_guidance_layer", "final_layer", "img_in", "txt_in")

QUANTIZE, KEEP, REMOVE, KEEP_UNSCALED = "quantize", "keep", "remove", "keep_unscaled"
ACTION_NAMES = {QUANTIZE: "quantized", KEEP: "kept", REMOVE: "removed", KEEP_UNSCALED: "kept"}


# ComfyUI's scaled-fp8 marker. Earlier versions of this converter could add it (dtype float16) so that ComfyUI
# 0.3.x's stock loaders applied scale_weight; ComfyUI 0.8.0 and later cast every weight of a file carrying it to fp8
# (comfy.utils.convert_old_quants), so it is never written any more. Files that have it next to our own marker still
# load right in this pack's loaders; `strip_fp8_marker` rewrites them without it.
FP8_MARKER_KEY = "scaled_fp8"
# markers other converters use; a file carrying one is already quantized
FOREIGN_MARKERS = (FP8_MARKER_KEY,)
FP8_MARKER_REMOVED = ("the scaled_fp8 marker option was removed: ComfyUI 0.8.0 and later cast every weight of a "
                      "file carrying that marker to fp8 (relative L2 error of the sampled output 1.1e-1 measured "
                      "on a FLUX-architecture model); load scaled FP16 files with this pack's loaders")


@dataclass(frozen=True)
class Rules:
    t5xxl: bool = False
    keep_distillation: bool = False


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
    return {MARKER_KEY: torch.zeros((0,) if rules.t5xxl else (2,), dtype=torch.float16)}


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


# --- files of an earlier version ------------------------------------------------------------------------------

def has_fp8_marker(header: Header) -> bool:
    """A scaled-FP16 file that also carries ComfyUI's `scaled_fp8` marker (written by earlier versions on request):
    ComfyUI 0.8.0 and later's stock loaders cast its weights to fp8."""
    return MARKER_KEY in header.tensors and FP8_MARKER_KEY in header.tensors


def strip_fp8_marker(src: str, dst: str | None = None, overwrite: bool = False) -> str:
    """Rewrite scaled-FP16 file `src` without the `scaled_fp8` marker; every other tensor and the metadata are kept
    byte for byte. Streams one tensor at a time into a temporary file in the destination folder that is renamed
    into place at the end (`dst` None: `src` itself is replaced that way, atomically). Returns the path written.

    Refused (ConversionError) for a file without our marker (its `scaled_fp8` marker belongs to a real fp8 file,
    which needs it) and for a file without a `scaled_fp8` marker (nothing to do)."""
    from .safetensors_io import StreamingWriter, check_input_path

    check_input_path(src)
    in_place = dst is None or os.path.realpath(dst) == os.path.realpath(src)
    dst = src if in_place else dst
    with SafetensorsReader(src) as reader:
        header = reader.header
        if FP8_MARKER_KEY not in header.tensors:
            raise ConversionError(f"{src}: has no '{FP8_MARKER_KEY}' marker; nothing to strip")
        if MARKER_KEY not in header.tensors:
            raise ConversionError(f"{src}: not a scaled-FP16 file (no '{MARKER_KEY}' tensor): its "
                                  f"'{FP8_MARKER_KEY}' marker belongs to an fp8 model, which needs it")
        if not in_place and os.path.exists(dst) and not overwrite:
            raise ConversionError(f"{dst}: already exists (use --overwrite to replace it)")
        keys = [k for k in header.tensors if k != FP8_MARKER_KEY]
        entries = [(k, header.tensors[k].dtype, header.tensors[k].shape) for k in keys]
        buf = torch.empty(max((header.tensors[k].nbytes for k in keys), default=1), dtype=torch.uint8)
        with StreamingWriter(dst, entries, header.metadata, overwrite=in_place or overwrite) as writer:
            for key in keys:
                writer.write(key, reader.read_into(key, buf))
            writer.commit()
    return dst


def dtype_name(dtype: str) -> str:
    """Human/torch name of a safetensors dtype code, e.g. BF16 -> bfloat16."""
    dt = DTYPES[dtype][0]
    return str(dt).replace("torch.", "") if dt is not None else dtype
