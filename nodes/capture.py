"""Capture nodes: calibration statistics of the graph's own models on the user's own prompts or sampling runs.

Both nodes put forward pre-hooks on Linear layers (`quant_core.capture._Recorder`: layers that read the same input
tensor share one group) and write what they saw with `quant_core.calibration.CalibrationWriter` into the calibration
folder the converting nodes list (`models/scaled_fp16_calibration`). The recorded layer names are the model's module
names (`transformer.encoder.block.0.layer.0.SelfAttention.q.weight` for a T5 encoder, `double_blocks.0.img_attn.qkv
.weight` for FLUX); the converter finds a checkpoint's weight by dotted suffix (`CalibrationSet.resolve`), so they
match the keys of the encoder's or model's file and of what the Save nodes write.

Calibration tokens are split into two halves (alternate prompts, alternate model calls) so that the calibrated
rounding is fitted on one and checked on the other. Nothing is written until every prompt or step has run: a
cancelled or failed capture leaves no file.
"""

from __future__ import annotations

import inspect
import logging
import math
import os

import comfy.model_management
import comfy.utils
import folder_paths
import nodes as comfy_nodes  # ComfyUI's nodes.py: the KSampler's widget lists and sampling function
import torch

from ..quant_core.calibration import CalibrationWriter
from ..quant_core.capture import _Recorder
from . import paths
from .common import CATEGORY, HIDDEN

log = logging.getLogger("comfyui-scaled-fp16")

DEFAULT_ROWS = 4096


def _rows_widget(what: str) -> tuple:
    return ("INT", {"default": DEFAULT_ROWS, "min": 1, "max": 1 << 24, "tooltip":
                    f"Activation rows (tokens) kept per layer from {what}; the statistics summarise at most this "
                    "many rows of each layer's input, spread over the whole run."})


def _name_widget(default: str) -> tuple:
    return ("STRING", {"default": default, "tooltip":
                       f"File name in models/{paths.CALIBRATION_KIND}; .safetensors is added. A CLIP with several "
                       "encoders gives one file per encoder, <output_name>_<encoder>."})


OVERWRITE = ("BOOLEAN", {"default": True, "tooltip":
                         "Replace an existing calibration file of that name (statistics, not a model: on by default so "
                         "that a changed prompt list or seed can be queued again). Off: an existing name is an error."})


def new_writer(rows: int) -> tuple[CalibrationWriter, bool]:
    """A writer keeping `rows` rows per layer where the writer itself can bound them; (writer, bounds them itself)."""
    try:
        params = inspect.signature(CalibrationWriter).parameters
    except (TypeError, ValueError):
        params = {}
    if "rows" in params:
        return CalibrationWriter(rows=rows), True
    return CalibrationWriter(), False


class RowLimiter:
    """Stands between `_Recorder` and the writer: marks calibration rows of the fit half (`fit`, set per prompt or
    per model call) and, where the writer keeps every row it is given, passes at most `rows` rows per group, an
    evenly spaced `per_call` of each call's rows, so that the statistics cover the whole run."""

    def __init__(self, writer: CalibrationWriter, rows: int | None, per_call: int | None):
        self.writer = writer
        self.layers = writer.layers  # _Recorder updates a layer's group here
        self.rows = rows
        self.per_call = per_call
        self.fit = False
        self.seen: dict[tuple[str, bool], int] = {}

    def add_layer(self, weight_key: str, group: str, has_bias: bool) -> None:
        self.writer.add_layer(weight_key, group, has_bias)

    def add(self, group: str, x: torch.Tensor, held_out: bool = False, fit: bool = False) -> None:
        x = x.reshape(-1, x.shape[-1])
        if self.rows is not None:
            done = self.seen.get((group, held_out), 0)
            take = min(self.rows - done, x.shape[0] if self.per_call is None else self.per_call)
            if take <= 0:
                return
            if take < x.shape[0]:
                x = x[torch.linspace(0, x.shape[0] - 1, take, device=x.device).round().long()]
            self.seen[(group, held_out)] = done + x.shape[0]
        self.writer.add(group, x, held_out=held_out, fit=False if held_out else (fit or self.fit))


def _per_call(rows: int, calls: int) -> int:
    return max(1, math.ceil(rows / max(1, calls)))


def calibration_folder() -> str:
    paths.register_calibration_folder()
    folder = folder_paths.get_folder_paths(paths.CALIBRATION_KIND)[0]
    os.makedirs(folder, exist_ok=True)
    return folder


