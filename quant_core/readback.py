"""Reading scaled-FP16 files back: weights dequantized (or kept scaled for a loader that scales at run time).

Plain safetensors files read the same way (nothing to dequantize). Each file's header is parsed and validated, then
its tensors are read through one handle of the safetensors library, one tensor at a time.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from .errors import ConversionError
from .format import FOREIGN_MARKERS, MARKER_KEY, SCALE_SUFFIXES, layer_of
from .safetensors_io import open_checked, read_header

SCALE_AT_LOAD, SCALE_AUTO, SCALE_AT_RUN = "load", "auto", "run"
SCALE_MODES = (SCALE_AUTO, SCALE_AT_LOAD, SCALE_AT_RUN)


def _fits(w: torch.Tensor, dtype: torch.dtype) -> bool:
    """Every value of float32 `w` is held exactly by `dtype`."""
    c = w.to(dtype)
    return bool(torch.isfinite(c).all()) and torch.equal(c.float(), w)


def _lossless_dtype(w: torch.Tensor) -> torch.dtype:
    """The smallest of fp16/bf16/fp32 that holds every value of float32 `w` exactly."""
    for dt in (torch.float16, torch.bfloat16):
        if _fits(w, dt):
            return dt
    return torch.float32


def iter_dequantized(path: str, dtype: torch.dtype | None = None, scale_at: str = SCALE_AT_LOAD,
                     kept_scaled: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) of a scaled-FP16 (or plain) safetensors file, one tensor at a time.

    `scale_at` says what happens to a weight whose scale is not 1:
    - "load": it comes out as ``weight.float() * scale_weight`` cast to `dtype`; with ``dtype=None`` it gets the
      smallest dtype that holds the dequantized values exactly (fp16 for in-range values, else bf16 or fp32);
    - "run": it comes out as stored (cast to `dtype` if given), followed by its ``scale_weight``, for a loader that
      applies the scale at run time; its key is appended to `kept_scaled`;
    - "auto": "load" where the product fits the weight's own stored dtype exactly, else "run".
    Other scale and marker tensors are dropped. Other tensors keep their dtype unless `dtype` is given and they are
    floating.
    """
    if scale_at not in SCALE_MODES:
        raise ValueError(f"scale_at must be one of {SCALE_MODES}, got {scale_at!r}")
    header = read_header(path)  # validates the header, names the file in errors
    keyset = set(header.tensors)
    # the loaders hand these tensors to ComfyUI, which copies them into the model: read them through the library's
    # own reader, as ComfyUI's loaders do, so that loading costs what the stock loaders cost; opening it is also
    # the library's validation of the data section
    with open_checked(path) as f:
        for key in header.tensors:
            if key == MARKER_KEY or key in FOREIGN_MARKERS or key.endswith(SCALE_SUFFIXES):
                continue
            t = f.get_tensor(key)
            scale_key = layer_of(key) + ".scale_weight" if key.endswith(".weight") else None
            if scale_key in keyset:
                s = f.get_tensor(scale_key).float().reshape(-1)
                if s.numel() != 1:
                    raise ConversionError(f"{path}: '{scale_key}' must hold one value, has shape {list(s.shape)}")
                scale = float(s[0])
                if not (math.isfinite(scale) and scale > 0.0):  # NaN, inf, 0 or < 0 would load broken weights
                    raise ConversionError(f"{path}: '{scale_key}' is {scale}; a scale must be finite and > 0 "
                                          "(the file is damaged or was not written by a scaled-FP16 converter)")
                if scale != 1.0:
                    w = None
                    keep = scale_at == SCALE_AT_RUN
                    if scale_at == SCALE_AUTO:
                        w = t.float() * scale
                        keep = not _fits(w, t.dtype)
                    if keep:
                        del w
                        if kept_scaled is not None:
                            kept_scaled.append(key)
                        yield key, (t.to(dtype) if dtype is not None else t)
                        yield scale_key, s.clone()  # not a view of the file's memory map
                        continue
                    w = t.float() * scale if w is None else w
                    t = w.to(dtype) if dtype is not None else w.to(_lossless_dtype(w))
                elif dtype is not None:
                    t = t.to(dtype)
            elif dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            yield key, t


def load_dequantized_state_dict(path: str, dtype: torch.dtype | None = None, scale_at: str = SCALE_AT_LOAD,
                                kept_scaled: list[str] | None = None) -> dict[str, torch.Tensor]:
    """A state dict from a scaled-FP16 file (see `iter_dequantized`), built one tensor at a time."""
    return dict(iter_dequantized(path, dtype, scale_at, kept_scaled))
