"""Scaled-FP16 (or plain) safetensors files as ComfyUI models: a diffusion MODEL, a CLIP, a whole checkpoint.

Weights are read one tensor at a time and the scale and marker tensors dropped (`quant_core.readback.iter_dequantized`).
A weight whose scale is not 1 is dequantized (`weight.float() * scale_weight`) at load where the product fits the
file's fp16 exactly; elsewhere the diffusion-model loader keeps the fp16 weight and its scale and lets ComfyUI build
the model with Linear layers that apply the scale at run time (`ops.ScaledFP16Ops` through
`model_options["custom_operations"]`), so that the model costs what an fp16 model costs. Stock loaders would run a
scaled_fp16 file with its weights unscaled (docs/comfyui.md).
"""

from __future__ import annotations

import inspect
import logging

import comfy.sd
import folder_paths
import torch

from ..quant_core.format import has_fp8_marker
from ..quant_core.readback import SCALE_AT_LOAD, load_dequantized_state_dict
from ..quant_core.safetensors_io import read_header
log = logging.getLogger("comfyui-scaled-fp16")

_WARNED_FP8_MARKER: set[str] = set()


class UnrecognisedModel(ValueError):
    """ComfyUI could not tell what model a file holds."""


def _warn_fp8_marker(path: str) -> None:
    """Once per file: a file written with the former scaled_fp8 option loads right here, not in stock loaders."""
    if path in _WARNED_FP8_MARKER:
        return
    try:
        if not has_fp8_marker(read_header(path)):
            return
    except Exception:  # a bad file: the reader names it when it is loaded
        return
    _WARNED_FP8_MARKER.add(path)
    log.warning("%s carries a 'scaled_fp8' marker (written by an earlier version of this pack): it loads right in "
                "the Scaled FP16 loaders, but the stock loaders of ComfyUI 0.8.0 and later cast every weight of it "
                "to fp8 (wrong images). Rewrite it without the marker: python -m quant_core strip-fp8-marker "
                "\"%s\" --in-place", path, path)


def _build_diffusion_model(sd: dict, model_options: dict, metadata: dict | None):
    """comfy.sd.load_diffusion_model_state_dict, passing the file's metadata where this ComfyUI takes it (0.8.0 does,
    0.3.64 does not)."""
    fn = comfy.sd.load_diffusion_model_state_dict
    try:
        takes_metadata = "metadata" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        takes_metadata = False
    if takes_metadata:
        return fn(sd, model_options=model_options, metadata=metadata)
    return fn(sd, model_options=model_options)


def load_diffusion_model(path: str, dtype: torch.dtype | None, scale_at: str):
    """A MODEL (ModelPatcher) from a scaled-FP16 (or plain) diffusion-model file; weights that do not fit fp16 once
    scaled stay fp16 with their scale applied at run time unless `scale_at` is "load". `dtype=None` lets ComfyUI
    choose the weight dtype."""
    _warn_fp8_marker(path)
    metadata = read_header(path).metadata or None
    kept: list[str] = []
    sd = load_dequantized_state_dict(path, dtype, scale_at, kept)
    model_options = {"dtype": dtype} if dtype is not None else {}
    if not kept:
        model = _build_diffusion_model(sd, model_options, metadata)
    else:
        from .ops import ScaledFP16Ops, runtime_scaled_layers  # ComfyUI's layer classes: only when a file needs them
        model = _build_diffusion_model(sd, {**model_options, "custom_operations": ScaledFP16Ops}, metadata)
        applied = len(runtime_scaled_layers(model.model)) if model is not None else len(kept)
        if applied != len(kept):
            # a scaled weight of a layer kind other than Linear (or keys this architecture renames): the safe way
            log.warning("%s: %d of %d scaled weights are not in Linear layers that can apply a scale at run time; "
                        "dequantizing all of them at load instead", path, len(kept) - applied, len(kept))
            del model, sd
            model = _build_diffusion_model(load_dequantized_state_dict(path, dtype, SCALE_AT_LOAD), model_options,
                                           metadata)
        elif model is not None:
            log.info("%s: %d weights stay fp16 with their scale applied at run time", path, applied)
    if model is None:
        raise UnrecognisedModel(f"{path}: ComfyUI does not recognise this diffusion model's architecture "
                                "(is it a text encoder, VAE or LoRA?)")
    return model


def _clip_type(type_name: str):
    return getattr(comfy.sd.CLIPType, type_name.upper(), comfy.sd.CLIPType.STABLE_DIFFUSION)


def _device_options(device: str) -> dict:
    if device == "cpu":
        return {"load_device": torch.device("cpu"), "offload_device": torch.device("cpu")}
    return {}


def load_text_encoders(files: list[str], type_name: str, device: str):
    """A CLIP from one or more text-encoder files (scaled FP16 or plain), as the stock CLIP loaders build it;
    `type_name` and `device` are the stock loaders' widget values."""
    state_dicts = []
    for path in files:
        _warn_fp8_marker(path)
        sd = load_dequantized_state_dict(path)
        if comfy.sd.detect_te_model(sd) is None:
            raise UnrecognisedModel(f"{path}: not a text encoder ComfyUI recognises (no known CLIP/T5/LLM key "
                                    "layout); check that this is the right file")
        state_dicts.append(sd)
    return comfy.sd.load_text_encoder_state_dicts(
        state_dicts, embedding_directory=folder_paths.get_folder_paths("embeddings"),
        clip_type=_clip_type(type_name), model_options=_device_options(device))


def load_checkpoint(path: str) -> tuple:
    """(MODEL, CLIP, VAE) from a whole checkpoint, scaled FP16 or plain."""
    _warn_fp8_marker(path)
    out = comfy.sd.load_state_dict_guess_config(
        load_dequantized_state_dict(path), output_vae=True, output_clip=True,
        embedding_directory=folder_paths.get_folder_paths("embeddings"), metadata=read_header(path).metadata or None)
    if out is None:
        raise UnrecognisedModel(f"{path}: ComfyUI does not recognise this checkpoint's architecture")
    return out[:3]
