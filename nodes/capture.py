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

import contextlib
import json
import logging
import math
import os

import comfy.model_management
import comfy.utils
import folder_paths
import nodes as comfy_nodes  # ComfyUI's nodes.py: the KSampler's widget lists and sampling function
import torch

from ..quant_core.calibration import (DEFAULT_BUDGET_BYTES, DEFAULT_ROWS, FORMAT_KEY, CalibrationError,
                                      CalibrationWriter)
from ..quant_core.capture import _Recorder
from ..quant_core.safetensors_io import read_header
from . import paths
from .common import CATEGORY, HIDDEN
from .progress import CaptureProgress

log = logging.getLogger("comfyui-scaled-fp16")

MIN_BUDGET_GB = 0.05


def _rows_widget(what: str) -> tuple:
    return ("INT", {"default": DEFAULT_ROWS, "min": 1, "max": 1 << 24, "tooltip":
                    f"Activation rows (tokens) kept per layer from {what}: the statistics summarise every row of each "
                    "layer's input in at most this many directions; at or above a layer's input width they are "
                    "exact. Fewer are kept where budget_gb cannot hold them (the panel says so)."})


BUDGET = ("FLOAT", {"default": DEFAULT_BUDGET_BYTES / 1e9, "min": MIN_BUDGET_GB, "max": 1024.0, "step": 0.05,
                    "round": 0.01, "tooltip":
                    "GB the calibration statistics may hold while they are recorded (in RAM, or in VRAM where the "
                    "model runs there), and so the most the file takes on disk. Where calib_samples rows per layer "
                    "do not fit, fewer are kept (the panel says so); a budget that cannot hold 8 rows per layer is "
                    "an error that says how much is needed."})


def _name_widget(default: str) -> tuple:
    return ("STRING", {"default": default, "tooltip":
                       f"File name in models/{paths.CALIBRATION_KIND}; .safetensors is added. A CLIP with several "
                       "encoders gives one file per encoder, <output_name>_<encoder>."})


OVERWRITE = ("BOOLEAN", {"default": True, "tooltip":
                         "Replace an existing calibration file of that name (statistics, not a model: on by default so "
                         "that a changed prompt list or seed can be queued again). Off: an existing name is an error."})


def budget_bytes(budget_gb: float) -> int:
    return int(round(float(budget_gb) * 1e9))


def new_writer(rows: int, budget_gb: float) -> CalibrationWriter:
    """A writer keeping `rows` rows per layer within `budget_gb`; its lines about lowered rows end in the summary."""
    return CalibrationWriter(rows=int(rows), budget_bytes=budget_bytes(budget_gb))


def recorded_tokens(writer: CalibrationWriter, name: str) -> dict:
    """Rows recorded so far by the most-fed layer group: calibration (fit + check halves) and held-out."""
    return {"name": name, "tokens": max(writer.counts(False).values(), default=0),
            "held_out": max(writer.counts(True).values(), default=0)}


def capture_summary(path: str, name: str, source: dict) -> dict:
    """What a capture wrote, read back from the file (not from the writer that made it): the panel's summary."""
    meta = json.loads(read_header(path).metadata[FORMAT_KEY])
    groups = meta["groups"]
    stats = meta.get("statistics") or {}
    rows = [r for g in groups.values() for r in g["rows"].values()]
    return {"output_name": name, "bytes": os.path.getsize(path), "layers": len(meta["layers"]),
            "groups": len(groups), "exact_groups": sum(1 for g in groups.values() if all(g["exact"].values())),
            "rows_kept_min": min(rows, default=0), "rows_kept_max": max(rows, default=0),
            "widths_max": max((g["in_features"] for g in groups.values()), default=0),
            "rows": stats.get("rows"), "rows_requested": stats.get("rows_requested"),
            "budget_bytes": stats.get("budget_bytes"), "notes": list(stats.get("notes") or []),
            "tokens_fit": max((g["fit_count"] for g in groups.values()), default=0),
            "tokens_check": max((g["rest_count"] for g in groups.values()), default=0),
            "tokens_held_out": max((g["eval_count"] for g in groups.values()), default=0),
            "source": source}


