"""Power-of-two per-tensor scales.

Stored fp16 value q and float32 `scale_weight` s give the weight q * s. Multiplying or dividing by 2^k is exact in
binary floating point, so scaling itself never adds error: the only error is the fp16 rounding of w / s. A BF16
value inside fp16's normal range is exactly representable in fp16, so BF16 -> scaled FP16 with a power-of-two scale
that keeps the tensor in the normal range is lossless.

Policies:
- ``auto`` (default): scale 1 wherever the tensor fits fp16 without material loss, so the file stays right even in
  loaders that ignore scales; otherwise 2^k. "Material loss" is measured, not guessed: a tensor that would overflow
  fp16 is always scaled; otherwise it is scaled only if scaling cuts its round-to-nearest relative error by more
  than 1% and by more than 1e-6 (i.e. fp16 subnormals or underflow at scale 1 matter for that tensor).
- ``pow2``: always pick the power of two that puts max|w| in [2^14, 2^15): the most fp16 precision every time,
  lossless for BF16 input.
"""

from __future__ import annotations

import math

import torch

FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0 ** -14
# Scales stay where float32 (the scale's own dtype, and the dtype loaders dequantize in) keeps them exact and usable:
# a normal float32 (flushing subnormals to zero, as GPUs may, cannot zero a weight), 1/scale finite in float32, and
# room for 2^15 * scale. Real weights never reach either end; tensors beyond them saturate or flush, measured.
SCALE_MIN, SCALE_MAX = 2.0 ** -126, 2.0 ** 113
# auto keeps scale 1 unless scaling lowers the relative RTN error by more than 1% *and* by more than 1e-6 in
# absolute relF (about 0.4% of fp16's own rounding error on fp32 data): a BF16 tensor whose few tiny values lose a
# bit or two in fp16 subnormals (relF ~1e-9) keeps scale 1.
AUTO_GAIN = 1.01
AUTO_MIN_GAIN = 1e-6
POLICIES = ("auto", "pow2")


def pow2_scale(max_abs: float) -> float:
    """The power of two s with max_abs / s in [2^14, 2^15), kept within [SCALE_MIN, SCALE_MAX]; 1.0 for an all-zero
    tensor."""
    if not math.isfinite(max_abs) or max_abs <= 0.0:
        return 1.0
    _, e = math.frexp(max_abs)  # max_abs = m * 2^e, m in [0.5, 1)
    return min(max(math.ldexp(1.0, e - 15), SCALE_MIN), SCALE_MAX)


def rtn_error_sq(wf: torch.Tensor, scale: float) -> float:
    """Squared Frobenius error of round-to-nearest fp16 at `scale`, in the weight's own units (float64 sum)."""
    q = (wf / scale if scale != 1.0 else wf).to(torch.float16).float()
    if scale != 1.0:
        q = q * scale
    d = (q - wf).double()  # squares in float64: the error of tiny weights would underflow float32
    return float(torch.dot(d, d))


def candidate_scale(max_abs: float, policy: str = "auto") -> tuple[float, float | None]:
    """(scale to use, alternative worth checking or None) before anything is measured.

    `pow2` and tensors that would overflow fp16 get their power of two at once; `auto` starts from scale 1 and
    names the power of two as the alternative to check with `worth_scaling` once scale 1 has been measured.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown scale policy {policy!r}; expected one of {POLICIES}")
    s = pow2_scale(max_abs)
    if policy == "pow2" or max_abs >= FP16_MAX:
        return s, None
    if s >= 1.0:  # fits fp16 at scale 1 and scaling would not move anything out of the subnormals
        return 1.0, None
    return 1.0, s


def worth_scaling(w: torch.Tensor, alt: float, err1_sq: float, w_sq: float, tiny_err_sq: float) -> bool:
    """Auto policy: does scale `alt` cut the RTN error at scale 1 materially (see module doc)?

    Scaling by 2^-k maps fp16's normal grid onto itself, so the two errors differ only on the elements below
    fp16's smallest normal (2^-14), whose squared error at scale 1 is at most `tiny_err_sq`. When even removing all
    of it cannot reach the thresholds, nothing more is computed; otherwise only those elements are re-rounded.
    """
    if err1_sq == 0.0 or tiny_err_sq == 0.0 or w_sq == 0.0:
        return False
    w_norm = w_sq ** 0.5
    if tiny_err_sq ** 0.5 <= AUTO_MIN_GAIN * w_norm:
        return False
    wf = w.reshape(-1).float()
    small = wf[wf.abs() < FP16_MIN_NORMAL]
    errs_sq = max(err1_sq - rtn_error_sq(small, 1.0) + rtn_error_sq(small, alt), 0.0)
    gain = (err1_sq ** 0.5 - errs_sq ** 0.5) / w_norm
    return err1_sq > AUTO_GAIN ** 2 * errs_sq and gain > AUTO_MIN_GAIN
