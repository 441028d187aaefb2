"""The converter node, and the conversion widgets it shares with the save nodes."""

from __future__ import annotations

import os

import comfy.model_management

from ..quant_core import Cancelled, ConversionError, ConvertOptions, convert, convert_file
from ..quant_core.format import FP8_MARKER_REMOVED, default_output_path
from . import paths
from .progress import ConversionProgress

CATEGORY = "model/scaled fp16"  # converting nodes; loaders are under loaders/scaled fp16
LOADER_CATEGORY = "loaders/scaled fp16"


def _passes() -> tuple[int, int]:
    """(passes of the default mode, refinement sweeps of the calibrated mode): where num_iter stops mattering."""
    from ..quant_core import rounding  # noqa: PLC0415
    return int(getattr(rounding, "MAX_PASSES", 4)), int(getattr(rounding, "REFINE_SWEEPS", 2))


def conversion_widgets(default_name: str = "") -> dict:
    """Widgets of every converting node, in their saved-workflow order (never reorder: workflows store values
    by position). Defaults are the reference script's. Each tooltip says what the widget changes and from where on
    it changes nothing."""
    passes, sweeps = _passes()
    return {
        "num_iter": ("INT", {"default": 256, "min": 0, "max": 100000, "tooltip":
                     "Passes of the learned rounding per weight (the reference script's iteration count). 0: plain "
                     f"round-to-nearest, the fastest. The search uses at most {passes} passes "
                     f"(with a calibration file: 1 + {sweeps} sweeps), and stops earlier when a pass changes nothing, "
                     f"so every value from {passes} up gives the same file; the report shows the passes used. "
                     "BF16 weights are exact in fp16: nothing to learn, any value gives the same file."}),
        "top_k": ("INT", {"default": 1, "min": 1, "max": 1024, "tooltip":
                  "How many principal directions of each weight the rounding keeps the error out of (1 = the "
                  "strongest). Changes the file only where num_iter > 0 and a weight is not exact in fp16; values "
                  "above a weight's smaller dimension act as that dimension."}),
        "calib_samples": ("INT", {"default": 3072, "min": 0, "max": 1 << 20, "tooltip":
                          "Synthetic random rows for the out(randn) figure of the report (the output error on random "
                          "inputs, beside round-to-nearest's), measured for every weight the learned rounding "
                          "changed. Report only: the file is the same for every value. 0: no figure."}),
        "t5xxl": ("BOOLEAN", {"default": False, "tooltip":
                  "T5XXL text-encoder mode: drop decoder/lm_head, keep norms, biases and embeddings unquantized, "
                  "add scale_input; marker of shape [0]. For T5 text encoders only."}),
        "keep_distillation": ("BOOLEAN", {"default": False, "tooltip":
                              "FLUX: keep distilled_guidance_layer, final_layer, img_in, txt_in in their source "
                              "dtype (scale_weight 1), and add _nodistill to the default name. Changes nothing else "
                              "in files without these layers."}),
        "output_name": ("STRING", {"default": default_name, "tooltip":
                        "File name in the models folder of the same kind under ComfyUI's output directory; "
                        ".safetensors is added. Empty: the reference naming "
                        "(<name>_float16_scaled_learned[_nodistill]_svd.safetensors)."}),
        "overwrite": ("BOOLEAN", {"default": False, "tooltip":
                      "Replace an existing file of that name. Converter: a file made from the same source file "
                      "(same size and date) with the same settings is up to date and is reused either way; "
                      "overwrite matters only when the existing file was made from something else. Delete the "
                      "file to convert again."}),
    }


def optional_widgets() -> dict:
    """Optional widgets come after the required ones in saved workflows; new ones are appended here, never inserted.
    The former `scaled_fp8_marker` widget (last here) is gone, ComfyUI 0.8.0 and later cast such files to fp8: never
    reuse its name; workflows that still store a value for it load with the value ignored."""
    _, sweeps = _passes()
    return {"calibration": (paths.calibration_files(), {"default": paths.NO_CALIBRATION, "tooltip":
                            "Calibration statistics from `python -m quant_core capture` (models/"
                            f"{paths.CALIBRATION_KIND}); enables activation-aware rounding (biases stay as they "
                            f"are; then num_iter above {1 + sweeps} changes nothing)."})}

HIDDEN = {"unique_id": "UNIQUE_ID"}


