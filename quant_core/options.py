"""Conversion settings: one definition of every option's default, range and help.

The command line (cli.py) and the ComfyUI node widgets are both built from the field metadata of `ConvertOptions`
through `option_fields()`, so a default, a range or a help text is written once, here.

Metadata keys of each field: ``help`` (interface-neutral text, used as CLI help and node tooltip), ``min``/``max``
(integers), ``choices`` (a tuple of accepted strings), ``cli`` (a ``--<name>`` flag), ``widget`` (a node widget).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass, field

from .errors import ConversionError
from .scaling import POLICIES

# The learned rounding's limits (rounding reads them from here): num_iter beyond them changes nothing.
MAX_PASSES = 4       # refinement passes of the default mode; beyond it the objective is at its granularity floor
REFINE_SWEEPS = 2    # coordinate-descent sweeps after GPTQ in the calibrated mode (num_iter - 1 caps this)


def _opt(default, help: str, *, cli: bool = False, widget: bool = False, min: int | None = None,
         max: int | None = None, choices: tuple | None = None):
    meta = {"help": help, "cli": cli, "widget": widget}
    if min is not None:
        meta["min"] = min
    if max is not None:
        meta["max"] = max
    if choices is not None:
        meta["choices"] = choices
    return field(default=default, metadata=meta)


@dataclass
class ConvertOptions:
    """Conversion settings. The first five mirror the reference script's flags and defaults."""

    t5xxl: bool = _opt(False, (
        "T5XXL text-encoder mode: drop decoder/lm_head, keep norms, biases and embeddings unquantized, add "
        "scale_input; marker of shape [0]. For T5 text encoders only."), cli=True, widget=True)
    keep_distillation: bool = _opt(False, (
        "FLUX: keep distilled_guidance_layer, final_layer, img_in, txt_in in their source dtype (scale_weight 1), "
        "and add _nodistill to the default output name. Changes nothing else in files without these layers."),
        cli=True, widget=True)
    num_iter: int = _opt(256, (
        "Refinement budget of the learned rounding per weight (the reference script's iteration count); 0: plain "
        f"round-to-nearest, the fastest. The search uses at most {MAX_PASSES} passes (with a calibration file: "
        f"1 + {REFINE_SWEEPS} sweeps) and stops earlier when a pass changes nothing, so any value from {MAX_PASSES} "
        "on gives the same file; the report shows the passes used (passes_used). BF16 weights are exact in fp16: "
        "nothing to learn, any value gives the same file."), cli=True, widget=True, min=0, max=100000)
    top_k: int = _opt(1, (
        "How many principal directions of each weight the rounding keeps the error out of (1 = the strongest). "
        "Changes the file only where num_iter > 0 and a weight is not exact in fp16; values above a weight's "
        "smaller dimension act as that dimension."), cli=True, widget=True, min=1, max=1024)
    calib_samples: int = _opt(3072, (
        "Synthetic random rows for the out(randn) figure of the report (the output error on random inputs, beside "
        "round-to-nearest's), measured for every weight the learned rounding changed. Report only: the file is the "
        "same for every value. 0: no figure."), cli=True, widget=True, min=0, max=1 << 20)
    scale: str = _opt("auto", (
        "auto: scale 1 unless a tensor would overflow fp16 or lose precision to subnormals; pow2: always scale "
        "(BF16 input exactly lossless)."), cli=True, choices=POLICIES)
    calibration: str | None = _opt(None, (
        "Calibration statistics file recorded by `python -m quant_core capture`; enables activation-aware rounding "
        f"(then num_iter above {1 + REFINE_SWEEPS} changes nothing). Biases stay as they are unless bias_correction "
        "is on."), cli=True, widget=True)
    bias_correction: bool = _opt(False, (
        "With a calibration file: also correct each calibrated layer's bias by -(Q - W) E[x] (off by default: it "
        "did not help on held-out text)."), cli=True)
    device: str = _opt("auto", "Compute device: auto, cpu, cuda or cuda:N (auto: cuda when available).", cli=True)
    overwrite: bool = _opt(False, (
        "Replace an existing output file of that name. The converter node reuses a file made from the same source "
        "file (same size and date) with the same settings either way, as up to date."), cli=True, widget=True)

    def settings(self) -> dict:
        """What determines the output bytes (recorded in the file's metadata); the device does not."""
        s = asdict(self)
        s.pop("device")
        s.pop("overwrite")
        s["calibration"] = os.path.basename(self.calibration) if self.calibration else None
        return s

    def validate(self) -> None:
        if self.scale not in POLICIES:
            raise ConversionError(f"unknown scale policy '{self.scale}'; expected one of {', '.join(POLICIES)}")
        for name in ("num_iter", "top_k", "calib_samples"):
            if getattr(self, name) < 0:
                raise ConversionError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class OptionField:
    """One setting of `ConvertOptions` as interfaces see it. `type` is "int", "bool" or "str"."""

    name: str
    type: str
    default: object
    help: str
    min: int | None = None
    max: int | None = None
    choices: tuple | None = None
    cli: bool = True
    widget: bool = False


_TYPES = {"bool": "bool", "int": "int", "str": "str", "str | None": "str"}


def option_fields() -> list[OptionField]:
    """Every setting of `ConvertOptions`, in its field order."""
    return [OptionField(name=f.name, type=_TYPES[f.type if isinstance(f.type, str) else f.type.__name__],
                        default=f.default, help=f.metadata["help"], min=f.metadata.get("min"),
                        max=f.metadata.get("max"), choices=f.metadata.get("choices"), cli=f.metadata.get("cli", True),
                        widget=f.metadata.get("widget", False))
            for f in dataclasses.fields(ConvertOptions)]


def option_field(name: str) -> OptionField:
    """The setting called `name` (KeyError if there is none)."""
    for f in option_fields():
        if f.name == name:
            return f
    raise KeyError(name)


__all__ = ["ConvertOptions", "MAX_PASSES", "OptionField", "REFINE_SWEEPS", "option_field", "option_fields"]
