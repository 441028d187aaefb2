"""The top-k principal directions of a weight: the basis the search uses, and the independent check of it.

The search's basis comes from the exact SVD (short side up to EXACT_BASIS_DIM) or a seeded randomized block Krylov
iteration; the check, which gives the figure the report prints, uses a basis the search did not use (the exact
float64 SVD, or a Krylov space of another seed with twice the steps and a convergence bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import grid

if TYPE_CHECKING:
    from .graphs import DeviceGraphs

BASIS_ITERS = 8          # block Krylov steps for the top-k basis (each: two skinny products with W)
OVERSAMPLE = 6           # extra vectors per Krylov block
BASIS_SEED = 20240601
EXACT_BASIS_DIM = 512    # up to this short side the exact basis (eigh of the small Gram matrix) is used
# the independent check of the top-k figure (see `check_basis`): a basis the search did not use
CHECK_EXACT_DIM = 512    # up to this short side: an exact float64 SVD (LAPACK / cuSOLVER), else block Krylov:
CHECK_ITERS = 16         # ... steps, twice the search's,
CHECK_SEED = 7919        # ... from a start block of its own seed,
CHECK_CONVERGED = 1e-3   # ... counted as converged when its residual bound on sin(angle) to the true top-k pair is
                         # at most this (float64 Krylov with its 1e-10 Gram cut reaches ~1e-5 relative residuals)


def principal_basis(w2: torch.Tensor, k: int, iters: int = BASIS_ITERS, seed: int = BASIS_SEED,
                    graphs: "DeviceGraphs | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
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


def _krylov_space(w2: torch.Tensor, p: int, iters: int, seed: int, graphs: "DeviceGraphs | None", tag: str,
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
class Check:
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


def check_basis(w2: torch.Tensor, k: int, u: torch.Tensor, v: torch.Tensor, graphs: "DeviceGraphs | None"
                 ) -> Check:
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
        lam, ub = torch.linalg.eigh(b @ b.T)
        lam, ub = lam.flip(0)[: k + 1].clamp_min(0), ub.flip(1)[:, : k + 1]
        sv = lam.sqrt()
        live = sv > sv[0] * 1e-12                          # a weight of rank <= k: no direction beyond its rank
        uc = basis @ ub                                     # W^T uc = vc * sv exactly (Rayleigh-Ritz)
        vc = torch.where(live, b.T @ ub / sv.clamp_min(1e-300), 0.0)
        resid_sq = torch.zeros(k + 1, dtype=torch.float64, device=w2.device)
        for r0, r1 in grid.row_chunks(m, n, w2.device):         # ||W v_i - s_i u_i||, float64, row chunks
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
    check = Check(uc, vc, gap, how, bound)
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
    """Eigenvectors of the k largest eigenvalues of a small symmetric matrix, on its own device (cuSOLVER on a GPU,
    LAPACK on the CPU; a round trip to the host's LAPACK was no faster per tensor, see docs/rounding.md)."""
    _, vecs = torch.linalg.eigh(gram)
    return vecs[:, -k:].flip(1).contiguous()


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
    lam, vecs = torch.linalg.eigh(y.T @ y)
    keep = (lam > lam[-1].clamp_min(1e-300) * 1e-10).cpu()  # the number kept decides a shape: one sync
    y = y @ (vecs[:, keep] / lam[keep].sqrt())
    # y is now orthonormal up to ~cond^2 * 1e-16 (cond <= 1e5 after the cut): one Cholesky QR step, exactly
    # stable at that conditioning and far cheaper than a second eigh on a GPU, finishes the job
    return _orthonormalize_block(y)
