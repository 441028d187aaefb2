"""What every converting node shares: categories, the setting widgets (built from `quant_core.options`), the widget
values as `ConvertOptions`, and one conversion run with the node's progress, cancel and result.

The node modules (convert, save, loaders) take shared pieces from here and from the helper modules (paths, records,
progress, loading, graph_weights), never from each other.
"""

from __future__ import annotations

import comfy.model_management

from ..quant_core import Cancelled, ConversionError, ConvertOptions, convert, convert_file
from ..quant_core.options import option_field
from . import paths
from .progress import ConversionProgress

CATEGORY = "model/scaled fp16"  # converting nodes
LOADER_CATEGORY = "loaders/scaled fp16"
HIDDEN = {"unique_id": "UNIQUE_ID"}

# Saved workflows store widget values by position: never reorder these, append new optional widgets at the end.
# `output_name` is the node's own (where the file goes); the others are `ConvertOptions` fields.
REQUIRED_WIDGETS = ("num_iter", "top_k", "calib_samples", "t5xxl", "keep_distillation", "output_name", "overwrite")
# The former `scaled_fp8_marker` widget stood after `calibration`; never reuse its name (ComfyUI 0.8.0 and later cast
# files carrying that marker to fp8). ComfyUI drops a value for it, from a saved workflow or an API prompt, before
# the node runs; no node writes the marker.
OPTIONAL_WIDGETS = ("calibration",)
OPTION_WIDGETS = tuple(n for n in REQUIRED_WIDGETS + OPTIONAL_WIDGETS if n != "output_name")

_WIDGET_TYPES = {"int": "INT", "bool": "BOOLEAN"}
_OUTPUT_NAME_TIP = ("File name in the models folder of the same kind under ComfyUI's output directory; .safetensors "
                    "is added. Empty: the reference naming "
                    "(<name>_float16_scaled_learned[_nodistill]_svd.safetensors).")


def option_widget(name: str) -> tuple:
    """The widget of the `ConvertOptions` field `name`: its type, default, range, and its help as the tooltip."""
    field = option_field(name)
    if name == "calibration":  # a file choice: the files of the pack's calibration folder
        return (paths.calibration_files(), {
            "default": paths.NO_CALIBRATION, "tooltip": f"{field.help} Listed from models/{paths.CALIBRATION_KIND}; "
                                                        "bias_correction is off in the nodes."})
    spec = {"default": field.default, "tooltip": field.help}
    spec.update({k: v for k, v in (("min", field.min), ("max", field.max)) if v is not None})
    return (_WIDGET_TYPES[field.type], spec)


def conversion_widgets(default_name: str = "") -> dict:
    """The required widgets of every converting node, in saved-workflow order."""
    return {name: ("STRING", {"default": default_name, "tooltip": _OUTPUT_NAME_TIP}) if name == "output_name"
            else option_widget(name) for name in REQUIRED_WIDGETS}


def optional_widgets() -> dict:
    # `calibration_override`: a socket (no widget, so no saved value) for a capture node's calibration name
    return {**{name: option_widget(name) for name in OPTIONAL_WIDGETS},
            "calibration_override": ("STRING", {"forceInput": True, "tooltip":
                                     "A calibration file name linked from a capture node; wins over the "
                                     "calibration dropdown."})}


def conversion_options(widgets: dict, part: str | None = None, **overrides) -> ConvertOptions:
    """A converting node's widget values (by name; `output_name` and other inputs are not settings) as converter
    settings, computed on ComfyUI's device (the CPU under --cpu). `overrides` replace single settings."""
    settings = {name: widgets[name] for name in OPTION_WIDGETS if name not in OPTIONAL_WIDGETS}
    settings["calibration"] = paths.calibration_path(
        paths.linked_calibration(widgets.get("calibration"), widgets.get("calibration_override"), part))
    device = comfy.model_management.get_torch_device()
    return ConvertOptions(**{**settings, **overrides}, device=str(device) if device.type in ("cpu", "cuda") else "cpu")


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


def node_result(saved_names: list[str], summaries: list[dict]) -> dict:
    """The node's output (the saved names, comma-separated) and its reports for the browser panel."""
    return {"ui": {"fp16lr_report": summaries}, "result": (", ".join(saved_names),)}


class ConvertingNode:
    """Base of the nodes that write a scaled-FP16 file: the declaration they share. A subclass sets TITLE,
    DESCRIPTION and FUNCTION and builds its INPUT_TYPES with `inputs`."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("saved_name",)
    OUTPUT_NODE = True

    @classmethod
    def inputs(cls, source: dict, default_name: str = "") -> dict:
        """INPUT_TYPES: the `source` input (what is converted) first, then the shared widgets."""
        return {"required": {**source, **conversion_widgets(default_name)}, "optional": optional_widgets(),
                "hidden": HIDDEN}