def calibration_target(output_name: str, overwrite: bool) -> tuple[str, str]:
    """(full path, name as the calibration dropdowns list it); an existing file only with `overwrite`."""
    name = paths.checked_output_name(output_name)
    folder = calibration_folder()
    path = os.path.join(folder, *name.split("/"))
    if not os.path.realpath(path).startswith(os.path.realpath(folder) + os.sep):
        raise paths.OutputNameError(f"output name '{name}' leads outside {folder}")
    if os.path.exists(path) and not overwrite:
        raise paths.OutputNameError(f"calibration file '{name}' already exists in {folder}; choose another output "
                                    "name or enable overwrite")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path, name


def save_writer(writer: CalibrationWriter, path: str, source: dict) -> None:
    """Write the statistics; a failed write leaves neither the file nor its temporary."""
    try:
        writer.save(path, source)
    except BaseException:
        for leftover in (path + ".tmp", path + ".partial"):
            if os.path.exists(leftover):
                os.unlink(leftover)
        raise


def _result(names: list[str], extra: tuple = ()) -> dict:
    paths.refresh_file_list(paths.CALIBRATION_KIND)
    return {"ui": {"text": [", ".join(names)]}, "result": (", ".join(names), *extra)}


def _signature_of(output_name: str) -> str:
    """IS_CHANGED: the files a capture wrote, so that a deleted or replaced file makes the node run again."""
    try:
        stem = paths.checked_output_name(output_name).removesuffix(paths.SAFETENSORS)
        folder = os.path.dirname(os.path.join(calibration_folder(), *stem.split("/")))
    except paths.UserError:
        return "invalid"  # the node itself reports why
    base = os.path.basename(stem)
    names = sorted(f for f in os.listdir(folder) if f == base + paths.SAFETENSORS
                   or (f.startswith(base + "_") and f.endswith(paths.SAFETENSORS))) if os.path.isdir(folder) else []
    return paths.file_signature(*(os.path.join(folder, n) for n in names)) or "none"


def prompt_lines(text: str | None) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


# --- from prompts --------------------------------------------------------------------------------------------------


def clip_encoders(clip) -> list[tuple[str, torch.nn.Module]]:
    """The text encoders inside a ComfyUI CLIP, by the attribute names its state dict uses (`clip_l`, `t5xxl`, ...),
    as Save CLIP as Scaled FP16 names its files."""
    model = clip.cond_stage_model
    names = sorted({k.split(".", 1)[0] for k in clip.patcher.model_state_dict() if "." in k})
    out = []
    for name in names:
        module = getattr(model, name, None)
        if isinstance(module, torch.nn.Module) and any(isinstance(m, torch.nn.Linear) for m in module.modules()):
            out.append((name, module))
    return out


class _EncoderCapture:
    """One encoder's recorder. Rows of padding are left out where the encoder masks them and zeroes their output
    (they then never reach the conditioning); elsewhere every row the encoder computes is recorded."""

    def __init__(self, name: str, module: torch.nn.Module, rows: int, calls: int):
        self.name = name
        self.writer, bounded = new_writer(rows)
        self.limiter = RowLimiter(self.writer, None if bounded else rows, None if bounded else _per_call(rows, calls))
        self.recorder = _Recorder(module, self.limiter)
        transformer = getattr(module, "transformer", None)
        drop_padding = bool(getattr(module, "enable_attention_masks", False) and getattr(module, "zero_out_masked",
                                                                                         False))
        self._hooks = []
        if isinstance(transformer, torch.nn.Module):
            def before(_mod, args, kwargs):
                mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
                self.recorder.new_batch(mask if drop_padding and isinstance(mask, torch.Tensor) else None)

            self._hooks.append(transformer.register_forward_pre_hook(before, with_kwargs=True))
            self._hooks.append(transformer.register_forward_hook(lambda *_: self.recorder.new_batch(None)))

    def start(self, fit: bool, held_out: bool) -> None:
        self.limiter.fit = fit
        self.recorder.held_out = held_out
        self.recorder.new_batch(None)

    def close(self) -> None:
        self.recorder.close()
        for h in self._hooks:
            h.remove()
        self._hooks = []


