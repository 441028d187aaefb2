"""Calibrated mode: minimise ``E||(Q - W) x||^2`` over the layer's recorded inputs with GPTQ-style error feedback on
the fp16 grid (act-order, damping, the second moment shrunk towards its diagonal), then coordinate-descent
refinement on the same quadratic; kept only where it lowers the error on calibration rows it was not fitted on.

Figures behind each default: docs/rounding.md, benchmarks/calib_shift.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from ..errors import check_cancel
from ..options import REFINE_SWEEPS
from .grid import neighbours

if TYPE_CHECKING:
    from ..calibration import LayerCalibration

DAMP = 0.01              # H += DAMP * mean(diag H) * I
SHRINK = 0.5             # H <- (1 - SHRINK) H + SHRINK diag(H): half the off-diagonal structure of the sample kept
HELD_OUT_CHECK = True    # round on one half of the calibration sequences, measure on the other, keep only if < 1
BLOCK = 128              # GPTQ column block
FP64_WORK = 1 << 36      # GPTQ in float64 when out * in^2 is at most this, else float32

CancelHook = Callable[[], object]


def calibrated(w2: torch.Tensor, cal: "LayerCalibration", num_iter: int, cancel: CancelHook | None,
               shrink: float = SHRINK, held_out_check: bool = HELD_OUT_CHECK
               ) -> tuple[torch.Tensor | None, dict]:
    """GPTQ on the fp16 grid for objective E||(Q - W) x||^2 (raw second moment, shrunk towards its diagonal), then
    coordinate-descent refinement.

    With a split file (see calibration.py) the layer is first rounded on the fit half alone and measured on the
    other half, rows that rounding never saw; if that held-out error is not below RTN's, returns (None, info) and
    the caller rounds the layer as without calibration. Otherwise the layer is rounded on all calibration tokens and
    the held-out figure is what the report gives (a cross-validated estimate: it is measured for the half fit).
    """
    from ..calibration import output_errors

    check = None
    if held_out_check and cal.has_split:
        (fit_mean, fit_gram), (rest_mean, rest_gram) = cal.halves()
        q_fit, _ = _gptq_fp16(w2, fit_gram, num_iter, cancel, shrink)
        rtn = w2.to(torch.float16).float()
        err, ref = output_errors(w2, q_fit.float(), rest_mean, rest_gram)
        err_rtn, _ = output_errors(w2, rtn, rest_mean, rest_gram)
        check = {"output_error_on": "held-out half", "output_rel_error": err / ref if ref > 0 else 0.0,
                 "rtn_output_rel_error": err_rtn / ref if ref > 0 else 0.0,
                 "output_error_ratio": err / err_rtn if err_rtn > 0 else 1.0,
                 "calibration_tokens": cal.count, "held_out_tokens": cal.count - cal.fit_count}
        if not check["output_error_ratio"] < 1.0:
            return None, {"calibrated_fallback": "no gain on the held-out half of the calibration text",
                          "calibrated_held_out_ratio": check["output_error_ratio"]}
    q, info = _gptq_fp16(w2, cal.gram, num_iter, cancel, shrink)
    info["calibration_tokens"] = cal.count
    if check is not None:
        info.update(check)
    else:
        info.update(_output_error_info(w2, q, cal.mean, cal.gram, "calibration (in-sample)"))
    if cal.eval_gram is not None:
        ev = _output_error_info(w2, q, cal.eval_mean, cal.eval_gram, "eval text")
        info.update({"eval_output_error_ratio": ev["output_error_ratio"],
                     "eval_output_rel_error": ev["output_rel_error"]})
        if check is None:
            info.update(ev)
    return q, info


def _objective(gram: torch.Tensor, dev: torch.device, shrink: float) -> torch.Tensor:
    """The matrix the rounding minimises tr(E H E^T) for: the raw second moment E[x x^T] (the mean error is part of
    the objective, so no bias correction is needed to control it), shrunk towards its diagonal by `shrink` (a sample
    of text over-fits the off-diagonal structure; the diagonal, RTN-like part carries over to other text), plus
    DAMP of the mean diagonal. Inputs that never fire get a unit diagonal (their columns keep RTN anyway)."""
    h = gram.to(device=dev, dtype=torch.float64)
    diag = torch.diagonal(h).clone()
    h = (1.0 - shrink) * h
    h.diagonal().add_(shrink * diag + DAMP * diag.mean())
    dead = diag <= 0
    h[dead, dead] = 1.0
    return h


def _gptq_fp16(w2: torch.Tensor, gram: torch.Tensor, num_iter: int, cancel: CancelHook | None, shrink: float
               ) -> tuple[torch.Tensor, dict]:
    m, n = w2.shape
    dev = w2.device
    dtype = torch.float64 if m * n * n <= FP64_WORK else torch.float32
    h = _objective(gram, dev, shrink)
    dead = torch.diagonal(gram) <= 0
    rtn, _, e, d = neighbours(w2)
    rtn64, d64 = rtn.to(dtype), d.to(dtype)
    d64[:, dead.to(dev)] = 0.0  # inputs that never fire: nothing to learn, keep RTN
    w64, h = w2.to(dtype), h.to(dtype)
    flips, added = _gptq(w64, h, rtn64, d64, cancel)
    mean = float(torch.diagonal(h).mean())
    if added:  # the damping the factorisation needed holds for the sweeps too
        h = h.clone()
        h.diagonal().add_(added)
    sweeps = 0
    for _ in range(min(num_iter - 1, REFINE_SWEEPS)):
        check_cancel(cancel)
        changed = _refine_sweep(w64, h, rtn64, d64, flips)
        sweeps += 1
        if not changed:
            break
    q = torch.where(flips, (rtn64 + d64).to(torch.float16), rtn)
    return q, {"method": "gptq", "iterations": 1 + sweeps, "shrink": shrink, "damp": DAMP + added / mean,
               "flips": int(torch.count_nonzero(flips))}


def _inverse_factor(h: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The upper Cholesky factor of h^-1 (what the error feedback scales by) and what was added to h's diagonal to
    get it: nothing when h factorises, else the damping raised tenfold at a time (an estimated second moment can be
    indefinite by its estimation error, or the working precision can lose a nearly singular one)."""
    mean = float(torch.diagonal(h).mean())
    damp = DAMP
    for _ in range(6):
        added = (damp - DAMP) * mean
        hd = h
        if added:
            hd = h.clone()
            hd.diagonal().add_(added)
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if int(info) == 0:
                return u, added
        damp *= 10.0
    raise ValueError("the calibration statistics give no positive definite matrix even with damping "
                     f"{damp / 10.0:g} of their mean diagonal")


