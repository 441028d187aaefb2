"""Loader nodes for scaled-FP16 files (plain files load too); how a file becomes a model is `loading.py`."""

from __future__ import annotations

import folder_paths
import nodes as comfy_nodes  # ComfyUI's nodes.py: the stock loaders' widget lists are reused, not copied
import torch

from ..quant_core.readback import SCALE_AT_LOAD, SCALE_AT_RUN, SCALE_AUTO
from . import paths
from .common import LOADER_CATEGORY
from .loading import load_checkpoint, load_diffusion_model, load_text_encoders

WEIGHT_DTYPES = {"default": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# the diffusion-model loader's `apply_scale` widget: where a weight's scale is applied
APPLY_SCALE = {"auto": SCALE_AUTO, "at load": SCALE_AT_LOAD, "at run time": SCALE_AT_RUN}


class FileLoader:
    """Base of the loaders: files of one model folder KIND, each chosen in a dropdown named in FILE_INPUTS, or
    linked as a name into the optional socket `<name>_override` (e.g. a converter's saved_name), which wins."""

    CATEGORY = LOADER_CATEGORY
    KIND: str
    FILE_INPUTS: tuple[str, ...]

    @classmethod
    def file_widgets(cls) -> dict:
        files = folder_paths.get_filename_list(cls.KIND)
        return {name: (files,) for name in cls.FILE_INPUTS}

    @classmethod
    def override_sockets(cls) -> dict:
        return {f"{name}_override": ("STRING", {"forceInput": True, "tooltip":
                                                "Link the saved_name output of a Scaled FP16 convert node here to "
                                                "load the file it just wrote (takes precedence over the dropdown)."})
                for name in cls.FILE_INPUTS}

    @classmethod
    def chosen_paths(cls, inputs: dict) -> list[str]:
        """The full path of each file input, from the node's input values by name."""
        return [paths.full_path(cls.KIND, paths.loader_name(cls.KIND, inputs[name], inputs.get(f"{name}_override")))
                for name in cls.FILE_INPUTS]

    @classmethod
    def IS_CHANGED(cls, **inputs):
        """The chosen files' size and mtime, so a rewritten file of the same name is loaded again; a file that is
        not there yet (a converter upstream writes it) loads again every time."""
        try:
            return paths.file_signature(*cls.chosen_paths(inputs))
        except Exception:  # noqa: BLE001
            return "missing"


class ScaledFP16UNETLoader(FileLoader):
    TITLE = "Load Diffusion Model (Scaled FP16)"
    DESCRIPTION = ("Loads a diffusion model saved as scaled FP16 (or a plain safetensors file), applying each "
                   "weight's scale_weight: at load where the product fits fp16, else at run time with the weight "
                   "kept fp16 (apply_scale).")
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_unet"
    KIND = "diffusion_models"
    FILE_INPUTS = ("unet_name",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {**cls.file_widgets(), "weight_dtype": (list(WEIGHT_DTYPES), {
                    "tooltip": "Dtype of the weights in memory; default lets ComfyUI choose."})},
                # optional inputs: sockets and widgets are appended here, never inserted (saved workflows)
                "optional": {**cls.override_sockets(), "apply_scale": (list(APPLY_SCALE), {
                    "default": "auto", "tooltip":
                    "Where a weight's scale_weight is applied. auto: at load where weight x scale fits fp16 exactly "
                    "(scale 1, in-range values), else at run time, keeping the fp16 weight (the model costs what an "
                    "fp16 model costs). at load: always multiplied out at load (wider dtype where fp16 cannot hold "
                    "the product). at run time: every scaled weight of a Linear layer stays fp16."})}}

    def load_unet(self, weight_dtype, apply_scale="auto", **files):
        (path,) = self.chosen_paths(files)
        return (load_diffusion_model(path, WEIGHT_DTYPES[weight_dtype], APPLY_SCALE[apply_scale]),)


class ScaledFP16CLIPLoader(FileLoader):
    TITLE = "Load CLIP (Scaled FP16)"
    DESCRIPTION = "Loads a text encoder saved as scaled FP16 (or a plain file), applying the scales at load."
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load_clip"
    KIND = "text_encoders"
    FILE_INPUTS = ("clip_name",)
    STOCK = "CLIPLoader"  # the stock node whose `type` and `device` widgets are reused

    @classmethod
    def INPUT_TYPES(cls):
        stock = getattr(comfy_nodes, cls.STOCK).INPUT_TYPES()
        return {"required": {**cls.file_widgets(), "type": stock["required"]["type"]},
                "optional": {**stock.get("optional", {}), **cls.override_sockets()}}

    def load_clip(self, type="stable_diffusion", device="default", **files):
        return (load_text_encoders(self.chosen_paths(files), type, device),)


class ScaledFP16DualCLIPLoader(ScaledFP16CLIPLoader):
    TITLE = "Load Dual CLIP (Scaled FP16)"
    DESCRIPTION = ("Loads two text encoders (FLUX: clip_l + t5xxl), either of them scaled FP16 or plain, applying the "
                   "scales at load.")
    STOCK = "DualCLIPLoader"
    FILE_INPUTS = ("clip_name1", "clip_name2")


class ScaledFP16CheckpointLoader(FileLoader):
    TITLE = "Load Checkpoint (Scaled FP16)"
    DESCRIPTION = "Loads a whole checkpoint (model, text encoder, VAE) saved as scaled FP16, or a plain one."
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load_checkpoint"
    KIND = "checkpoints"
    FILE_INPUTS = ("ckpt_name",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": cls.file_widgets(), "optional": cls.override_sockets()}

    def load_checkpoint(self, **files):
        (path,) = self.chosen_paths(files)
        return load_checkpoint(path)