class ScaledFP16CapturePrompts:
    """Calibration statistics of a CLIP's text encoder(s) on the user's prompts."""

    TITLE = "Capture Calibration from Prompts"
    DESCRIPTION = ("Encodes each prompt (one per line) with the CLIP and records the inputs of every Linear layer of "
                   "its encoder(s): calibration statistics for the converting nodes' `calibration` input, so that "
                   "the rounding keeps the error small where your prompts put the activations. One file per "
                   "encoder; returns the file name(s).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("calibration",)
    OUTPUT_TOOLTIPS = ("The calibration file name(s); link to calibration_override of Convert / Save Model / Save "
                       "CLIP as Scaled FP16 (Save CLIP picks each encoder's own file).",)
    FUNCTION = "capture"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",),
                             "prompts": ("STRING", {"multiline": True, "default": "", "tooltip":
                                         "Calibration prompts, one per line (empty lines are skipped): text like "
                                         "the text you will encode with the converted model."}),
                             "calib_samples": _rows_widget("all prompts together"),
                             "output_name": _name_widget("calibration_prompts"),
                             "overwrite": OVERWRITE},
                "optional": {"held_out_prompts": ("STRING", {"multiline": True, "default": "", "tooltip":
                                                  "Optional prompts not used for calibration, one per line: the "
                                                  "conversion report then also gives the error on them."})},
                "hidden": HIDDEN}

    @classmethod
    def IS_CHANGED(cls, output_name="", **_):
        return _signature_of(output_name or "calibration_prompts")

    def capture(self, clip, prompts, calib_samples, output_name, overwrite, held_out_prompts="", unique_id=None):
        if clip is None:
            raise paths.SourceError("no CLIP: the capture needs a text encoder (the CLIP input is empty)")
        texts, held = prompt_lines(prompts), prompt_lines(held_out_prompts)
        if not texts:
            raise paths.SourceError("no prompts: write one calibration prompt per line")
        encoders = clip_encoders(clip)
        if not encoders:
            raise paths.SourceError("this CLIP has no text encoder with Linear layers to calibrate")
        name = (output_name or "").strip() or "calibration_prompts"
        targets = [calibration_target(name if len(encoders) == 1
                                      else f"{name.removesuffix(paths.SAFETENSORS)}_{enc}", overwrite)
                   for enc, _ in encoders]
        captures = [_EncoderCapture(enc, module, calib_samples, len(texts)) for enc, module in encoders]
        bar = comfy.utils.ProgressBar(len(texts) + len(held), node_id=unique_id)
        tokens = {c.name: [0, 0] for c in captures}
        try:
            jobs = [(t, i % 2 == 0, False) for i, t in enumerate(texts)] + [(t, False, True) for t in held]
            for done, (text, fit, held_out) in enumerate(jobs):
                comfy.model_management.throw_exception_if_processing_interrupted()
                for c in captures:
                    c.start(fit, held_out)
                with torch.no_grad():
                    clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
                bar.update_absolute(done + 1, len(jobs))
            comfy.model_management.throw_exception_if_processing_interrupted()
            for c in captures:
                for held_out in (False, True):
                    counts = c.writer.counts(held_out)
                    tokens[c.name][held_out] = max(counts.values()) if counts else 0
            for c, (path, _) in zip(captures, targets):
                if not c.writer.counts():
                    raise paths.SourceError(f"the {c.name} encoder recorded no rows; nothing to calibrate")
                save_writer(c.writer, path, {"model": f"ComfyUI CLIP ({c.name})", "sequences": len(texts),
                                             "eval_sequences": len(held), "tokens": tokens[c.name][0],
                                             "eval_tokens": tokens[c.name][1]})
        finally:
            for c in captures:
                c.close()
        names = [n for _, n in targets]
        log.info("calibration from %d prompts (%d held out) written: %s", len(texts), len(held), ", ".join(names))
        return _result(names)


# --- from sampling -------------------------------------------------------------------------------------------------


def _exact_in_fp16(w: torch.Tensor) -> bool:
    """Whether the converter stores `w` exactly (as fp16 times a power of two): then there is nothing to round and
    no use for its layer's statistics. fp16 and bf16 weights within fp16's range are; fp32 weights rarely are."""
    w = w.detach()
    if w.dtype == torch.float16:
        return True
    if w.dtype not in (torch.bfloat16, torch.float32, torch.float64) or type(w) is not torch.Tensor:
        return False  # other formats (fp8, ComfyUI's quantized tensors) are converted from float32 values
    wf = w.float()
    if not bool(torch.isfinite(wf).all()):
        return False
    amax = float(wf.abs().max()) if wf.numel() else 0.0
    if amax == 0.0:
        return True
    for scale in (1.0, 2.0 ** (math.floor(math.log2(amax)) - 14)):
        if torch.equal((wf / scale).to(torch.float16).float() * scale, wf):
            return True
    return False