def _gptq(w: torch.Tensor, h: torch.Tensor, rtn: torch.Tensor, d: torch.Tensor, cancel: CancelHook | None
          ) -> tuple[torch.Tensor, float]:
    """Error feedback (GPTQ) where each element may only take its RTN value or the other fp16 neighbour.

    Columns are visited in descending order of H's diagonal (act-order); the rounding error of each column, scaled
    by the inverse Hessian's Cholesky factor, is pushed onto the columns not yet rounded. Returns the flip mask and
    what `_inverse_factor` had to add to H's diagonal.
    """
    m, n = w.shape
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    w, rtn, d = w[:, perm].clone(), rtn[:, perm], d[:, perm]
    h = h[perm][:, perm]
    u, added = _inverse_factor(h)
    flips = torch.zeros(m, n, dtype=torch.bool, device=w.device)
    for i1 in range(0, n, BLOCK):
        check_cancel(cancel)
        i2 = min(i1 + BLOCK, n)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        for j in range(i2 - i1):
            col = w1[:, j]
            r, dd = rtn[:, i1 + j], d[:, i1 + j]
            f = (col - r - dd).abs() < (col - r).abs()  # the other neighbour is nearer the updated weight
            flips[:, i1 + j] = f
            err = (col - torch.where(f, r + dd, r)) / u[i1 + j, i1 + j]
            w1[:, j:] -= err[:, None] * u[i1 + j, i1 + j:i2][None, :]
            err1[:, j] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    out = torch.empty_like(flips)
    out[:, perm] = flips
    return out, added


def _refine_sweep(w: torch.Tensor, h: torch.Tensor, rtn: torch.Tensor, d: torch.Tensor, flips: torch.Tensor
                  ) -> bool:
    """One coordinate-descent sweep over the columns on tr((Q - W) H (Q - W)^T): each element takes whichever of
    its two fp16 neighbours lowers the objective given all others (rows are independent, so a whole column moves
    at once). Updates `flips` in place; returns whether anything changed (one host sync)."""
    m, n = w.shape
    q = torch.where(flips, rtn + d, rtn)
    r = (q - w) @ h  # gradient / 2
    diag = torch.diagonal(h)
    any_change = torch.zeros((), dtype=torch.bool, device=w.device)
    for i1 in range(0, n, BLOCK):
        i2 = min(i1 + BLOCK, n)
        delta1 = torch.zeros(m, i2 - i1, dtype=w.dtype, device=w.device)
        for j in range(i1, i2):
            step = torch.where(flips[:, j], -d[:, j], d[:, j])  # move to the other neighbour
            better = (2.0 * step * r[:, j] + step * step * diag[j]) < 0
            s = torch.where(better, step, 0.0)
            flips[:, j] ^= better
            delta1[:, j - i1] = s
            r[:, j:i2] += s[:, None] * h[j, j:i2][None, :]
            any_change |= better.any()
        if i1 > 0:
            r[:, :i1] += delta1 @ h[i1:i2, :i1]
        if i2 < n:
            r[:, i2:] += delta1 @ h[i1:i2, i2:]
    return bool(any_change)


def _output_error_info(w2: torch.Tensor, q: torch.Tensor, mean: torch.Tensor, gram: torch.Tensor, on: str) -> dict:
    """Output-error figures of q against RTN on the inputs summarised by (mean, gram)."""
    from ..calibration import output_errors

    err, ref = output_errors(w2, q.float(), mean, gram)
    err_rtn, _ = output_errors(w2, w2.to(torch.float16).float(), mean, gram)
    return {"output_error_on": on, "output_rel_error": err / ref if ref > 0 else 0.0,
            "rtn_output_rel_error": err_rtn / ref if ref > 0 else 0.0,
            "output_error_ratio": err / err_rtn if err_rtn > 0 else 1.0}
