"""Learned rounding on the fp16 grid.

Every element of the scaled weight ``ws`` (float32, already divided by its power-of-two scale) has two neighbouring
fp16 values: the round-to-nearest one (RTN) and the next one on the other side of ``ws``. The rounding decides, per
element, which of the two is stored; every objective is evaluated on those stored values, never on a continuous
copy. Elements that fp16 represents exactly (every BF16 value inside fp16's normal range) have one neighbour only
and never move.

Two modes (see docs/rounding.md for the method and measured figures):

- default (no activations): keep RTN's Frobenius error almost unchanged while driving the error along the top-k
  principal directions of W, ``||U_k^T (Q - W) V_k||``, towards zero. A few passes of "flip the elements with the
  best gain per unit of extra Frobenius error until the first-order gain covers what is left"; the threshold is
  found from an integer histogram on the device, so no pass waits for the host.
- calibrated (a `LayerCalibration` with the layer's input statistics): minimise ``E||(Q - W) x||^2`` with GPTQ-style
  error feedback on the fp16 grid (act-order, damping, the second moment shrunk towards its diagonal), then
  coordinate-descent refinement on the same quadratic; kept only where it lowers the error on calibration rows it
  was not fitted on (otherwise the layer is rounded as without calibration).

Determinism: no random state outside fixed seeds, no floating-point atomics (histograms are integer sums), and the
decisions are made in float64, so a CPU and a GPU run store the same bytes unless some element's score falls within
~1e-15 of a decision boundary (floating-point non-associativity of the two devices' sums).
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from .options import MAX_PASSES, REFINE_SWEEPS

if TYPE_CHECKING:
    from .calibration import LayerCalibration

# default mode
BASIS_ITERS = 8          # block Krylov steps for the top-k basis (each: two skinny products with W)
OVERSAMPLE = 6           # extra vectors per Krylov block
BASIS_SEED = 20240601
USE_CUDA_GRAPHS = os.environ.get("QUANT_CORE_CUDA_GRAPHS", "1") != "0"  # see _DeviceGraphs
GRAPH_BUCKETS_PER_OCTAVE = 8  # candidate pools are padded to one of this many sizes per octave
SMALL_EIGH_ON_CPU = False  # True: small eigen-decompositions on the CPU even when W is on a GPU (see _eigh_small)
EXACT_BASIS_DIM = 512    # up to this short side the exact basis (eigh of the small Gram matrix) is used
# the independent check of the top-k figure (see `_check_basis`): a basis the search did not use
CHECK_EXACT_DIM = 512    # up to this short side: an exact float64 SVD (LAPACK / cuSOLVER), else block Krylov:
CHECK_ITERS = 16         # ... steps, twice the search's,
CHECK_SEED = 7919        # ... from a start block of its own seed,
CHECK_CONVERGED = 1e-3   # ... counted as converged when its residual bound on sin(angle) to the true top-k pair is
                         # at most this (float64 Krylov with its 1e-10 Gram cut reaches ~1e-5 relative residuals)
FIGURE_UNCERTAIN = 0.05  # ... and the figure it gives must be pinned down to this (absolute, on the ratio)
NEGLIGIBLE_REL = 2.0 ** -20  # RTN relF below this (e.g. BF16 at scale 1: only subnormals inexact): keep RTN
# The gain/cost ratio is binned by its float64 bit pattern: sign-free exponent plus the top 5 mantissa bits, i.e.
# 32 bins per octave, monotone in the ratio, covering every positive float64 (no log needed).
MANTISSA_SHIFT = 52 - 5
NBINS = 1 << (11 + 5)
REPLICAS = 8            # copies of the histogram, element i adds to copy i % REPLICAS (less atomic contention)
FIXED_ONE = 1 << 32      # fixed-point unit of gain and cost sums (integer sums are exact and order-free)
TIE_COST = 2.0 ** -16   # added to every flip's cost, in units of its squared fp16 gap (see _topk)
POOL_COST = 0.025       # candidate pool: flips costing less than k times this fraction of the squared fp16 gap
POOL_COST_MAX = 0.1     # ... at most this fraction (k directions need more candidates; see _near_midpoint)
STEPS = (1.0, 0.5, 0.25) # first-order step fractions tried by each pass's line search
FROB_BUDGET = 0.01       # extra squared Frobenius error allowed, relative to RTN's (relF at most ~1.005x RTN)

# calibrated mode (figures behind each default: docs/rounding.md, benchmarks/calib_shift.py)
DAMP = 0.01              # H += DAMP * mean(diag H) * I
SHRINK = 0.5             # H <- (1 - SHRINK) H + SHRINK diag(H): half the off-diagonal structure of the sample kept
HELD_OUT_CHECK = True    # round on one half of the calibration sequences, measure on the other, keep only if < 1
BLOCK = 128              # GPTQ column block
FP64_WORK = 1 << 36      # GPTQ in float64 when out * in^2 is at most this, else float32

CancelHook = Callable[[], object]


@dataclass
class RoundingResult:
    """`q`: float16, the shape and device of the input. `info`: JSON-serialisable method metrics."""

    q: torch.Tensor
    info: dict = field(default_factory=dict)


def round_to_fp16(ws: torch.Tensor, *, top_k: int, num_iter: int,
                  calibration: "LayerCalibration | None" = None,
                  cancel: CancelHook | None = None) -> RoundingResult:
    """Round the scaled weight `ws` (float32, shape [out, ...]) to float16, choosing per element between its two
    neighbouring fp16 values. ``num_iter == 0`` is exactly RTN; exactly representable elements never move.

    With `calibration` (the layer's input statistics) the calibrated mode runs, otherwise the top-k mode.
    `cancel()` is called between passes and raises (or returns True) to abort.
    """
    if ws.dtype != torch.float32:
        raise TypeError(f"round_to_fp16 expects float32, got {ws.dtype}")
    shape = ws.shape
    rtn_info = {"method": "rtn", "iterations": 0}
    if num_iter <= 0 or ws.numel() == 0:
        return RoundingResult(ws.to(torch.float16), rtn_info)
    w2 = ws.reshape(shape[0], -1) if ws.dim() >= 2 else ws.reshape(1, -1)
    if calibration is not None:
        if calibration.in_features != w2.shape[1]:
            raise ValueError(f"calibration has {calibration.in_features} input features, weight has {w2.shape[1]}")
        q, info = _calibrated(w2, calibration, num_iter, cancel)
        if q is None:  # no gain on held-out rows: the layer is rounded as without calibration
            fallback = info
            if top_k > 0:
                with torch.cuda.device(w2.device) if w2.is_cuda else contextlib.nullcontext():
                    q, info = _topk(w2, min(top_k, min(w2.shape)), min(num_iter, MAX_PASSES), cancel)
            else:
                q, info = w2.to(torch.float16), dict(rtn_info)
            info = {**info, **fallback}
    elif top_k <= 0:
        return RoundingResult(ws.to(torch.float16), rtn_info)
    else:
        with torch.cuda.device(w2.device) if w2.is_cuda else contextlib.nullcontext():  # graphs, streams: its GPU
            q, info = _topk(w2, min(top_k, min(w2.shape)), min(num_iter, MAX_PASSES), cancel)
    return RoundingResult(q.view(shape), info)


def rtn_is_final(shape: tuple[int, ...], rtn_rel_error: float, *, top_k: int, num_iter: int,
                 calibration: "LayerCalibration | None" = None) -> dict | None:
    """For a caller that has already measured RTN's relative error: the info `round_to_fp16` would report when it
    would return RTN unchanged in top-k mode because that error is negligible (e.g. BF16 weights at scale 1, where
    only fp16 subnormals round), else None. Lets the converter skip the float32 copy and the pass over the tensor."""
    if calibration is not None or top_k <= 0 or num_iter <= 0 or rtn_rel_error > NEGLIGIBLE_REL:
        return None
    rows, cols = (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (1, math.prod(shape))
    return _nothing_to_move(min(top_k, rows, cols))


def _nothing_to_move(k: int) -> dict:
    return {"method": "topk", "top_k": k, "iterations": 0, "passes_used": 0, "topk_ratio": 1.0, "flips": 0,
            "extra_frobenius": 0.0}


# ---------------------------------------------------------------------------------------------------------------
# the fp16 grid


def neighbours(ws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rtn fp16, other fp16, e = rtn - ws, d = other - rtn), e and d float32 (both exact).

    `other` is the next fp16 value beyond `ws` on the side away from its RTN value; `d` is 0 where there is no
    choice: `ws` exactly representable, or the other neighbour would be infinite (`other` is then meaningless).
    """
    q = ws.to(torch.float16)
    qf = q.float()
    e = qf - ws
    # the RTN value lies towards zero (|ws| > |rtn|) exactly when e and ws have opposite signs (e == 0: no choice)
    away = torch.lt(e, 0) == torch.gt(ws, 0)
    # fp16 is sign-magnitude: +-1 on the bit pattern moves the magnitude one step away from / towards zero
    bits = torch.add(q.view(torch.int16), away, alpha=2)
    bits -= 1
    other = bits.view(torch.float16)
    # an infinite RTN value or other neighbour gives an infinite or NaN step: no choice there
    d = torch.where(e != 0, other.float() - qf, 0.0).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    return q, other, e, d


def _row_chunks(m: int, n: int, device: torch.device):
    budget = (1 << 26) if device.type == "cuda" else (1 << 18)
    step = max(1, budget // max(n, 1))
    return [(i, min(i + step, m)) for i in range(0, m, step)]


# ---------------------------------------------------------------------------------------------------------------
# default mode: top-k principal directions


def principal_basis(w2: torch.Tensor, k: int, iters: int = BASIS_ITERS, seed: int = BASIS_SEED,
                    graphs: "_DeviceGraphs | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k left/right singular vectors of `w2` ([m, n]) as float64 ([m, k], [n, k]).

    Randomized block Krylov iteration: blocks of k + OVERSAMPLE vectors, `iters` products with W W^T, one
    orthonormal basis of all blocks, Rayleigh-Ritz at the end. It converges far faster than plain subspace
    iteration when the top singular values are close (common in trained layers). float64 throughout so that
    devices agree; the start block comes from a seeded CPU generator.
    """
    m, n = w2.shape
    if min(m, n) <= EXACT_BASIS_DIM:
        # small: the exact SVD through the Gram matrix of the short side costs less than the iteration
        w64 = w2.double()
        tall = n <= m
        gram = (w64.T @ w64) if tall else (w64 @ w64.T)
        top = _top_eigvecs(gram, k)
        other = w64 @ top if tall else w64.T @ top
        u, v = (other, top) if tall else (top, other)
        return _normalize_columns(u), _normalize_columns(v)
    basis, b = _krylov_space(w2, k + OVERSAMPLE, iters, seed, graphs, "krylov")
    ub = _top_eigvecs(b @ b.T, k)
    return _normalize_columns(basis @ ub), _normalize_columns(b.T @ ub)


def _krylov_space(w2: torch.Tensor, p: int, iters: int, seed: int, graphs: "_DeviceGraphs | None", tag: str,
                  householder: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Block Krylov space of `w2` [m, n] from a seeded start block of `p` vectors and `iters` steps: an orthonormal
    basis [m, r] of it and b = basis^T W [r, n] (float64) for Rayleigh-Ritz. On a GPU captured as a CUDA graph per
    shape under `tag` (its own buffer, so that two such spaces of one weight do not overwrite each other)."""
    m, n = w2.shape
    dev = w2.device
    key = (tag, m, n, p, iters, seed)
    if graphs is not None and graphs.worth_capturing(key):
        w64 = graphs.buffer("w64", (m, n), torch.float64)
        w64.copy_(w2)
        blocks = graphs.buffer(tag, (m, p * (iters + 1)), torch.float64)
        x = graphs.constant(("krylov_start", n, p, seed), lambda: _start_block(n, p, seed))
        if graphs.ensure(key, lambda: _krylov(w64, x, iters, blocks)):
            graphs.replay(key)
        else:
            _krylov(w64, x, iters, blocks)
    else:
        w64 = w2.double()
        blocks = torch.empty(m, p * (iters + 1), dtype=torch.float64, device=dev)
        _krylov(w64, _start_block(n, p, seed).to(dev), iters, blocks)
    # householder (the check): a Householder QR keeps every direction to rounding accuracy, so the Ritz residuals
    # can fall to ~1e-13; the search's eigen-based step drops directions below 1e-10 of the largest (cheaper on a GPU)
    basis = torch.linalg.qr(blocks)[0] if householder else _orthonormalize(blocks)
    return basis, basis.T @ w64                 # [r, n], r <= p * (iters + 1)


@dataclass
class _Check:
    """A top-k basis the search did not use, for the figure the report prints: `u` [m, k], `v` [n, k] (float64),
    `gap` = sigma_k / sigma_k+1 (None where k reaches the rank), `how` (how the basis was obtained, how converged),
    `withheld` (the reason the tensor stays at RTN, or None)."""

    u: torch.Tensor
    v: torch.Tensor
    gap: float | None
    how: str
    sin_bound: float = 0.0
    withheld: str | None = None
    search_off: float | None = None


def _check_basis(w2: torch.Tensor, k: int, u: torch.Tensor, v: torch.Tensor, graphs: "_DeviceGraphs | None"
                 ) -> _Check:
    """An independent top-k basis of `w2` and whether the search's basis (`u`, `v`) agrees with it.

    Up to CHECK_EXACT_DIM on the short side: the exact float64 SVD. Above: a block Krylov space from another seed
    with twice the search's steps (Householder-orthonormalised), its convergence bounded from the residuals of the
    Ritz pairs (sin(angle) <= ||W V - U S||_F / (s_k - s_k+1 - r_k+1), Wedin). When that bound stays above
    CHECK_CONVERGED the weight has no spectral gap the check can resolve: the top-k direction is not pinned down and
    the result says so (`withheld`). The figure is measured in this basis whatever the search's basis was."""
    m, n = w2.shape
    if min(m, n) <= CHECK_EXACT_DIM:
        uu, sv, vh = torch.linalg.svd(w2.double(), full_matrices=False)
        uc, vc = uu[:, :k].contiguous(), vh[:k].T.contiguous()
        how, bound = "exact_svd", 0.0
    else:
        basis, b = _krylov_space(w2, k + 1 + OVERSAMPLE, CHECK_ITERS, CHECK_SEED, graphs, "krylov_check",
                                 householder=True)
        lam, ub = _eigh_small(b @ b.T)
        lam, ub = lam.flip(0)[: k + 1].clamp_min(0), ub.flip(1)[:, : k + 1]
        sv = lam.sqrt()
        live = sv > sv[0] * 1e-12                          # a weight of rank <= k: no direction beyond its rank
        uc = basis @ ub                                     # W^T uc = vc * sv exactly (Rayleigh-Ritz)
        vc = torch.where(live, b.T @ ub / sv.clamp_min(1e-300), 0.0)
        resid_sq = torch.zeros(k + 1, dtype=torch.float64, device=w2.device)
        for r0, r1 in _row_chunks(m, n, w2.device):         # ||W v_i - s_i u_i||, float64, row chunks
            resid_sq += ((w2[r0:r1].double() @ vc - uc[r0:r1] * sv) ** 2).sum(0)
        resid = resid_sq.sqrt()
        sv_l, resid_l = sv.tolist(), resid.tolist()
        sep = sv_l[k - 1] - (sv_l[k] + resid_l[k] if k < len(sv_l) else 0.0)
        bound = (sum(r * r for r in resid_l[:k]) ** 0.5) / sep if sep > 0 else math.inf
        uc, vc = uc[:, :k].contiguous(), vc[:, :k].contiguous()
        conv = f"sin(angle) <= {bound:.1e}" if math.isfinite(bound) else "not converged"
        how = f"krylov (seed {CHECK_SEED}, {CHECK_ITERS} steps, {conv})"
    sv_l = sv.tolist()
    gap = sv_l[k - 1] / sv_l[k] if k < len(sv_l) and sv_l[k] > sv_l[0] * 1e-12 else None  # None: k >= rank
    check = _Check(uc, vc, gap, how, bound)
    gap_txt = f"sigma{k}/sigma{k + 1} = {gap:.4g}" if gap is not None else f"rank <= {k}"
    if bound > CHECK_CONVERGED:
        check.withheld = f"withheld: no spectral gap the check resolves ({gap_txt}, {how})"
        return check
    # how far the search's basis lies from the check's (reported; the figure itself is measured in the check's)
    check.search_off = max(_sin_angle(u, uc), _sin_angle(v, vc))
    return check


def _sin_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """sin of the largest principal angle between the spans of orthonormal columns `a` and `b` (same count)."""
    c = torch.linalg.svdvals(a.T @ b)
    return float((1.0 - c.min().clamp(max=1.0) ** 2).clamp_min(0.0).sqrt())


def _start_block(n: int, p: int, seed: int) -> torch.Tensor:
    """The Krylov start block, from a seeded CPU generator (the same on every device)."""
    return torch.randn(n, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _krylov(w64: torch.Tensor, x: torch.Tensor, iters: int, out: torch.Tensor) -> None:
    """Block Krylov iteration from start block `x` [n, p]: writes the `iters + 1` near-orthonormal blocks
    [m, p] side by side into `out`. Shapes only, no host round trip: captured as a CUDA graph per shape."""
    p = x.shape[1]
    y = _orthonormalize_block(w64 @ x)
    out[:, :p].copy_(y)
    for i in range(1, iters + 1):
        y = _orthonormalize_block(w64 @ (y.T @ w64).T)  # (y^T W)^T: MKL is several times slower on W^T y
        out[:, i * p:(i + 1) * p].copy_(y)


def _normalize_columns(a: torch.Tensor) -> torch.Tensor:
    return (a / a.norm(dim=0, keepdim=True).clamp_min(1e-300)).contiguous()


def _top_eigvecs(gram: torch.Tensor, k: int) -> torch.Tensor:
    """Eigenvectors of the k largest eigenvalues of a small symmetric matrix (see `_eigh_small`), on its device."""
    _, vecs = _eigh_small(gram)
    return vecs[:, -k:].flip(1).contiguous()


def _eigh_small(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """eigh of a small (<= a few hundred) symmetric float64 matrix on its own device (cuSOLVER on a GPU, LAPACK on
    the CPU), or with the CPU's LAPACK when SMALL_EIGH_ON_CPU. A round trip to the CPU is cheaper in isolation (63x63
    on an H100 host: 0.42 ms against 0.85 ms and ~60 kernel launches), but on a 32-core host LAPACK's threads made
    it erratic: per-tensor medians 9-50 ms between runs against a steady 10-11 ms on the device. CPU and GPU stored
    the same bytes either way (eigenvectors agree to rounding; signs and the basis of a repeated eigenvalue never
    matter downstream: u and v are built from the same vectors, and ||U^T E V|| is invariant)."""
    if gram.device.type == "cpu" or not SMALL_EIGH_ON_CPU:
        return torch.linalg.eigh(gram)
    lam, vecs = torch.linalg.eigh(gram.cpu())  # cuSOLVER's syevd is ~60 small kernels per call
    return lam.to(gram.device), vecs.to(gram.device)


def _orthonormalize_block(y: torch.Tensor) -> torch.Tensor:
    """Near-orthonormal columns spanning tall `y` [m, p] (p small), on y's own device without waiting for the host:
    one Cholesky QR step (y <- y L^-T with L L^T = y^T y; orthogonality error ~ cond(y)^2 * 1e-16, ample between
    Krylov steps, and the final `_orthonormalize` of all blocks is exact). A relative 1e-13 ridge keeps the
    factorisation defined when y is rank-deficient (a weight of rank below p); such columns come out near zero or
    dependent and the final step drops them. A few kernels, no host round trip per Krylov step."""
    eye = torch.eye(y.shape[1], dtype=y.dtype, device=y.device)
    gram = y.T @ y
    gram.diagonal().add_(gram.trace() * 1e-13 + 1e-300)
    chol, _ = torch.linalg.cholesky_ex(gram)
    return y @ torch.linalg.solve_triangular(chol, eye, upper=False).T  # y L^-T: one skinny product


def _orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the columns of tall `y` [m, r] (r small): y Q diag(lambda)^-1/2 from the
    eigen-decomposition of the small Gram matrix, then one Cholesky QR step. Directions with eigenvalues below 1e-10
    of the largest (numerically dependent columns) are dropped. Skinny products on the device, no tall QR."""
    lam, vecs = _eigh_small(y.T @ y)
    keep = (lam > lam[-1].clamp_min(1e-300) * 1e-10).cpu()  # the number kept decides a shape: one sync
    y = y @ (vecs[:, keep] / lam[keep].sqrt())
    # y is now orthonormal up to ~cond^2 * 1e-16 (cond <= 1e5 after the cut): one Cholesky QR step, exactly
    # stable at that conditioning and far cheaper than a second eigh on a GPU, finishes the job
    return _orthonormalize_block(y)


def _cuts(cum_gain: torch.Tensor, gain_hist: torch.Tensor, targets: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the ranking reaches each of `targets` (int64, units of FIXED_ONE) of summed gain: (index of the crossing
    bin, fraction of that bin's gain still wanted), device tensors of targets' length. Bins before the crossing bin
    are taken whole. `cum_gain` is non-decreasing, so the crossing bin is a binary search."""
    idx = torch.searchsorted(cum_gain, targets)  # number of bins with cum_gain < target
    i = idx.clamp(max=NBINS - 1)
    incl = cum_gain[i]
    excl = incl - gain_hist[i]
    frac = (targets - excl).double() / (incl - excl).clamp_min(1).double()
    return idx, torch.where(idx >= NBINS, 0.0, frac)


def _tiebreak(flat: torch.Tensor) -> torch.Tensor:
    """A fixed pseudo-random number in [0, 1) per element (from its position) that picks a fraction of a bin."""
    h = ((flat % 65521) * 40503 + (flat // 65521) * 30011) % 65536
    return h.double() / 65536.0


class _RtnChunks:
    """RTN value (fp16) and its error e = rtn - w (float32, exact) of `w2`, row chunk by row chunk. On a GPU the
    chunks are computed once and kept (6 bytes per element) for the three passes that need them (pool, RTN error
    matrix, final assembly); on the CPU they are recomputed each time so that memory stays at one chunk."""

    def __init__(self, w2: torch.Tensor):
        self.w2 = w2
        self.chunks = _row_chunks(*w2.shape, w2.device)
        self._keep = w2.device.type == "cuda"
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __iter__(self):
        for c, (r0, r1) in enumerate(self.chunks):
            qe = self._cache.get(c)
            if qe is None:
                ws = self.w2[r0:r1]
                q = ws.to(torch.float16)
                qe = (q, torch.sub(q, ws))  # promoted to float32 inside the kernel: exact
                if self._keep:
                    self._cache[c] = qe
            yield r0, r1, qe

    def rtn(self) -> torch.Tensor:
        """The whole RTN tensor [m, n] fp16 (with one chunk, the chunk itself: this object's own)."""
        if len(self.chunks) == 1:
            return next(iter(self))[2][0]
        q = torch.empty(self.w2.shape, dtype=torch.float16, device=self.w2.device)
        for r0, r1, (rtn, _) in self:
            q[r0:r1] = rtn
        return q


def _pool_cost(k: int) -> float:
    """The candidate pool's cost limit for top-k mode. MiniLM, mean top-k ratio by limit: k=1 0.0554 / 0.0558
    (0.05 / 0.025); k=3 0.158 / 0.160 / 0.166 / 0.209 (0.1 / 0.075 / 0.05 / 0.025). Each pass's work scales with
    the pool."""
    return min(POOL_COST * k, POOL_COST_MAX)


def _near_midpoint(ws: torch.Tensor, pool_cost: float) -> torch.Tensor:
    """Elements of float32 `ws` that lie within pool_cost / 2 of an fp16 gap from a rounding midpoint, i.e. whose
    flip to the other neighbour costs less than pool_cost of the squared gap (d (2e + d) < pool_cost d^2). Read off
    the 13 low mantissa bits (the part fp16 drops; the midpoint is 0x1000) with integer operations: exact in fp16's
    normal range; an fp16-subnormal element is tested against the same bits (harmless: the pool is only a
    shortlist, each member's flip is costed exactly). Exact values (low bits 0) are never in it."""
    half = 1 << 12
    band = int(pool_cost * half)  # |low - half| < pool_cost * half
    low = torch.bitwise_and(ws.view(torch.int32), 2 * half - 1)
    return low.sub_(half).abs_() <= (band if band < pool_cost * half else band - 1)


def _candidate_pool(w2: torch.Tensor, chunks: "_RtnChunks", pool_cost: float) -> tuple[torch.Tensor, ...]:
    """The elements worth considering (`_near_midpoint`), compacted: (flat index, e, d, rtn, other, RTN relF) with
    e, d float64 and rtn, other float16 (see `neighbours`). About `pool_cost` of the inexact elements;
    the flips the passes choose are almost all far cheaper than the pool's limit. One host sync (the pool's size)
    per tensor."""
    m, n = w2.shape
    idx = []
    sums = torch.zeros(2, dtype=torch.float64, device=w2.device)
    for r0, r1, (_, e) in chunks:
        ws = w2[r0:r1].reshape(-1)
        sums += torch.stack([torch.dot(e.view(-1), e.view(-1)).double(), torch.dot(ws, ws).double()])
        idx.append(torch.nonzero(_near_midpoint(ws, pool_cost)).view(-1) + r0 * n)
    idx = torch.cat(idx)
    e_sq, w_sq = sums.tolist()
    rtn_rel = (e_sq / w_sq) ** 0.5 if w_sq > 0 else 0.0
    rtn, other, e, d = neighbours(w2.reshape(-1)[idx])
    return idx, e.double(), d.double(), rtn, other, rtn_rel


def _topk(w2: torch.Tensor, k: int, passes: int, cancel: CancelHook | None) -> tuple[torch.Tensor, dict]:
    m, n = w2.shape
    dev = w2.device
    chunks = _RtnChunks(w2)
    flat, e, d, rtn_pool, other_pool, rtn_rel = _candidate_pool(w2, chunks, _pool_cost(k))
    # nothing worth moving: no inexact element (BF16 values in fp16's normal range) or an RTN error that is already
    # negligible (BF16 at scale 1, where only fp16 subnormals round): RTN, no basis needed
    if flat.numel() == 0 or rtn_rel <= NEGLIGIBLE_REL:
        return chunks.rtn(), _nothing_to_move(k)
    graphs = _device_graphs(dev)
    u, v = principal_basis(w2, k, graphs=graphs)
    check = _check_basis(w2, k, u, v, graphs)
    if check.withheld is not None:
        return chunks.rtn(), _withheld(k, check)

    mat = torch.zeros(k, k, dtype=torch.float64, device=dev)  # U^T (Q - W) V of RTN
    mat_check = torch.zeros(k, k, dtype=torch.float64, device=dev)  # the same in the check's basis
    rtn_sq = torch.zeros((), dtype=torch.float64, device=dev)
    ev_sq = torch.zeros((), dtype=torch.float64, device=dev)        # ||E V_c||^2, for the figure's uncertainty
    etu = torch.zeros(k, n, dtype=torch.float64, device=dev)        # U_c^T E
    for r0, r1, (_, e_rows) in chunks:
        e64 = e_rows.double()
        mat += u[r0:r1].T @ (e64 @ v)
        ecv = e64 @ check.v
        mat_check += check.u[r0:r1].T @ ecv
        ev_sq += (ecv * ecv).sum()
        etu += check.u[r0:r1].T @ e64
        rtn_sq += torch.dot(e64.view(-1), e64.view(-1))

    count = flat.numel()
    size = count if graphs is None else _bucket(count)
    key = ("search", m, n, k, size)
    s = _Search(m, n, k, size, dev, graphs)
    # the inputs of this tensor; padding (pool bucket beyond `count`) is inert: d = 0 gives no gain and no cost
    for name, src in (("flat", flat), ("e", e), ("d", d)):
        dst = getattr(s, name)
        dst[:count].copy_(src)
        if size > count:
            dst[count:].zero_()
    s.u.copy_(u)
    s.v.copy_(v)
    s.mat_rtn.copy_(mat)
    s.rtn_sq.copy_(rtn_sq)
    if (graphs is not None and graphs.worth_capturing(key) and graphs.ensure(key + ("setup",), s.setup)
            and graphs.ensure(key + ("pass",), s.one_pass)):  # its warm-up ran a pass: setup below starts afresh
        graphs.replay(key + ("setup",))
        step = lambda: graphs.replay(key + ("pass",))  # noqa: E731
    else:
        s.setup()
        step = s.one_pass
    done_passes = 0
    for _ in range(passes):
        _check(cancel)
        step()
        done_passes += 1
        # a pass that flips nothing leaves the state as it was, so every later pass would repeat it: on the CPU,
        # where asking costs nothing, stop (same bytes); on a GPU the remaining passes run without a host sync
        if dev.type == "cpu" and int(s.chosen) == len(STEPS):
            break

    # RTN everywhere, then the pool's elements take their choice (one scatter over the pool, not a pass over W)
    flipped = s.flipped[:count]
    q = chunks.rtn()
    # the figure the report prints, in the check's basis: M_check of RTN plus each flip's d u_row v_col^T
    rows, cols = torch.div(flat, n, rounding_mode="floor"), torch.remainder(flat, n)
    fd = torch.where(flipped, d, 0.0)
    mat_check_q = mat_check + (check.u.index_select(0, rows) * fd[:, None]).T @ check.v.index_select(0, cols)
    stats = torch.stack([s.mat.norm(), s.mat_rtn.norm(), torch.count_nonzero(flipped).double(),
                         s.spent / s.rtn_sq.clamp_min(1e-300), mat_check_q.norm(), mat_check.norm(),
                         s.used.double(), ev_sq.sqrt() + etu.norm()]).tolist()  # one sync
    own, own_rtn, flips, extra, verified, verified_rtn, used, spread = stats
    ratio = verified / verified_rtn if verified_rtn > 0 else 1.0
    # first order, an error of angle t in the check's basis moves ||U^T E V|| by at most t (||E V|| + ||E^T U||)
    # (RTN's E; the stored one differs from it in a few hundredths of a percent of elements)
    uncertainty = check.sin_bound * spread / verified_rtn if verified_rtn > 0 else 0.0
    info = {
        "method": "topk",
        "top_k": k,
        "iterations": done_passes,
        "passes_used": int(used),
        "topk_ratio": ratio,
        "topk_ratio_search_basis": own / own_rtn if own_rtn > 0 else 1.0,
        "topk_check": check.how + (f"; figure +- {uncertainty:.1g}" if check.sin_bound > 0 else ""),
        "topk_ratio_uncertainty": uncertainty,
        "search_basis_off": check.search_off,  # sin of the largest angle between the search's and the check's basis
        "spectral_gap": check.gap,
        "flips": int(flips),
        "extra_frobenius": extra,
    }
    why = None
    if flips and ratio >= 1.0:
        why = f"the search did not lower the checked top-{k} error ({ratio:.3g}x RTN's, {check.how})"
    elif uncertainty > FIGURE_UNCERTAIN:
        why = f"the check pins the figure down to +- {uncertainty:.2g} only ({check.how})"
    if why is not None:  # nothing it can stand behind: keep RTN
        info.update(topk_ratio=None, flips=0, extra_frobenius=0.0, passes_used=0,
                    topk_check=f"withheld: {why}; kept round-to-nearest")
        return q, info
    q.view(-1).index_put_((flat,), torch.where(flipped, other_pool, rtn_pool))
    return q, info


def _withheld(k: int, check: _Check) -> dict:
    return {"method": "topk", "top_k": k, "iterations": 0, "passes_used": 0, "topk_ratio": None,
            "topk_check": check.withheld + "; kept round-to-nearest", "spectral_gap": check.gap, "flips": 0,
            "extra_frobenius": 0.0}


class _Search:
    """State of the flip search over one candidate pool of `size` elements, held in tensors that `setup` and
    `one_pass` only update in place: on a GPU each is captured once as a CUDA graph per (shape, k, pool bucket) and
    replayed for every tensor that falls in that bucket (see `_DeviceGraphs`); on the CPU they simply run.

    Inputs (written by the caller): flat (pool element positions in the [m, n] weight), e, d (its RTN error and the step to
    the other neighbour, float64), u [m, k], v [n, k], mat_rtn = U^T (Q_rtn - W) V, rtn_sq = ||Q_rtn - W||^2.
    Outputs: flipped (which pool elements take the other neighbour), mat (U^T (Q - W) V), spent (extra squared
    error), chosen (the step the last pass took; len(STEPS): none)."""

    def __init__(self, m: int, n: int, k: int, size: int, dev: torch.device, graphs: "_DeviceGraphs | None"):
        f64, i64 = torch.float64, torch.int64

        def buf(name, shape, dtype):
            if graphs is not None:
                return graphs.buffer(name, shape, dtype)
            return torch.empty(shape, dtype=dtype, device=dev)

        self.k, self.n = k, n
        self.flat = buf("flat", (size,), i64)
        self.e, self.d, self.cost, self.pick = (buf(x, (size,), f64) for x in ("e", "d", "cost", "pick"))
        self.u, self.v = buf("u", (m, k), f64), buf("v", (n, k), f64)
        # [size, k*k + 1]: a flip's change of M (d u_row v_col^T, fixed for the whole search) and its cost
        self.change_cost = buf("change_cost", (size, k * k + 1), f64)
        self.change = self.change_cost[:, : k * k]
        self.flipped = buf("flipped", (size,), torch.bool)
        self.spread = buf("spread", (size,), i64)  # a bin for non-candidates (they add 0), spread out
        self.base = buf("base", (size,), i64)      # start of element i's histogram copy
        self.mat, self.mat_rtn = buf("mat", (k, k), f64), buf("mat_rtn", (k, k), f64)
        self.rtn_sq, self.spent, self.budget = (buf(x, (), f64) for x in ("rtn_sq", "spent", "budget"))
        self.chosen = buf("chosen", (), i64)
        self.used = buf("used", (), i64)  # passes that flipped something
        self.targets = buf("targets", (len(STEPS),), i64)
        self.levels = buf("levels", (len(STEPS),), i64)
        # prefix sums over the levels as one product: row j sums levels j+1..S (prefix j+1); the last row is "none"
        self.suffix = buf("suffix", (len(STEPS) + 1, len(STEPS)), f64)

    def setup(self) -> None:
        s, k, d = self, self.k, self.d
        # extra squared error of each flip (>= 0: RTN is nearest), plus a sliver of the squared gap so that exact
        # ties (cost 0) are still ranked among themselves by their gain
        s.cost.copy_(d * (2.0 * s.e + d) + TIE_COST * d * d)
        s.pick.copy_(_tiebreak(s.flat))
        # flipping pool element i changes M by d_i u_{row i} v_{col i}^T: one product per pass then gives every
        # element's gain, and one more the change of M of each step's prefix
        ud = s.u.index_select(0, torch.div(s.flat, s.n, rounding_mode="floor"))
        vc = s.v.index_select(0, torch.remainder(s.flat, s.n))
        s.change.view(-1, k, k).copy_(ud[:, :, None] * vc[:, None, :] * d[:, None, None])
        s.change_cost[:, k * k].copy_(s.cost)
        pos = torch.arange(len(s.flat), device=d.device)
        torch.remainder(pos, NBINS, out=s.spread)
        torch.remainder(pos, REPLICAS, out=s.base).mul_(2 * NBINS)
        s.flipped.zero_()
        s.mat.copy_(s.mat_rtn)
        s.spent.zero_()
        s.budget.copy_(FROB_BUDGET * s.rtn_sq)
        s.chosen.fill_(len(STEPS))
        s.used.zero_()
        for j, t in enumerate(STEPS):  # constants, set on the device (no host copy inside a graph)
            s.targets[j].fill_(int(t * FIXED_ONE))
        torch.arange(1, len(STEPS) + 1, out=s.levels)
        s.suffix.fill_(1.0)
        s.suffix.triu_()  # (S + 1) x S: the last row comes out zero

    def one_pass(self) -> None:
        """One refinement pass. Reads and updates `mat`, `spent`, `flipped`, `chosen` in place and never waits
        for the host."""
        s, k, mat, cost = self, self.k, self.mat, self.cost
        # first order: flipping element (i, j) changes M by d_ij u_i v_j^T and ||M||^2 by 2 d_ij (U M V^T)_ij;
        # a set of flips whose summed gain is ||M||^2 would take M to zero if all its parts were aligned
        gain_unit = FIXED_ONE / (mat * mat).sum().clamp_min(1e-300)
        cost_unit = FIXED_ONE / (s.budget - s.spent).clamp_min(1e-300)
        gain = -(s.change @ mat.reshape(-1))
        gu, cu = gain * gain_unit, cost * cost_unit
        cand = (gain > 0) & (gu < FIXED_ONE) & (cu <= FIXED_ONE) & ~s.flipped
        b = (NBINS - 1) - ((gain / cost).view(torch.int64) >> MANTISSA_SHIFT)  # bin 0: the best ratios
        index = torch.where(cand, b, s.spread) + s.base
        # gain and cost histograms side by side, filled by one integer scatter (exact and order-free) into
        # REPLICAS copies that are summed after; one scan over both (the cost half minus the gain total)
        hist = torch.zeros(REPLICAS * 2 * NBINS, dtype=torch.int64, device=mat.device)
        hist.scatter_add_(0, torch.cat([index, index + NBINS]),
                          torch.where(torch.cat([cand, cand]), torch.cat([gu.floor(), cu.ceil()]), 0.0).long())
        hist = hist.view(REPLICAS, 2 * NBINS).sum(0)
        cum = torch.cumsum(hist, 0)
        gain_hist, cum_gain = hist[:NBINS], cum[:NBINS]
        by_cost = torch.count_nonzero(cum[NBINS:] - cum[NBINS - 1] <= FIXED_ONE)
        # nested prefixes of the ranking (full first-order step, then shorter ones), all at once: level = in how
        # many of the prefixes an element is. The prefix that leaves the smallest ||M|| is taken, or none: each
        # pass can only lower the objective
        affordable = cand & (b < by_cost)
        idx, frac = _cuts(cum_gain, gain_hist, s.targets)
        inside = (b[None] < idx[:, None]) | ((b[None] == idx[:, None]) & (s.pick[None] < frac[:, None]))
        level = (inside & affordable[None]).sum(0)
        onehot = (level[:, None] == s.levels[None]).double()  # [N, S]: column r - 1 marks level == r
        # change of M and cost of each prefix (rows 0..S-1: prefixes 1..S; row S: no flips), [S + 1, k*k + 1]
        delta = s.suffix @ (onehot.T @ s.change_cost)
        resid = ((mat.reshape(1, -1) + delta[:, : k * k]) ** 2).sum(1)
        i = (len(STEPS) - torch.argmin(resid.flip(0))).view(1)  # ties go to fewer flips
        s.flipped.logical_or_(level >= i + 1)
        step = delta.index_select(0, i)[0]
        mat.add_(step[: k * k].view(k, k))
        s.spent.add_(step[k * k])
        s.chosen.copy_(i[0])
        s.used.add_((i[0] < len(STEPS)).long())


def _check(cancel: CancelHook | None) -> None:
    if cancel is not None and cancel() is True:
        from .errors import Cancelled
        raise Cancelled("cancelled during rounding")


def topk_error(w2: torch.Tensor, q2: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> float:
    """||U^T (Q - W) V|| in float64 for fp16 `q2` against float32 `w2` (both [m, n], same scale)."""
    e = q2.double() - w2.double()
    return float((u.T @ e @ v).norm())


# ---------------------------------------------------------------------------------------------------------------
# CUDA graphs: the fixed-shape parts of the default mode, captured once and replayed
#
# A tensor's top-k rounding is a few hundred small kernels; launched one by one from Python, the host's launch
# overhead (not the GPU) sets the time. The Krylov basis (shape [m, n]) and the flip search (shape: the candidate
# pool, padded to a bucket of 8 per octave) only depend on shapes, so they are captured as CUDA graphs the second
# time a shape comes up and replayed for every later tensor of that shape: a FLUX or T5 file repeats each layer
# shape dozens of times. Inputs and state live in per-device buffers shared by all graphs (graphs run one after
# the other on one stream); when a buffer has to grow, every graph is dropped and captured again.


def _bucket(count: int) -> int:
    """The padded pool size for `count` candidates: the next of 8 sizes per octave, a multiple of 1024."""
    if count <= 1024:
        return 1024
    size = 2.0 ** (math.ceil(math.log2(count) * GRAPH_BUCKETS_PER_OCTAVE) / GRAPH_BUCKETS_PER_OCTAVE)
    return max(count, -(-int(math.ceil(size)) // 1024) * 1024)


class _DeviceGraphs:
    def __init__(self, device: torch.device):
        self.device = device
        self._buffers: dict[str, torch.Tensor] = {}
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._seen: dict[tuple, int] = {}
        self._constants: dict[tuple, torch.Tensor] = {}
        self._pool = torch.cuda.graph_pool_handle()
        self._stream = torch.cuda.Stream(device)
        self.captures = 0
        self.disabled = False

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A view of the shared buffer `name` (grown by a quarter beyond need when too small; growing drops
        every graph, since they hold the old addresses)."""
        nbytes = max(1, math.prod(shape)) * dtype.itemsize
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < nbytes:
            self._drop_graphs()
            grown = nbytes if buf is None else max(nbytes, buf.numel() + buf.numel() // 4)
            del buf
            self._buffers.pop(name, None)
            buf = self._buffers[name] = torch.empty(grown, dtype=torch.uint8, device=self.device)
        return buf[:nbytes].view(dtype)[: math.prod(shape)].view(shape)

    def constant(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A tensor made once per key on the CPU and kept on the device."""
        t = self._constants.get(key)
        if t is None:
            t = self._constants[key] = make().to(self.device)
        return t

    def worth_capturing(self, key: tuple) -> bool:
        """Capture on a key's second use: a shape that comes up once runs eagerly (capturing costs a few runs)."""
        if key in self._graphs:
            return True
        if self.disabled:
            return False
        self._seen[key] = self._seen.get(key, 0) + 1
        return self._seen[key] >= 2

    def ensure(self, key: tuple, fn: Callable[[], None]) -> bool:
        """Capture `fn` under `key` unless captured; True when a graph is ready to replay. A capture runs `fn` once
        for warm-up (lazy library set-up stays out of the graph), so `fn`'s effects must be made good by the
        caller. If capturing fails (a PyTorch or driver without support for some operation), graphs are switched
        off for this device with a warning and the caller runs `fn` eagerly: same results, more launches."""
        if key in self._graphs:
            return True
        if self.disabled:
            return False
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(self._stream):
                fn()
                # thread-local: the converter's reader thread may use the device meanwhile
                graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    fn()
                finally:
                    graph.capture_end()
        except Exception as exc:  # noqa: BLE001 - any capture failure means: run eagerly
            current.wait_stream(self._stream)
            self.disabled = True
            self._drop_graphs()
            warnings.warn(f"quant_core: CUDA graph capture failed on {self.device} ({exc}); the learned rounding "
                          "runs without graphs (same results, slower)", RuntimeWarning, stacklevel=2)
            return False
        current.wait_stream(self._stream)
        self._graphs[key] = graph
        self.captures += 1
        return True

    def replay(self, key: tuple) -> None:
        self._graphs[key].replay()

    def _drop_graphs(self) -> None:
        if self._graphs:
            torch.cuda.current_stream(self.device).synchronize()
            self._graphs.clear()
            self._pool = torch.cuda.graph_pool_handle()

    def release(self) -> None:
        self._drop_graphs()
        self._buffers.clear()
        self._seen.clear()
        self._constants.clear()


_GRAPHS: dict[torch.device, _DeviceGraphs] = {}


def _device_graphs(dev: torch.device) -> "_DeviceGraphs | None":
    if dev.type != "cuda" or not USE_CUDA_GRAPHS:
        return None
    dev = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
    graphs = _GRAPHS.get(dev)
    if graphs is None:
        graphs = _GRAPHS[dev] = _DeviceGraphs(dev)
    return graphs


def release_device_memory() -> None:
    """Drop the captured graphs and their buffers (the converter calls this when a conversion ends)."""
    for graphs in _GRAPHS.values():
        graphs.release()
    _GRAPHS.clear()


# ---------------------------------------------------------------------------------------------------------------
# calibrated mode: GPTQ-style error feedback on the fp16 grid


def _calibrated(w2: torch.Tensor, cal: "LayerCalibration", num_iter: int, cancel: CancelHook | None
                ) -> tuple[torch.Tensor | None, dict]:
    """GPTQ on the fp16 grid for objective E||(Q - W) x||^2 (raw second moment, shrunk towards its diagonal), then
    coordinate-descent refinement.

    With a split file (see calibration.py) the layer is first rounded on the fit half alone and measured on the
    other half, rows that rounding never saw; if that held-out error is not below RTN's, returns (None, info) and
    the caller rounds the layer as without calibration. Otherwise the layer is rounded on all calibration tokens and
    the held-out figure is what the report gives (a cross-validated estimate: it is measured for the half fit).
    """
    from .calibration import output_errors

    check = None
    if HELD_OUT_CHECK and cal.has_split:
        (fit_mean, fit_gram), (rest_mean, rest_gram) = cal.halves()
        q_fit, _ = _gptq_fp16(w2, fit_gram, num_iter, cancel)
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
    q, info = _gptq_fp16(w2, cal.gram, num_iter, cancel)
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


def _objective(gram: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """The matrix the rounding minimises tr(E H E^T) for: the raw second moment E[x x^T] (the mean error is part of
    the objective, so no bias correction is needed to control it), shrunk towards its diagonal by SHRINK (a sample
    of text over-fits the off-diagonal structure; the diagonal, RTN-like part carries over to other text), plus
    DAMP of the mean diagonal. Inputs that never fire get a unit diagonal (their columns keep RTN anyway)."""
    h = gram.to(device=dev, dtype=torch.float64)
    diag = torch.diagonal(h).clone()
    h = (1.0 - SHRINK) * h
    h.diagonal().add_(SHRINK * diag + DAMP * diag.mean())
    dead = diag <= 0
    h[dead, dead] = 1.0
    return h


def _gptq_fp16(w2: torch.Tensor, gram: torch.Tensor, num_iter: int, cancel: CancelHook | None
               ) -> tuple[torch.Tensor, dict]:
    m, n = w2.shape
    dev = w2.device
    dtype = torch.float64 if m * n * n <= FP64_WORK else torch.float32
    h = _objective(gram, dev)
    dead = torch.diagonal(gram) <= 0
    rtn, _, e, d = neighbours(w2)
    rtn64, d64 = rtn.to(dtype), d.to(dtype)
    d64[:, dead.to(dev)] = 0.0  # inputs that never fire: nothing to learn, keep RTN
    w64, h = w2.to(dtype), h.to(dtype)
    flips = _gptq(w64, h, rtn64, d64, cancel)
    sweeps = 0
    for _ in range(min(num_iter - 1, REFINE_SWEEPS)):
        _check(cancel)
        changed = _refine_sweep(w64, h, rtn64, d64, flips)
        sweeps += 1
        if not changed:
            break
    q = torch.where(flips, (rtn64 + d64).to(torch.float16), rtn)
    return q, {"method": "gptq", "iterations": 1 + sweeps, "shrink": SHRINK, "damp": DAMP,
               "flips": int(torch.count_nonzero(flips))}


def _gptq(w: torch.Tensor, h: torch.Tensor, rtn: torch.Tensor, d: torch.Tensor, cancel: CancelHook | None
          ) -> torch.Tensor:
    """Error feedback (GPTQ) where each element may only take its RTN value or the other fp16 neighbour.

    Columns are visited in descending order of H's diagonal (act-order); the rounding error of each column, scaled
    by the inverse Hessian's Cholesky factor, is pushed onto the columns not yet rounded. Returns the flip mask.
    """
    m, n = w.shape
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    w, rtn, d = w[:, perm].clone(), rtn[:, perm], d[:, perm]
    h = h[perm][:, perm]
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    u = torch.linalg.cholesky(hinv, upper=True)
    flips = torch.zeros(m, n, dtype=torch.bool, device=w.device)
    for i1 in range(0, n, BLOCK):
        _check(cancel)
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
    return out


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
    from .calibration import output_errors

    err, ref = output_errors(w2, q.float(), mean, gram)
    err_rtn, _ = output_errors(w2, w2.to(torch.float16).float(), mean, gram)
    return {"output_error_on": on, "output_rel_error": err / ref if ref > 0 else 0.0,
            "rtn_output_rel_error": err_rtn / ref if ref > 0 else 0.0,
            "output_error_ratio": err / err_rtn if err_rtn > 0 else 1.0}


# ---------------------------------------------------------------------------------------------------------------
# synthetic calibration rows (report only)


OUT_RANDN_CPU_FLOP = 2e10  # on the CPU, out(randn) is measured only for tensors up to this cost (~0.3 s on 2 cores)


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
