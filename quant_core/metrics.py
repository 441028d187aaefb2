"""Per-tensor quality metrics, always measured on what is stored (the fp16 values times the scale).

Figures follow ../shared/research/rounding.md section 6. Norms are accumulated in float64; everything is computed on
the tensor's device and fetched with one host sync.
"""

from __future__ import annotations

import torch

FP16_MIN_NORMAL = 2.0 ** -14


def _err(q: torch.Tensor, scale: float, wf: torch.Tensor) -> torch.Tensor:
    deq = q.float()
    if scale != 1.0:
        deq = deq * scale  # exact: scale is a power of two
    return deq - wf


def tensor_metrics(wf: torch.Tensor, scale: float, q: torch.Tensor, q_rtn: torch.Tensor,
                   source_dtype: str) -> dict:
    """Quality of stored fp16 `q` (with `scale`) for float32 weight `wf`, beside round-to-nearest `q_rtn`.

    Returns plain floats/ints: max_abs, scale, nonfinite, flushed_to_zero (nonzero weights stored as 0), subnormal
    (stored fp16 subnormals), rel_error = ||Q-W||/||W||, rtn_rel_error, error_ratio = rel_error / rtn_rel_error (1 when
    both are 0), max_rel_error over elements stored in fp16's normal range, bit_exact_fraction (dequantized ==
    source), changed_vs_rtn (fraction of elements whose stored value differs from RTN).
    """
    n = wf.numel()
    d = _err(q, scale, wf)
    w_sq = torch.sum(wf * wf, dtype=torch.float64)
    e_sq = torch.sum(d * d, dtype=torch.float64)
    aq = q.abs()
    normal = aq >= FP16_MIN_NORMAL
    rel = torch.where(normal, d.abs() / wf.abs().clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    same_as_rtn = q is q_rtn
    stats = [
        w_sq, e_sq, wf.abs().amax() if n else torch.zeros((), device=wf.device),
        torch.count_nonzero(~torch.isfinite(q)),
        torch.count_nonzero((q == 0) & (wf != 0)),
        torch.count_nonzero((aq < FP16_MIN_NORMAL) & (aq > 0)),
        rel.amax() if n else torch.zeros((), device=wf.device),
        torch.count_nonzero(d == 0),
    ]
    if same_as_rtn:
        stats += [e_sq, torch.zeros((), device=wf.device, dtype=torch.int64)]
    else:
        dr = _err(q_rtn, scale, wf)
        stats += [torch.sum(dr * dr, dtype=torch.float64), torch.count_nonzero(q != q_rtn)]
    vals = torch.stack([s.double() for s in stats]).tolist()  # the one host sync
    w_sq, e_sq, max_abs, nonfinite, flushed, subnormal, max_rel, exact, rtn_sq, changed = vals
    wn = w_sq ** 0.5
    rel_error = (e_sq ** 0.5) / wn if wn > 0 else 0.0
    rtn_rel = (rtn_sq ** 0.5) / wn if wn > 0 else 0.0
    return {
        "max_abs": max_abs,
        "scale": scale,
        "nonfinite": int(nonfinite),
        "flushed_to_zero": int(flushed),
        "subnormal": int(subnormal),
        "rel_error": rel_error,
        "rtn_rel_error": rtn_rel,
        "error_ratio": rel_error / rtn_rel if rtn_rel > 0 else (1.0 if rel_error == 0 else float("inf")),
        "max_rel_error": max_rel,
        "bit_exact_fraction": exact / n if n else 1.0,
        "changed_vs_rtn": changed / n if n else 0.0,
        "source_dtype": source_dtype,
        "numel": n,
        "err_sq": e_sq,
        "rtn_err_sq": rtn_sq,
        "w_sq": w_sq,
    }
