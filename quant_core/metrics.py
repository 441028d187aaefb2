"""Per-tensor quality metrics, always measured on what is stored (the fp16 values times the scale).

The figures are defined in docs/rounding.md ("Figures") and listed with their units in docs/ARCHITECTURE.md
("Report schema"). The work is done in one fused pass over cache-sized chunks (on the CPU a pass over a whole FLUX
tensor per operation would cost more than the conversion itself); on a GPU the chunk is the whole tensor. The pass
can also produce the round-to-nearest (RTN) fp16 tensor itself, so plain conversion costs a single sweep. Sums are
float32 per chunk, accumulated in float64; one host sync per tensor.

Also here: out(randn), the output error on synthetic rows the report gives for tensors the rounding changed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .scaling import FP16_MAX, FP16_MIN_NORMAL

FLOAT32_MAX = float(torch.finfo(torch.float32).max)
# Inside this range of max|w| the float32 sums of the fast paths can neither overflow nor lose the figure to
# underflow (squares of the relevant errors stay far above float32's smallest normal). Tensors outside it, which
# real models do not have, are measured in float64 after normalising by a power of two (`_measure_wide`).
SAFE_MIN, SAFE_MAX = 2.0 ** -40, 2.0 ** 40
CPU_CHUNK = 1 << 17  # elements: 1 MiB of float32, stays in L2
# the exact-source path reuses three preallocated buffers; with no allocation per step larger chunks win
# (12 MiB of buffers stay in L3; timings by chunk size in docs/ARCHITECTURE.md)
EXACT_CHUNK = 1 << 20


@dataclass
class Measurement:
    """What `measure` finds for one stored tensor (q fp16 with power-of-two `scale`) against its weight w.

    Figures: max_abs (max |w|), nonfinite (stored values that are not finite), flushed_to_zero (nonzero weights
    stored as 0), subnormal (stored fp16 subnormals), rel_error = ||Q s - W|| / ||W||, rtn_rel_error (the same for
    round-to-nearest), error_ratio (rel_error / rtn_rel_error; 1 when both are 0), max_rel_error
    (max |q s - w| / max(|w|, s 2^-14): the relative error over fp16's normal range), bit_exact_fraction
    (dequantized == source), changed_vs_rtn (share of elements stored otherwise than RTN would), numel.
    Sums for totals across tensors (float64, in units of 2^sq_exp; sq_exp is 0 except for tensors outside the safe
    range): err_sq = ||Q s - W||^2, rtn_err_sq, w_sq = ||W||^2; tiny_err_sq bounds the squared error of the elements
    below s 2^-14 (absolute units), which the auto scale policy weighs.
    """

    max_abs: float
    scale: float
    nonfinite: int
    flushed_to_zero: int
    subnormal: int
    rel_error: float
    rtn_rel_error: float
    error_ratio: float
    max_rel_error: float
    bit_exact_fraction: float
    changed_vs_rtn: float
    numel: int
    err_sq: float
    rtn_err_sq: float
    w_sq: float
    sq_exp: int = 0
    tiny_err_sq: float = 0.0

    def as_dict(self) -> dict:
        """The figures as event/report fields (sq_exp only where it is not 0)."""
        d = asdict(self)
        if not self.sq_exp:
            del d["sq_exp"]
        return d


def _chunks(n: int, device: torch.device, cpu_step: int = CPU_CHUNK):
    step = cpu_step if device.type == "cpu" else max(n, 1)
    return ((i, min(i + step, n)) for i in range(0, n, step))


def fp16_limit(scale: float) -> float:
    """The largest fp16 value q with q * scale finite in float32 (65504 unless the scale is near float32's top)."""
    x = min(FP16_MAX, FLOAT32_MAX / scale)
    if x >= FP16_MAX:
        return FP16_MAX
    step = 2.0 ** (math.floor(math.log2(x)) - 10)  # fp16 spacing at x (x is far above fp16's subnormals here)
    return math.floor(x / step) * step


def in_safe_range(max_abs: float) -> bool:
    return max_abs == 0.0 or SAFE_MIN <= max_abs <= SAFE_MAX


def measure(w: torch.Tensor, scale: float, q: torch.Tensor | None = None,
            out: torch.Tensor | None = None, max_abs: float | None = None) -> tuple[torch.Tensor, Measurement]:
    """Measure fp16 `q` (with power-of-two `scale`) against weight `w` (any float dtype), beside RTN.

    With ``q=None`` the RTN tensor is built in the same pass and measured (it is then both result and baseline);
    `out`, a buffer of at least 2 * numel bytes on w's device, receives it instead of fresh memory.

    Returns (q, `Measurement`). `max_abs` (max |w|, if the caller has it) picks the path.
    """
    if max_abs is None:
        max_abs = float(w.abs().max()) if w.numel() else 0.0
    if not in_safe_range(max_abs):
        return _measure_wide(w, scale, q, out, max_abs)
    if q is None and w.dtype in (torch.bfloat16, torch.float16) and w.device.type == "cpu":
        return _measure_rtn_exact_source(w, scale, out)
    flat = w.reshape(-1)
    n = flat.numel()
    build = q is None
    if build:
        q_flat = _fp16_buffer(out, n, w.device)
    else:
        q_flat = q.reshape(-1)
    inv = 1.0 / scale
    thr = scale * FP16_MIN_NORMAL
    acc = torch.zeros(8, dtype=torch.float64, device=w.device)
    max_abs = torch.zeros((), dtype=torch.float32, device=w.device)
    max_rel = torch.zeros((), dtype=torch.float32, device=w.device)
    zero = torch.zeros((), device=w.device)
    for i, j in _chunks(n, w.device):
        wf = flat[i:j].float()
        ws = wf * inv if scale != 1.0 else wf
        qc = q_flat[i:j]
        if build:
            qc.copy_(ws)
        back = qc.float()
        if scale != 1.0:
            back.mul_(scale)
        back_abs = back.abs()
        a = wf.abs()
        # stored zeros minus true zeros = flushed; stored values below the smallest normal minus zeros = subnormal
        sums = [torch.count_nonzero(wf), torch.count_nonzero(back), torch.count_nonzero(back_abs < thr),
                torch.count_nonzero(a < thr)]
        d = back.sub_(wf)
        sums += [torch.dot(d, d), torch.dot(wf, wf), torch.count_nonzero(d)]
        max_abs = torch.maximum(max_abs, a.amax())
        max_rel = torch.maximum(max_rel, d.abs_().div_(a.clamp_min_(thr)).amax())
        if build:
            sums += [sums[4], zero]
        else:
            r = ws.half()
            sums.append(torch.count_nonzero(r != qc))
            dr = r.float()
            if scale != 1.0:
                dr.mul_(scale)
            dr.sub_(wf)
            sums.insert(7, torch.dot(dr, dr))
        acc_chunk = torch.stack([x.double() for x in sums])
        acc = acc_chunk if i == 0 else acc + acc_chunk
    if n == 0:
        acc = torch.zeros(9, dtype=torch.float64, device=w.device)
    vals = torch.cat([acc, max_abs.double().reshape(1), max_rel.double().reshape(1)]).tolist()  # one sync
    nz_w, nz_q, below, tiny, e_sq, w_sq, inexact, rtn_sq, changed, max_abs_v, max_rel_v = vals
    m = _finish(n, scale, e_sq, w_sq, inexact, nz_w - nz_q, below - (n - nz_q), rtn_sq, changed, max_abs_v,
                max_rel_v)
    m.tiny_err_sq = tiny * (scale * 2.0 ** -25) ** 2  # bound: a tiny element errs by <= half a subnormal step
    if e_sq != e_sq or e_sq == float("inf"):
        m.nonfinite = int(torch.count_nonzero(~torch.isfinite(q_flat)))
    return q_flat.view(w.shape), m


def _fp16_buffer(out: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    if out is None:
        return torch.empty(n, dtype=torch.float16, device=device)
    return out.reshape(-1).view(torch.uint8)[: 2 * n].view(torch.float16)


def _measure_rtn_exact_source(w: torch.Tensor, scale: float,
                              out: torch.Tensor | None = None) -> tuple[torch.Tensor, Measurement]:
    """`measure(w, scale)` for BF16/FP16 sources on the CPU, in a fraction of the work.

    Such values are exactly representable in fp16 after a power-of-two scale unless they fall below fp16's smallest
    normal ("tiny"). Clamping to +-2^-14 keeps the tiny ones and turns every other one into an exactly representable
    +-2^-14, so the difference of the clamped stored value and the clamped source *is* the rounding error, and the
    counts come from plain float arithmetic (no boolean masks, which are slow on the CPU). Every step writes into
    three preallocated chunk buffers: allocating per operation (large blocks are mmap'ed and page-faulted afresh
    each time) used to cost more than the arithmetic.
    """
    flat = w.reshape(-1)
    n = flat.numel()
    q_flat = _fp16_buffer(out, n, w.device)
    inv = 1.0 / scale
    lim = FP16_MIN_NORMAL
    step = min(EXACT_CHUNK, max(n, 1))
    f, g, h = (torch.empty(step, dtype=torch.float32) for _ in range(3))
    rows = (n + step - 1) // step
    sums = torch.zeros(max(rows, 1), 6, dtype=torch.float32)  # per chunk: d.d, w.w, inexact, nz_w, nz_q, normal
    dmax = torch.zeros(max(rows, 1), dtype=torch.float32)
    for r, (i, j) in enumerate(_chunks(n, w.device, step)):
        k = j - i
        fc, gc, hc, qc, row = f[:k], g[:k], h[:k], q_flat[i:j], sums[r]
        fc.copy_(flat[i:j])
        torch.dot(fc, fc, out=row[1])
        if scale != 1.0:
            fc.mul_(inv)
        qc.copy_(fc)                      # the stored fp16 (round to nearest)
        fc.clamp_(-lim, lim)              # t: tiny source values, +-lim elsewhere
        gc.copy_(qc).clamp_(-lim, lim)    # tq: the same for the stored values
        torch.sub(gc, fc, out=hc)         # d = tq - t: the rounding error (scaled units)
        torch.dot(hc, hc, out=row[0])
        dmax[r] = hc.abs_().amax()
        torch.sign(hc, out=hc)
        torch.dot(hc, hc, out=row[2])     # inexact elements
        torch.sign(fc, out=hc)
        torch.dot(hc, hc, out=row[3])     # nonzero source elements
        torch.sign(gc, out=hc)
        torch.dot(hc, hc, out=row[4])     # nonzero stored elements
        gc.abs_().mul_(1.0 / lim).floor_()
        row[5] = gc.sum()                 # stored |q| >= 2^-14 (|tq| == lim exactly there)
    e_sq, w_sq, inexact, nz_w, nz_q, normal = sums.double().sum(0).tolist()
    e_sq *= scale * scale
    below = n - normal  # stored |q| < 2^-14, zeros included
    m = _finish(n, scale, e_sq, w_sq, inexact, nz_w - nz_q, below - (n - nz_q), e_sq, 0,
                float("nan"), float(dmax.max()) / lim)
    m.tiny_err_sq = e_sq  # all of the error sits in the tiny elements
    return q_flat.view(w.shape), m


def _measure_wide(w: torch.Tensor, scale: float, q: torch.Tensor | None, out: torch.Tensor | None,
                  max_abs: float) -> tuple[torch.Tensor, Measurement]:
    """`measure` for tensors whose magnitudes would overflow or underflow float32 sums: float64 throughout, the sums
    normalised by a power of two near max|w| (reported in units of 2^sq_exp), the dequantized values computed as a
    loader computes them (fp16 times the float32 scale, in float32). RTN saturates at the largest fp16 value whose
    product with the scale is finite in float32."""
    flat = w.reshape(-1)
    n = flat.numel()
    wd = flat.double()
    k = math.frexp(max_abs)[1] if max_abs > 0 else 0
    norm = 2.0 ** k
    qmax = fp16_limit(scale)
    s32 = torch.tensor(scale, dtype=torch.float32, device=w.device)
    r = (wd / scale).clamp_(-qmax, qmax).float().half()  # round to nearest, as the fast paths do (via float32)
    if q is None:
        q_flat = _fp16_buffer(out, n, w.device)
        q_flat.copy_(r)
    else:
        q_flat = q.reshape(-1)
    back = (q_flat.float() * s32).double()
    thr = scale * FP16_MIN_NORMAL
    d = (back - wd).div_(norm)
    wn = wd / norm
    dr = ((r.float() * s32).double() - wd).div_(norm)
    a = wd.abs()
    nz_w, nz_q = int(torch.count_nonzero(wd)), int(torch.count_nonzero(back))
    below, tiny = int(torch.count_nonzero(back.abs() < thr)), int(torch.count_nonzero(a < thr))
    inexact = int(torch.count_nonzero(d))
    changed = int(torch.count_nonzero(r != q_flat))
    e_sq, w_sq, rtn_sq = float(d @ d), float(wn @ wn), float(dr @ dr)
    max_rel = float(((back - wd).abs() / a.clamp(min=thr)).max()) if n else 0.0
    m = _finish(n, scale, e_sq, w_sq, inexact, nz_w - nz_q, below - (n - nz_q), rtn_sq, changed, max_abs, max_rel)
    m.sq_exp = 2 * k
    m.tiny_err_sq = tiny * (scale * 2.0 ** -25) ** 2  # absolute units, as in the fast paths
    m.nonfinite = int(torch.count_nonzero(~torch.isfinite(q_flat))) + int(
        torch.count_nonzero(~torch.isfinite(back)))
    return q_flat.view(w.shape), m


def _finish(n, scale, e_sq, w_sq, inexact, flushed, subnormal, rtn_sq, changed, max_abs, max_rel) -> Measurement:
    wn = w_sq ** 0.5
    rel_error = (e_sq ** 0.5) / wn if wn > 0 else 0.0
    rtn_rel = (rtn_sq ** 0.5) / wn if wn > 0 else 0.0
    return Measurement(
        max_abs=max_abs,
        scale=scale,
        nonfinite=0,
        flushed_to_zero=int(flushed),
        subnormal=int(subnormal),
        rel_error=rel_error,
        rtn_rel_error=rtn_rel,
        error_ratio=rel_error / rtn_rel if rtn_rel > 0 else (1.0 if rel_error == 0 else float("inf")),
        max_rel_error=max_rel,
        bit_exact_fraction=(n - inexact) / n if n else 1.0,
        changed_vs_rtn=changed / n if n else 0.0,
        numel=n,
        err_sq=e_sq,
        rtn_err_sq=rtn_sq,
        w_sq=w_sq,
    )


# ---------------------------------------------------------------------------------------------------------------
# out(randn): the output error on synthetic rows (report only)

OUT_RANDN_CPU_FLOP = 2e10  # on the CPU, out(randn) is measured only for tensors up to this cost (docs/ARCHITECTURE.md)


def out_randn_flop(shape: tuple[int, ...], samples: int) -> float:
    """Multiply-adds x 2 of `synthetic_output_error` for a weight of `shape`: three products with the rows."""
    out = shape[0]
    return 6.0 * samples * out * (math.prod(shape) // max(out, 1))


def synthetic_output_error(w: torch.Tensor, q_deq: torch.Tensor, samples: int, seed: int = 0,
                           rows_per_step: int = 1024, rtn_deq: torch.Tensor | None = None) -> dict:
    """out(randn) of rounding.md: ||X (Q - W)^T|| / ||X W^T|| for `samples` rows of seeded standard-normal X, beside
    the same for RTN. `w` [out, in] (or [out, ...]) in any float dtype, `q_deq` the stored weight dequantized to the
    same units, `rtn_deq` round-to-nearest's (default: `w` cast to fp16, right for scale 1). Returns
    {"out_randn": float, "rtn_out_randn": float, "out_randn_ratio": float, "out_randn_samples": int}.

    Isotropic rows carry no information about the layer (in expectation the ratio is the relF ratio), so this is a
    report only; it never feeds the rounding or a bias. X is drawn on w's device from a generator seeded with
    `seed` (the CPU and a GPU draw different rows, so the figure differs between them in its last digits; the
    stored bytes do not). Cost: `out_randn_flop`, in blocks of `rows_per_step` rows (memory ~ rows_per_step *
    (in + 3 * out) floats). Sums in float64, in a fixed order."""
    out = w.shape[0]
    wf = w.reshape(out, -1).float()
    e = q_deq.reshape(out, -1).float() - wf
    er = (rtn_deq.reshape(out, -1).float() if rtn_deq is not None else wf.to(torch.float16).float()) - wf
    g = torch.Generator(device=wf.device).manual_seed(seed)
    acc = torch.zeros(3, dtype=torch.float64, device=wf.device)
    done = 0
    while done < samples:
        r = min(rows_per_step, samples - done)
        x = torch.randn(r, wf.shape[1], generator=g, device=wf.device)
        acc += torch.stack([(x @ a.T).double().pow(2).sum() for a in (e, er, wf)])
        done += r
    err, rtn, ref = (float(v) ** 0.5 for v in acc.tolist())
    return {"out_randn": err / ref if ref else 0.0, "rtn_out_randn": rtn / ref if ref else 0.0,
            "out_randn_ratio": err / rtn if rtn else 1.0, "out_randn_samples": samples}