def conversion_options(num_iter: int, top_k: int, calib_samples: int, t5xxl: bool, keep_distillation: bool,
                       overwrite: bool, calibration: str | None = None,
                       scaled_fp8_marker: bool = False) -> ConvertOptions:
    """The node widgets as converter settings, computed on ComfyUI's device (the CPU under --cpu)."""
    device = comfy.model_management.get_torch_device()
    if scaled_fp8_marker:
        raise paths.ConversionFailed(FP8_MARKER_REMOVED)
    return ConvertOptions(t5xxl=t5xxl, keep_distillation=keep_distillation, num_iter=num_iter, top_k=top_k,
                          calib_samples=calib_samples, calibration=paths.calibration_path(calibration),
                          device=str(device) if device.type in ("cpu", "cuda") else "cpu", overwrite=overwrite)


def run_conversion(src, dst: str, options: ConvertOptions, progress: ConversionProgress) -> dict:
    """`convert_file` (src: a path) or `convert` (src: a tensor source such as the graph's weights) with the
    node's progress and cancel; failures are reported to the UI, then re-raised (bad input as a one-line
    `ConversionFailed`, which the server log shows without a traceback)."""
    try:
        if isinstance(src, str):
            return convert_file(src, dst, options, on_event=progress.on_event, cancel=progress.cancel)
        return convert(src, dst, options, on_event=progress.on_event, cancel=progress.cancel)
    except ConversionError as e:
        progress.failed(e)
        if isinstance(e, Cancelled):
            raise
        raise paths.ConversionFailed(str(e)) from None
    except BaseException as e:
        progress.failed(e)
        raise
    finally:
        comfy.model_management.soft_empty_cache()


def node_result(saved_name: str, summary: dict) -> dict:
    return {"ui": {"fp16lr_report": [summary]}, "result": (saved_name,)}


class ScaledFP16Convert:
    """Convert a model file from diffusion_models, checkpoints or text_encoders to scaled FP16."""

    TITLE = "Convert to Scaled FP16"
    DESCRIPTION = ("Converts a safetensors model to scaled FP16 (fp16 weights + power-of-two scale_weight) with learned "
                   "rounding, and saves it in the models folder of the same kind under ComfyUI's output directory. "
                   "Returns the saved name; link it to a Scaled FP16 loader to load the result in the same run.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("saved_name",)
    OUTPUT_TOOLTIPS = ("The converted file's name as the loaders of its kind list it.",)
    FUNCTION = "convert"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": (paths.convertible_models(), {"tooltip":
                                       "Source .safetensors file, shown with its folder kind; the result goes to "
                                       "that kind's folder under ComfyUI's output directory. While the source file "
                                       "and the settings stay the same, the converted file is reused, not redone."}),
                             **conversion_widgets()},
                "optional": optional_widgets(),
                "hidden": HIDDEN}

    @classmethod
    def IS_CHANGED(cls, model, output_name="", keep_distillation=False, calibration=paths.NO_CALIBRATION, **_):
        """The source's and the output's size and mtime: stable while neither changes (a re-run then reuses the
        up-to-date file at once); a new source or a deleted output runs the node again. Never raises: a bad
        choice is reported by the node itself, once."""
        try:
            kind, name = paths.split_model_choice(model)
            target = paths.checked_output_name(output_name.strip() or default_output_path(name, keep_distillation))
            saved = os.path.join(paths.output_folder(kind), *target.split("/"))
            signature = paths.file_signature(paths.full_path(kind, name))
            calib = paths.calibration_path(calibration)
        except Exception as e:  # noqa: BLE001
            return f"unusable: {e}"
        out = paths.file_signature(saved) if os.path.exists(saved) else "absent"
        return "|".join([signature, out] + ([paths.file_signature(calib)] if calib else []))

    def convert(self, model, num_iter, top_k, calib_samples, t5xxl, keep_distillation, output_name, overwrite,
                calibration=paths.NO_CALIBRATION, scaled_fp8_marker=False, unique_id=None):
        progress = ConversionProgress(unique_id)
        try:
            kind, name = paths.split_model_choice(model)
            src = paths.full_path(kind, name)
            options = conversion_options(num_iter, top_k, calib_samples, t5xxl, keep_distillation, overwrite,
                                         calibration, scaled_fp8_marker)
            target = output_name.strip() or default_output_path(name, keep_distillation)
            dst, saved_name = paths.output_path(kind, target, overwrite=True)  # name checks; shadowing refused
            if os.path.exists(dst):
                stored, why = paths.up_to_date(dst, src, options.settings(), options.calibration)
                if stored is not None:
                    return node_result(saved_name, progress.reused(stored, saved_name))
                if not overwrite:
                    paths.output_path(kind, target, overwrite=False, why=why)  # raises, saying why
        except Exception as e:
            progress.failed(e)
            raise
        report = run_conversion(src, dst, options, progress)
        summary = progress.finished(report, saved_name)
        paths.write_record(dst, src, report.get("settings") or options.settings(), options.calibration, summary)
        paths.refresh_file_list(kind)
        return node_result(saved_name, summary)