@contextlib.contextmanager
def capture_errors(progress: CaptureProgress | None):
    """Report a failure or cancel to the panel, then re-raise it; a budget the statistics cannot fit becomes a
    one-line `SettingError` (no traceback in the log)."""
    try:
        yield
    except CalibrationError as e:
        if progress is not None:
            progress.failed(e)
        raise paths.SettingError(str(e)) from None
    except BaseException as e:
        if progress is not None:
            progress.failed(e)
        raise


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


def _result(names: list[str], summaries: list[dict], extra: tuple = ()) -> dict:
    """The node's output: the file name(s), and their summaries for the pack's panel (kept across reloads)."""
    paths.refresh_file_list(paths.CALIBRATION_KIND)
    return {"ui": {"text": [", ".join(names)], "fp16lr_report": summaries}, "result": (", ".join(names), *extra)}


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

    def __init__(self, name: str, module: torch.nn.Module, rows: int, budget_gb: float, held_out: bool):
        self.name = name
        self.writer = new_writer(rows, budget_gb)
        self.fit = False
        self.recorder = _Recorder(module, self.writer, parts=3 if held_out else 2)
        transformer = getattr(module, "transformer", None)
        drop_padding = bool(getattr(module, "enable_attention_masks", False) and getattr(module, "zero_out_masked",
                                                                                         False))
        self._hooks = []
        if isinstance(transformer, torch.nn.Module):
            def before(_mod, args, kwargs):
                mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
                self.recorder.new_batch(mask if drop_padding and isinstance(mask, torch.Tensor) else None, self.fit)

            self._hooks.append(transformer.register_forward_pre_hook(before, with_kwargs=True))
            self._hooks.append(transformer.register_forward_hook(lambda *_: self.recorder.new_batch(None, self.fit)))

    def start(self, fit: bool, held_out: bool) -> None:
        """Before a prompt: whether its rows go to the fit half, or to the held-out statistics."""
        self.fit = fit
        self.recorder.held_out = held_out
        self.recorder.new_batch(None, fit)

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
                                                  "conversion report then also gives the error on them."}),
                             "budget_gb": BUDGET},
                "hidden": HIDDEN}

    @classmethod
    def IS_CHANGED(cls, output_name="", **_):
        return _signature_of(output_name or "calibration_prompts")

    def capture(self, clip, prompts, calib_samples, output_name, overwrite, held_out_prompts="",
                budget_gb=DEFAULT_BUDGET_BYTES / 1e9, unique_id=None):
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
        jobs = [(t, i % 2 == 0, False) for i, t in enumerate(texts)] + [(t, False, True) for t in held]
        progress: CaptureProgress | None = None
        captures: list[_EncoderCapture] = []
        summaries = []
        try:
            with capture_errors(None):
                for enc, module in encoders:
                    captures.append(_EncoderCapture(enc, module, calib_samples, budget_gb, bool(held)))
            progress = CaptureProgress(unique_id, "prompt", len(jobs), sum(len(c.writer.layers) for c in captures),
                                       ", ".join(c.name for c in captures))
            with capture_errors(progress):
                bar = comfy.utils.ProgressBar(len(jobs), node_id=unique_id)
                for done, (text, fit, held_out) in enumerate(jobs):
                    progress.cancel()
                    for c in captures:
                        c.start(fit, held_out)
                    with torch.no_grad():
                        clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
                    bar.update_absolute(done + 1, len(jobs))
                    progress.step(done + 1, [recorded_tokens(c.writer, c.name) for c in captures], held_out)
                progress.cancel()
                tokens = {c.name: recorded_tokens(c.writer, c.name) for c in captures}
                for c in captures:
                    if not c.writer.counts():
                        raise paths.SourceError(f"the {c.name} encoder recorded no rows; nothing to calibrate")
                written = []
                try:
                    for c, (path, _) in zip(captures, targets):
                        save_writer(c.writer, path, {"model": f"ComfyUI CLIP ({c.name})", "sequences": len(texts),
                                                     "eval_sequences": len(held), "tokens": tokens[c.name]["tokens"],
                                                     "eval_tokens": tokens[c.name]["held_out"]})
                        written.append(path)
                except BaseException:
                    for path in written:  # all encoders' files or none
                        os.unlink(path)
                    raise
                for c, (path, saved) in zip(captures, targets):
                    summaries.append(progress.finished(capture_summary(path, saved, {
                        "encoder": c.name, "prompts": len(texts), "held_out_prompts": len(held)})))
        finally:
            for c in captures:
                c.close()
        names = [n for _, n in targets]
        log.info("calibration from %d prompts (%d held out) written: %s", len(texts), len(held), ", ".join(names))
        return _result(names, summaries)


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