def layers_to_record(model) -> tuple[list[tuple[str, torch.nn.Module]], int]:
    """(the diffusion model's Linear layers whose statistics a conversion can use, number of Linear layers): a layer
    the graph patches (a LoRA) is rounded from float32 values and always counts; an unpatched one counts unless its
    weight, as ComfyUI holds it, is exact in fp16."""
    diffusion_model = model.model.diffusion_model
    patched = {k for k, v in getattr(model, "patches", {}).items() if v}
    picked, total = [], 0
    for name, module in diffusion_model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        total += 1
        if f"diffusion_model.{name}.weight" in patched or not _exact_in_fp16(module.weight):
            picked.append((name, module))
    return picked, total


def _container(named: list[tuple[str, torch.nn.Module]]) -> torch.nn.Module:
    """A module tree holding just `named` under their dotted names (the recorder names layers by their path)."""
    root = torch.nn.Module()
    for name, module in named:
        parent = root
        *path, last = name.split(".")
        for part in path:
            child = parent._modules.get(part)
            if child is None:
                child = torch.nn.Module()
                parent.add_module(part, child)
            parent = child
        parent.add_module(last, module)
    return root


class ScaledFP16CaptureSampling:
    """Runs a sampler (as KSampler does) and records the diffusion model's Linear inputs over the denoising run."""

    TITLE = "Sample and Capture Calibration"
    DESCRIPTION = ("Samples like KSampler and records the inputs of the diffusion model's Linear layers at every "
                   "step: calibration statistics of a real denoising run for Save Model / Convert to Scaled FP16. "
                   "Layers whose weights are exact in fp16 and carry no patch (nothing to round) are not recorded. "
                   "Returns the file name and the sampled LATENT.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", "LATENT")
    RETURN_NAMES = ("calibration", "LATENT")
    OUTPUT_TOOLTIPS = ("The calibration file name; link to calibration_override of Save Model / Convert as Scaled "
                       "FP16.", "The sampled latent, as KSampler gives it.")
    FUNCTION = "capture"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        stock = comfy_nodes.KSampler.INPUT_TYPES()["required"]
        return {"required": {**stock,
                             "calib_samples": _rows_widget("the whole run (all steps)"),
                             "output_name": _name_widget("calibration_sampling"),
                             "overwrite": OVERWRITE},
                "hidden": HIDDEN}

    @classmethod
    def IS_CHANGED(cls, output_name="", **_):
        return _signature_of(output_name or "calibration_sampling")

    def capture(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
                calib_samples, output_name, overwrite, unique_id=None):
        path, name = calibration_target((output_name or "").strip() or "calibration_sampling", overwrite)
        comfy.model_management.load_models_gpu([model])  # patches applied: what the sampler will run
        picked, total = layers_to_record(model)
        if not picked:
            raise paths.SourceError(f"none of the model's {total} Linear layers has anything to round (every weight "
                                    "is exact in fp16 and none is patched): a conversion would not use calibration")
        writer, bounded = new_writer(calib_samples)
        limiter = RowLimiter(writer, None if bounded else calib_samples,
                             None if bounded else _per_call(calib_samples, steps))
        recorder = _Recorder(_container(picked), limiter)
        calls = [0]

        def before(*_):
            limiter.fit = calls[0] % 2 == 0  # alternate model calls: the fit half and the check half
            calls[0] += 1
            recorder.new_batch(None)

        diffusion_model = model.model.diffusion_model
        hooks = [diffusion_model.register_forward_pre_hook(before),
                 diffusion_model.register_forward_hook(lambda *_: recorder.new_batch(None))]
        try:
            with torch.no_grad():
                (latent,) = comfy_nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive,
                                                        negative, latent_image, denoise=denoise)
            comfy.model_management.throw_exception_if_processing_interrupted()
            if calls[0] < 2:
                raise paths.SourceError(f"the sampler ran the model {calls[0]} time(s); at least 2 steps are needed "
                                        "to fit and check the calibration")
            counts = writer.counts()
            save_writer(writer, path, {"model": "ComfyUI graph (model)", "sampler": sampler_name,
                                       "scheduler": scheduler, "steps": steps, "model_calls": calls[0],
                                       "tokens": max(counts.values()) if counts else 0,
                                       "layers_recorded": len(picked), "layers_total": total})
        finally:
            recorder.close()
            for h in hooks:
                h.remove()
        log.info("calibration from a %d-step sampling run (%d of %d Linear layers) written: %s", steps, len(picked),
                 total, name)
        return _result([name], (latent,))
