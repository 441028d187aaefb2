"""Loaders for scaled-FP16 files (plain files load too).

Weights are read one tensor at a time and the scale and marker tensors dropped (`quant_core.format.iter_dequantized`).
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
import nodes as comfy_nodes  # ComfyUI's nodes.py: the stock loaders' widget lists are reused, not copied
import torch

from ..quant_core.format import (SCALE_AT_LOAD, SCALE_AT_RUN, SCALE_AUTO, has_fp8_marker, load_dequantized_state_dict)
from ..quant_core.safetensors_io import read_header
from . import paths
from .convert import LOADER_CATEGORY as CATEGORY

log = logging.getLogger("comfyui-scaled-fp16")

WEIGHT_DTYPES = {"default": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# the diffusion-model loader's `apply_scale` widget: where a weight's scale is applied
APPLY_SCALE = {"auto": SCALE_AUTO, "at load": SCALE_AT_LOAD, "at run time": SCALE_AT_RUN}
_WARNED_FP8_MARKER: set[str] = set()


class UnrecognisedModel(ValueError):
    """ComfyUI could not tell what model a file holds."""


def _state_dict(path: str, dtype: torch.dtype | None = None, scale_at: str = SCALE_AT_LOAD,
                kept_scaled: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Weights of a scaled-FP16 or plain safetensors file (see `iter_dequantized`); `dtype=None` keeps each tensor
    lossless."""
    _warn_fp8_marker(path)
    return load_dequantized_state_dict(path, dtype, scale_at, kept_scaled)


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


def _load_diffusion_model(sd: dict, model_options: dict, metadata: dict | None):
    """comfy.sd.load_diffusion_model_state_dict, passing the file's metadata where this ComfyUI takes it."""
    fn = comfy.sd.load_diffusion_model_state_dict
    try:
        takes_metadata = "metadata" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        takes_metadata = False
    if takes_metadata:
        return fn(sd, model_options=model_options, metadata=metadata)
    return fn(sd, model_options=model_options)


def load_diffusion_model(path: str, dtype: torch.dtype | None, scale_at: str):
    """A MODEL from a scaled-FP16 (or plain) diffusion-model file; weights that do not fit fp16 once scaled stay
    fp16 with their scale applied at run time unless `scale_at` is "load"."""
    metadata = read_header(path).metadata or None
    kept: list[str] = []
    sd = _state_dict(path, dtype, scale_at, kept)
    model_options = {"dtype": dtype} if dtype is not None else {}
    if not kept:
        return _load_diffusion_model(sd, model_options, metadata)
    from .ops import ScaledFP16Ops, runtime_scaled_layers
    model = _load_diffusion_model(sd, {**model_options, "custom_operations": ScaledFP16Ops}, metadata)
    if model is None:
        return None
    applied = len(runtime_scaled_layers(model.model))
    if applied != len(kept):
        # a scaled weight of a layer kind other than Linear (or keys this architecture renames): load it the safe way
        log.warning("%s: %d of %d scaled weights are not in Linear layers that can apply a scale at run time; "
                    "dequantizing all of them at load instead", path, len(kept) - applied, len(kept))
        del model, sd
        return _load_diffusion_model(_state_dict(path, dtype, SCALE_AT_LOAD), model_options, metadata)
    log.info("%s: %d weights stay fp16 with their scale applied at run time", path, applied)
    return model


def _override_input(name: str) -> dict:
    return {name: ("STRING", {"forceInput": True, "tooltip":
                              "Link the saved_name output of a Scaled FP16 convert node here to load the file it "
                              "just wrote (takes precedence over the dropdown)."})}


def _signature(kind: str, *names: str) -> str:
    try:
        return paths.file_signature(*(paths.full_path(kind, n) for n in names))
    except Exception:  # not there yet (a converter upstream writes it): always load again
        return "missing"


def _clip_type(type_name: str):
    return getattr(comfy.sd.CLIPType, type_name.upper(), comfy.sd.CLIPType.STABLE_DIFFUSION)


def _device_options(device: str) -> dict:
    if device == "cpu":
        return {"load_device": torch.device("cpu"), "offload_device": torch.device("cpu")}
    return {}


def load_text_encoders(files: list[str], type_name: str, device: str):
    """A CLIP from one or more text-encoder files (scaled FP16 or plain), as the stock CLIP loaders build it."""
    state_dicts = []
    for path in files:
        sd = _state_dict(path)
        if comfy.sd.detect_te_model(sd) is None:
            raise UnrecognisedModel(f"{path}: not a text encoder ComfyUI recognises (no known CLIP/T5/LLM key "
                                    "layout); check that this is the right file")
        state_dicts.append(sd)
    return comfy.sd.load_text_encoder_state_dicts(
        state_dicts, embedding_directory=folder_paths.get_folder_paths("embeddings"),
        clip_type=_clip_type(type_name), model_options=_device_options(device))


