"""The converter node: a model file from diffusion_models, checkpoints or text_encoders to a scaled-FP16 file."""

from __future__ import annotations

import os

from ..quant_core.format import default_output_path
from . import paths, records
from .common import ConvertingNode, conversion_options, node_result, run_conversion
from .progress import ConversionProgress


class ScaledFP16Convert(ConvertingNode):
    """Convert a model file from diffusion_models, checkpoints or text_encoders to scaled FP16."""

    TITLE = "Convert to Scaled FP16"
    DESCRIPTION = ("Converts a safetensors model to scaled FP16 (fp16 weights + power-of-two scale_weight) with "
                   "learned rounding, and saves it in the models folder of the same kind under ComfyUI's output "
                   "directory. Returns the saved name; link it to a Scaled FP16 loader to load the result in the "
                   "same run.")
    OUTPUT_TOOLTIPS = ("The converted file's name as the loaders of its kind list it.",)
    FUNCTION = "convert"

    @classmethod
    def INPUT_TYPES(cls):
        return cls.inputs({"model": (paths.convertible_models(), {"tooltip":
                           "Source .safetensors file, shown with its folder kind; the result goes to that kind's "
                           "folder under ComfyUI's output directory. While the source file and the settings stay the "
                           "same, the converted file is reused, not redone."})})

    @classmethod
    def IS_CHANGED(cls, model, output_name="", keep_distillation=False, calibration=paths.NO_CALIBRATION,
                   calibration_override=None, **_):
        """The source's and the output's size and mtime: stable while neither changes (a re-run then reuses the
        up-to-date file at once); a new source or a deleted output runs the node again. Never raises: a bad
        choice is reported by the node itself, once."""
        try:
            kind, name = paths.split_model_choice(model)
            target = paths.checked_output_name(output_name.strip() or default_output_path(name, keep_distillation))
            saved = os.path.join(paths.output_folder(kind), *target.split("/"))
            signature = paths.file_signature(paths.full_path(kind, name))
            calib = paths.calibration_path(paths.linked_calibration(calibration, calibration_override))
        except Exception as e:  # noqa: BLE001
            return f"unusable: {e}"
        out = paths.file_signature(saved) if os.path.exists(saved) else "absent"
        return "|".join([signature, out] + ([paths.file_signature(calib)] if calib else []))

    def convert(self, model, output_name, unique_id=None, **widgets):
        progress = ConversionProgress(unique_id)
        try:
            kind, name = paths.split_model_choice(model)
            src = paths.full_path(kind, name)
            options = conversion_options(widgets)
            target = output_name.strip() or default_output_path(name, options.keep_distillation)
            dst, saved_name = paths.output_path(kind, target, overwrite=True)  # name checks; shadowing refused
            if os.path.exists(dst):
                stored, why = records.up_to_date(dst, src, options.settings(), options.calibration)
                if stored is not None:
                    return node_result([saved_name], [progress.reused(stored, saved_name)])
                if not options.overwrite:
                    paths.output_path(kind, target, overwrite=False, why=why)  # raises, saying why
        except Exception as e:
            progress.failed(e)
            raise
        report = run_conversion(src, dst, options, progress)
        summary = progress.finished(report, saved_name)
        records.write_record(dst, src, report.get("settings") or options.settings(), options.calibration, summary)
        paths.refresh_file_list(kind)
        return node_result([saved_name], [summary])