@contextlib.contextmanager
def sampler_steps(on_step):
    """While sampling, ComfyUI's progress hook also calls `on_step(value, total)`: the sampler makes its step bar
    inside `common_ksampler`, and a bar takes the hook in effect when it is made. The hook is put back afterwards
    (a server without the hook: no step events, the capture itself is unchanged)."""
    set_hook = getattr(comfy.utils, "set_progress_bar_global_hook", None)
    if set_hook is None:
        yield
        return
    original = getattr(comfy.utils, "PROGRESS_BAR_HOOK", None)

    def hook(value, total, *args, **kwargs):
        if original is not None:
            original(value, total, *args, **kwargs)
        on_step(value, total)

    set_hook(hook)
    try:
        yield
    finally:
        set_hook(original)


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
                "optional": {"budget_gb": BUDGET},
                "hidden": HIDDEN}

    @classmethod
    def IS_CHANGED(cls, output_name="", **_):
        return _signature_of(output_name or "calibration_sampling")

    def capture(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
                calib_samples, output_name, overwrite, budget_gb=DEFAULT_BUDGET_BYTES / 1e9, unique_id=None):
        path, name = calibration_target((output_name or "").strip() or "calibration_sampling", overwrite)
        comfy.model_management.load_models_gpu([model])  # patches applied: what the sampler will run
        picked, total = layers_to_record(model)
        if not picked:
            raise paths.SourceError(f"none of the model's {total} Linear layers has anything to round (every weight "
                                    "is exact in fp16 and none is patched): a conversion would not use calibration")
        writer = new_writer(calib_samples, budget_gb)
        with capture_errors(None):
            # at most 4 model calls per step (conditional and unconditional apart, two evaluations per step for
            # second-order samplers): an input that sees one row per call (the modulation's) gets no more
            # directions than that, and the budget goes to the token inputs
            recorder = _Recorder(_container(picked), writer, calls=4 * steps)
        progress = CaptureProgress(unique_id, "step", steps, len(picked), "model")
        calls = [0]

        def before(*_):
            recorder.new_batch(None, calls[0] % 2 == 0)  # alternate model calls: the fit half and the check half
            calls[0] += 1

        def on_step(value, of):
            progress.total = of
            progress.step(value, [recorded_tokens(writer, "model")])

        diffusion_model = model.model.diffusion_model
        hooks = [diffusion_model.register_forward_pre_hook(before),
                 diffusion_model.register_forward_hook(lambda *_: recorder.new_batch(None))]
        try:
            with capture_errors(progress), sampler_steps(on_step), torch.no_grad():
                (latent,) = comfy_nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive,
                                                        negative, latent_image, denoise=denoise)
                progress.cancel()
                if calls[0] < 2:
                    raise paths.SourceError(f"the sampler ran the model {calls[0]} time(s); at least 2 steps are "
                                            "needed to fit and check the calibration")
                counts = writer.counts()
                source = {"model": "ComfyUI graph (model)", "sampler": sampler_name, "scheduler": scheduler,
                          "steps": steps, "model_calls": calls[0], "tokens": max(counts.values()) if counts else 0,
                          "layers_recorded": len(picked), "layers_total": total}
                save_writer(writer, path, source)
                summary = progress.finished(capture_summary(path, name, {
                    "steps": steps, "sampler": sampler_name, "scheduler": scheduler, "model_calls": calls[0],
                    "layers_total": total}))
        finally:
            recorder.close()
            for h in hooks:
                h.remove()
        log.info("calibration from a %d-step sampling run (%d of %d Linear layers) written: %s", steps, len(picked),
                 total, name)
        return _result([name], [summary], (latent,))
