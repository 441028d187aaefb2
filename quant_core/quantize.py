"""One weight -> fp16 + power-of-two scale + measurements (+ a bias delta with calibration).

The steps, in order: the weight's range (refusing NaN/inf), the scale (scaling.py) with round-to-nearest built and
measured in the same pass (metrics.py), the learned rounding where it has work to do (rounding/), the figures of
what is stored, and the bias correction. `quantize` is all the converter calls per weight.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from .errors import ConversionError
from . import metrics
from .metrics import Measurement, fp16_limit, in_safe_range, measure, out_randn_flop, synthetic_output_error
from .options import ConvertOptions
from .scaling import candidate_scale, worth_scaling

if TYPE_CHECKING:
    from .calibration import LayerCalibration

# a quantized tensor whose stored values are this far from the weights (relative Frobenius error) is named as lossy
# in the report and by the command line: fp16 rounding itself costs ~3e-4; this much means values were flushed to
# zero or saturated (one power-of-two scale cannot cover the tensor's range)
LOSSY_REL_ERROR = 1e-2
# ... or when this share of its values is stored as 0 although the weight is not (a real model's tiniest values
# flush at a rate of ~1e-5 at most)
LOSSY_FLUSHED = 1e-2


@dataclass
class Quantized:
    """The result for one weight. `q`: fp16 on the compute device (or a view of the caller's `out` buffer), the
    weight's shape; `scale`: its power of two; `figures`: the event/report fields (docs/ARCHITECTURE.md, "Report
    schema"); `bias_delta`: float32 [out_features] to add to the layer's bias, or None."""

    q: torch.Tensor
    scale: float
    figures: dict
    bias_delta: torch.Tensor | None = None

    def scale_tensor(self) -> torch.Tensor:
        """`scale` as the stored ``scale_weight`` tensor (float32, shape [1])."""
        return torch.tensor([self.scale], dtype=torch.float32)


def quantize(key: str, w: torch.Tensor, options: ConvertOptions, device: torch.device,
             calibration: "LayerCalibration | None" = None, cancel: Callable[[], object] | None = None,
             path: str = "", out: torch.Tensor | None = None) -> Quantized:
    """Scale, round and measure weight `w` (any float dtype, [out_features, ...]) named `key` of source `path`.
    `out` (CPU, optional): a reusable buffer of at least 2 * numel bytes for the round-to-nearest result, which is
    returned as a view of it when the rounding keeps it."""
    t0 = time.perf_counter()
    w = w.to(device, non_blocking=True)
    max_abs = _max_abs(w, key, path)
    scale, q_rtn, m = _scale_and_rtn(w, max_abs, options.scale, out)
    q, info = _round(key, w, max_abs, scale, q_rtn, m, options, calibration, cancel, path)
    figures = m.as_dict()
    if q is not q_rtn:  # the stored tensor is not RTN's: measured as stored (RTN's figures beside it)
        _, m = measure(w, scale, q, max_abs=max_abs)
        figures = m.as_dict()
        if options.calib_samples > 0 and calibration is None:  # calibrated layers report real output errors
            figures.update(_out_randn(w, q, q_rtn, scale, options.calib_samples, device))
    figures["max_abs"] = max_abs
    if m.nonfinite:  # cannot happen with the clamped scales; a guard against writing a broken file
        raise ConversionError(f"{path}: tensor '{key}' produced {m.nonfinite} non-finite fp16 values")
    if m.rel_error > LOSSY_REL_ERROR or m.flushed_to_zero > LOSSY_FLUSHED * m.numel:
        figures["lossy"] = _lossy_reason(m, max_abs)
    delta = None
    if calibration is not None and options.bias_correction and calibration.has_bias:
        from .calibration import bias_correction_figures
        deq = q.float() * scale if scale != 1.0 else q.float()
        delta, bias_figures = bias_correction_figures(deq, w.float(), calibration, q_rtn.float() * scale)
        info = {**info, **bias_figures}
    figures.update(info)
    figures["seconds"] = time.perf_counter() - t0
    return Quantized(q, scale, figures, delta)


def _max_abs(w: torch.Tensor, key: str, path: str) -> float:
    """max |w| (0 for an empty tensor); NaN or infinite values are refused."""
    if w.numel():
        lo, hi = torch.aminmax(w)
        max_abs = max(-float(lo), float(hi))
    else:
        max_abs = 0.0
    if not math.isfinite(max_abs):
        raise ConversionError(f"{path}: tensor '{key}' contains NaN or infinite values; refusing to convert it")
    return max_abs


def _scale_and_rtn(w: torch.Tensor, max_abs: float, policy: str, out: torch.Tensor | None
                   ) -> tuple[float, torch.Tensor, Measurement]:
    """The scale, and round-to-nearest at that scale with its measurement (built in the same pass). The auto
    policy's alternative scale is rounded and measured only where it cuts the error at scale 1 materially."""
    scale, alt = candidate_scale(max_abs, policy)
    q_rtn, m = measure(w, scale, out=out, max_abs=max_abs)
    if alt is not None and worth_scaling(w, alt, math.ldexp(m.rtn_err_sq, m.sq_exp), math.ldexp(m.w_sq, m.sq_exp),
                                         m.tiny_err_sq):
        scale = alt
        q_rtn, m = measure(w, scale, out=out, max_abs=max_abs)
    return scale, q_rtn, m


def _round(key: str, w: torch.Tensor, max_abs: float, scale: float, q_rtn: torch.Tensor, rtn: Measurement,
           options: ConvertOptions, calibration: "LayerCalibration | None", cancel: Callable[[], object] | None,
           path: str) -> tuple[torch.Tensor, dict]:
    """The stored tensor and the rounding's report fields: `q_rtn` itself wherever the learned rounding has
    nothing to do or changes nothing."""
    if not in_safe_range(max_abs):
        return q_rtn, {"method": "rtn"}  # magnitudes no real weight has (beyond 2^+-40): measured in float64
    if options.num_iter <= 0:
        return q_rtn, {"method": "rtn"}
    if rtn.err_sq == 0.0:
        return q_rtn, {"method": "exact"}  # every element is representable: there is nothing to round
    rounding = _rounding()
    final = rounding.rtn_is_final(tuple(w.shape), rtn.rel_error, top_k=options.top_k, num_iter=options.num_iter,
                                  calibration=calibration)
    if final is not None:
        return q_rtn, final  # RTN's error is negligible (BF16 at scale 1): nothing to learn, no pass over the tensor
    ws = w.float()
    if scale != 1.0:
        ws = ws * (1.0 / scale)  # exact: power of two
    try:
        res = rounding.round_to_fp16(ws, top_k=options.top_k, num_iter=options.num_iter, calibration=calibration,
                                     cancel=cancel)
    except ValueError as e:  # e.g. calibration statistics of another width than this weight
        raise ConversionError(f"{path}: tensor '{key}': {e}") from None
    if torch.equal(res.q, q_rtn):
        return q_rtn, dict(res.info)
    return res.q, dict(res.info)


def _lossy_reason(m: Measurement, max_abs: float) -> str:
    parts = [f"relF {m.rel_error:.3g}"]
    if m.flushed_to_zero:
        parts.append(f"{m.flushed_to_zero} of {m.numel} values stored as 0")
    if max_abs > fp16_limit(m.scale) * m.scale:
        parts.append("values beyond float32's range saturated")
    return "; ".join(parts)


def _out_randn(w: torch.Tensor, q: torch.Tensor, q_rtn: torch.Tensor, scale: float, samples: int,
               device: torch.device) -> dict:
    """The out(randn) figure (report only) for a weight the learned rounding changed, measured on `samples`
    synthetic rows (`calib_samples`); on the CPU only where it is cheap enough (metrics.OUT_RANDN_CPU_FLOP)."""
    if device.type == "cpu" and out_randn_flop(tuple(w.shape), samples) > metrics.OUT_RANDN_CPU_FLOP:
        return {"out_randn_skipped": "cost on the CPU"}
    return synthetic_output_error(w, q.float() * scale, samples, rtn_deq=q_rtn.float() * scale)


_ROUNDING = None  # the rounding package once a conversion needed it (whatever name the package was imported under)


def _rounding():
    global _ROUNDING
    if _ROUNDING is None:
        from . import rounding  # imported on first use: a plain --num_iter 0 conversion never needs it
        _ROUNDING = rounding
    return _ROUNDING


def loaded_rounding():
    """The rounding package if a conversion in this process has used it, else None."""
    return _ROUNDING
