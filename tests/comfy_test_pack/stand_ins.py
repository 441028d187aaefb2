"""Stand-in ComfyUI modules for the glue unit tests (tests/test_nodes_*.py): just enough of folder_paths, comfy.*,
server and nodes for the pack to import and run without a server. Each records what the pack handed it."""

from __future__ import annotations

import enum
import importlib.util
import os
import sys
import types

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACK_MODULE = "fp16lr_pack_under_test"
MODULE_NAMES = ("folder_paths", "comfy", "comfy.sd", "comfy.utils", "comfy.model_management", "comfy.lora",
                "server", "nodes")


class Recorder:
    """What the pack did: custom events sent, progress bar updates, state dicts handed to comfy.sd."""

    def __init__(self):
        self.events: list[tuple[str, dict, object]] = []
        self.progress: list[tuple[int, int, object]] = []
        self.loaded: list[tuple[str, object, dict]] = []
        self.interrupt_after: int | None = None  # interrupt once this many progress updates were seen

    def of(self, name: str) -> list[dict]:
        return [d for n, d, _ in self.events if n == name]


def install(base_dir: str) -> tuple[types.ModuleType, Recorder]:
    """Put stand-ins into sys.modules, load the pack the way ComfyUI does, return (pack module, recorder)."""
    rec = Recorder()
    models = os.path.join(base_dir, "models")
    output = os.path.join(base_dir, "output")
    for d in ("diffusion_models", "unet", "checkpoints", "text_encoders", "clip", "embeddings"):
        os.makedirs(os.path.join(models, d), exist_ok=True)
    os.makedirs(output, exist_ok=True)

    fp = types.ModuleType("folder_paths")
    fp.models_dir = models
    exts = {".safetensors", ".ckpt", ".pt", ".bin", ".pth"}
    fp.folder_names_and_paths = {
        "diffusion_models": ([os.path.join(models, "unet"), os.path.join(models, "diffusion_models"),
                              os.path.join(output, "diffusion_models")], exts),
        "checkpoints": ([os.path.join(models, "checkpoints"), os.path.join(output, "checkpoints")], exts),
        "text_encoders": ([os.path.join(models, "text_encoders"), os.path.join(models, "clip"),
                           os.path.join(output, "clip")], exts),
        "embeddings": ([os.path.join(models, "embeddings")], exts),
    }
    fp.filename_list_cache = {}
    legacy = {"unet": "diffusion_models", "clip": "text_encoders"}

    def get_folder_paths(kind):
        return list(fp.folder_names_and_paths[legacy.get(kind, kind)][0])

    def get_filename_list(kind):
        kind = legacy.get(kind, kind)
        folders, allowed = fp.folder_names_and_paths[kind]
        names = set()
        for folder in folders:
            for root, _, files in os.walk(folder):
                for f in files:
                    if os.path.splitext(f)[1].lower() in allowed:
                        names.add(os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/"))
        fp.filename_list_cache[kind] = sorted(names)
        return sorted(names)

    def get_full_path(kind, name):
        for folder in get_folder_paths(kind):
            p = os.path.join(folder, name)
            if os.path.isfile(p):
                return p
        return None

    def get_full_path_or_raise(kind, name):
        p = get_full_path(kind, name)
        if p is None:
            raise FileNotFoundError(f"Model in folder '{kind}' with filename '{name}' not found.")
        return p

    fp.get_folder_paths = get_folder_paths
    fp.get_filename_list = get_filename_list
    fp.get_full_path = get_full_path
    fp.get_full_path_or_raise = get_full_path_or_raise
    fp.get_output_directory = lambda: output

    import torch

    mm = types.ModuleType("comfy.model_management")

    class InterruptProcessingException(Exception):
        pass

    mm.InterruptProcessingException = InterruptProcessingException
    mm.interrupted = False
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.soft_empty_cache = lambda *a, **k: None

    def throw_exception_if_processing_interrupted():
        if mm.interrupted:
            mm.interrupted = False
            raise InterruptProcessingException()

    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted

    utils = types.ModuleType("comfy.utils")

    utils.PROGRESS_BAR_HOOK = None

    def set_progress_bar_global_hook(function):
        utils.PROGRESS_BAR_HOOK = function

    class ProgressBar:
        """Takes the global hook in effect when it is made, as ComfyUI's does."""

        def __init__(self, total, node_id=None):
            self.total, self.node_id, self.hook = total, node_id, utils.PROGRESS_BAR_HOOK

        def update_absolute(self, value, total=None, preview=None):
            if total is not None:
                self.total = total
            rec.progress.append((value, self.total, self.node_id))
            if self.hook is not None:
                self.hook(value, self.total, preview, node_id=self.node_id)
            if rec.interrupt_after is not None and len(rec.progress) >= rec.interrupt_after:
                mm.interrupted = True

    utils.ProgressBar = ProgressBar
    utils.set_progress_bar_global_hook = set_progress_bar_global_hook

    sd = types.ModuleType("comfy.sd")
    sd.CLIPType = enum.Enum("CLIPType", "STABLE_DIFFUSION STABLE_AUDIO SD3 FLUX")
    sd.recognise = True

    def load_diffusion_model_state_dict(state_dict, model_options={}):
        rec.loaded.append(("unet", state_dict, model_options))
        return "MODEL" if sd.recognise else None

    def load_text_encoder_state_dicts(state_dicts=[], embedding_directory=None, clip_type=None, model_options={}):
        rec.loaded.append(("clip", state_dicts, {"clip_type": clip_type, **model_options}))
        return "CLIP"

    def load_state_dict_guess_config(state_dict, output_vae=True, output_clip=True, embedding_directory=None,
                                     metadata=None, **kw):
        rec.loaded.append(("checkpoint", state_dict, {"metadata": metadata}))
        return ("MODEL", "CLIP", "VAE", None) if sd.recognise else None

    sd.load_diffusion_model_state_dict = load_diffusion_model_state_dict
    sd.load_text_encoder_state_dicts = load_text_encoder_state_dicts
    sd.load_state_dict_guess_config = load_state_dict_guess_config
    sd.detect_te_model = lambda state_dict: ("T5" if any(k.startswith("encoder.") for k in state_dict)
                                             else None)

    lora = types.ModuleType("comfy.lora")

    def calculate_weight(patches, weight, key, intermediate_dtype=torch.float32):
        for strength, delta in patches:  # stand-in patch format: (strength, delta tensor)
            weight = weight + strength * delta.to(weight.dtype)
        return weight

    lora.calculate_weight = calculate_weight

    comfy = types.ModuleType("comfy")
    comfy.__path__ = []
    comfy.sd, comfy.utils, comfy.model_management, comfy.lora = sd, utils, mm, lora

    server = types.ModuleType("server")

    class PromptServer:
        instance = None

        def __init__(self):
            self.client_id = "client-1"
            self.last_prompt_id = "prompt-1"

        def send_sync(self, event, data, sid=None):
            rec.events.append((event, data, sid))

    server.PromptServer = PromptServer
    PromptServer.instance = PromptServer()

    stock = types.ModuleType("nodes")

    class CLIPLoader:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"clip_name": ([],), "type": (["stable_diffusion", "stable_audio", "sd3"],)},
                    "optional": {"device": (["default", "cpu"], {"advanced": True})}}

    class DualCLIPLoader:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"clip_name1": ([],), "clip_name2": ([],), "type": (["sdxl", "sd3", "flux"],)},
                    "optional": {"device": (["default", "cpu"], {"advanced": True})}}

    class KSampler:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"model": ("MODEL",), "seed": ("INT", {"default": 0}), "steps": ("INT", {"default": 20}),
                                 "cfg": ("FLOAT", {"default": 8.0}), "sampler_name": (["euler"],),
                                 "scheduler": (["simple"],), "positive": ("CONDITIONING",),
                                 "negative": ("CONDITIONING",), "latent_image": ("LATENT",),
                                 "denoise": ("FLOAT", {"default": 1.0})}}

    def common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, denoise=1.0):
        """Stand-in sampler: `steps` calls of the model's diffusion_model on the latent's samples, with a step bar
        (no node id) as ComfyUI's sampling callback has."""
        x = latent["samples"]
        bar = ProgressBar(steps)
        for step in range(steps):
            x = model.model.diffusion_model(x)
            mm.throw_exception_if_processing_interrupted()
            bar.update_absolute(step + 1, steps)
        return ({**latent, "samples": x},)

    stock.CLIPLoader, stock.DualCLIPLoader, stock.KSampler = CLIPLoader, DualCLIPLoader, KSampler
    stock.common_ksampler = common_ksampler
    mm.load_models_gpu = lambda models, *a, **k: None

    for name, mod in (("folder_paths", fp), ("comfy", comfy), ("comfy.sd", sd), ("comfy.utils", utils),
                      ("comfy.model_management", mm), ("comfy.lora", lora), ("server", server), ("nodes", stock)):
        sys.modules[name] = mod

    spec = importlib.util.spec_from_file_location(PACK_MODULE, os.path.join(PACK_ROOT, "__init__.py"),
                                                  submodule_search_locations=[PACK_ROOT])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = pack
    spec.loader.exec_module(pack)
    return pack, rec


def uninstall() -> None:
    for name in list(sys.modules):
        if name in MODULE_NAMES or name == PACK_MODULE or name.startswith(PACK_MODULE + "."):
            del sys.modules[name]