class ScaledFP16UNETLoader:
    TITLE = "Load Diffusion Model (Scaled FP16)"
    DESCRIPTION = ("Loads a diffusion model saved as scaled FP16 (or a plain safetensors file), applying each "
                   "weight's scale_weight: at load where the product fits fp16, else at run time with the weight "
                   "kept fp16 (apply_scale).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_unet"
    KIND = "diffusion_models"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"unet_name": (folder_paths.get_filename_list(cls.KIND),),
                             "weight_dtype": (list(WEIGHT_DTYPES), {"tooltip":
                                              "Dtype of the weights in memory; default lets ComfyUI choose."})},
                # optional inputs: sockets and widgets are appended here, never inserted (saved workflows)
                "optional": {**_override_input("unet_name_override"),
                             "apply_scale": (list(APPLY_SCALE), {"default": "auto", "tooltip":
                                             "Where a weight's scale_weight is applied. auto: at load where "
                                             "weight x scale fits fp16 exactly (scale 1, in-range values), else at "
                                             "run time, keeping the fp16 weight (the model costs what an fp16 model "
                                             "costs). at load: always multiplied out at load (wider dtype where "
                                             "fp16 cannot hold the product). at run time: every scaled weight of a "
                                             "Linear layer stays fp16."})}}

    @classmethod
    def IS_CHANGED(cls, unet_name, weight_dtype=None, unet_name_override=None, apply_scale=None):
        return _signature(cls.KIND, paths.loader_name(cls.KIND, unet_name, unet_name_override))

    def load_unet(self, unet_name, weight_dtype, unet_name_override=None, apply_scale="auto"):
        path = paths.full_path(self.KIND, paths.loader_name(self.KIND, unet_name, unet_name_override))
        model = load_diffusion_model(path, WEIGHT_DTYPES[weight_dtype], APPLY_SCALE[apply_scale])
        if model is None:
            raise UnrecognisedModel(f"{path}: ComfyUI does not recognise this diffusion model's architecture "
                                    "(is it a text encoder, VAE or LoRA?)")
        return (model,)


class ScaledFP16CLIPLoader:
    TITLE = "Load CLIP (Scaled FP16)"
    DESCRIPTION = "Loads a text encoder saved as scaled FP16 (or a plain file), applying the scales at load."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load_clip"
    KIND = "text_encoders"
    STOCK = "CLIPLoader"

    @classmethod
    def INPUT_TYPES(cls):
        stock = getattr(comfy_nodes, cls.STOCK).INPUT_TYPES()
        return {"required": {"clip_name": (folder_paths.get_filename_list(cls.KIND),),
                             "type": stock["required"]["type"]},
                "optional": {**stock.get("optional", {}), **_override_input("clip_name_override")}}

    @classmethod
    def IS_CHANGED(cls, clip_name, type=None, device=None, clip_name_override=None):
        return _signature(cls.KIND, paths.loader_name(cls.KIND, clip_name, clip_name_override))

    def load_clip(self, clip_name, type="stable_diffusion", device="default", clip_name_override=None):
        path = paths.full_path(self.KIND, paths.loader_name(self.KIND, clip_name, clip_name_override))
        return (load_text_encoders([path], type, device),)


class ScaledFP16DualCLIPLoader:
    TITLE = "Load Dual CLIP (Scaled FP16)"
    DESCRIPTION = ("Loads two text encoders (FLUX: clip_l + t5xxl), either of them scaled FP16 or plain, applying the "
                   "scales at load.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load_clip"
    KIND = "text_encoders"
    STOCK = "DualCLIPLoader"

    @classmethod
    def INPUT_TYPES(cls):
        stock = getattr(comfy_nodes, cls.STOCK).INPUT_TYPES()
        files = folder_paths.get_filename_list(cls.KIND)
        return {"required": {"clip_name1": (files,), "clip_name2": (files,), "type": stock["required"]["type"]},
                "optional": {**stock.get("optional", {}), **_override_input("clip_name1_override"),
                             **_override_input("clip_name2_override")}}

    @classmethod
    def IS_CHANGED(cls, clip_name1, clip_name2, type=None, device=None, clip_name1_override=None,
                   clip_name2_override=None):
        return _signature(cls.KIND, paths.loader_name(cls.KIND, clip_name1, clip_name1_override),
                          paths.loader_name(cls.KIND, clip_name2, clip_name2_override))

    def load_clip(self, clip_name1, clip_name2, type, device="default", clip_name1_override=None,
                  clip_name2_override=None):
        files = [paths.full_path(self.KIND, paths.loader_name(self.KIND, n, o))
                 for n, o in ((clip_name1, clip_name1_override), (clip_name2, clip_name2_override))]
        return (load_text_encoders(files, type, device),)


class ScaledFP16CheckpointLoader:
    TITLE = "Load Checkpoint (Scaled FP16)"
    DESCRIPTION = "Loads a whole checkpoint (model, text encoder, VAE) saved as scaled FP16, or a plain one."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load_checkpoint"
    KIND = "checkpoints"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": (folder_paths.get_filename_list(cls.KIND),)},
                "optional": _override_input("ckpt_name_override")}

    @classmethod
    def IS_CHANGED(cls, ckpt_name, ckpt_name_override=None):
        return _signature(cls.KIND, paths.loader_name(cls.KIND, ckpt_name, ckpt_name_override))

    def load_checkpoint(self, ckpt_name, ckpt_name_override=None):
        path = paths.full_path(self.KIND, paths.loader_name(self.KIND, ckpt_name, ckpt_name_override))
        out = comfy.sd.load_state_dict_guess_config(
            _state_dict(path), output_vae=True, output_clip=True,
            embedding_directory=folder_paths.get_folder_paths("embeddings"),
            metadata=read_header(path).metadata or None)
        if out is None:
            raise UnrecognisedModel(f"{path}: ComfyUI does not recognise this checkpoint's architecture")
        return out[:3]
