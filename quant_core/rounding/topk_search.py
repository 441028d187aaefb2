"""Default mode: keep RTN's Frobenius error almost unchanged while driving the error along the top-k principal
directions of W, ``||U_k^T (Q - W) V_k||``, towards zero.

A few passes of "flip the elements with the best gain per unit of extra Frobenius error until the first-order gain
covers what is left"; the threshold is found from an integer histogram on the device, so no pass waits for the
host. On a GPU the search's fixed-shape parts run as CUDA graphs (graphs.py).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import check_cancel
from .graphs import DeviceGraphs, bucket, device_graphs
from .grid import NEGLIGIBLE_REL, RtnChunks, candidate_pool
from .topk_basis import Check, check_basis, principal_basis

FIGURE_UNCERTAIN = 0.05  # the checked figure must be pinned down to this (absolute, on the ratio), else RTN is kept
# The gain/cost ratio is binned by its float64 bit pattern: sign-free exponent plus the top 5 mantissa bits, i.e.
# 32 bins per octave, monotone in the ratio, covering every positive float64 (no log needed).
MANTISSA_SHIFT = 52 - 5
NBINS = 1 << (11 + 5)
REPLICAS = 8            # copies of the histogram, element i adds to copy i % REPLICAS (less atomic contention)
FIXED_ONE = 1 << 32      # fixed-point unit of gain and cost sums (integer sums are exact and order-free)
TIE_COST = 2.0 ** -16   # added to every flip's cost, in units of its squared fp16 gap (see topk)
POOL_COST = 0.025       # candidate pool: flips costing less than k times this fraction of the squared fp16 gap
POOL_COST_MAX = 0.1     # ... at most this fraction (k directions need more candidates; see grid.near_midpoint)
STEPS = (1.0, 0.5, 0.25) # first-order step fractions tried by each pass's line search
FROB_BUDGET = 0.01       # extra squared Frobenius error allowed, relative to RTN's (relF at most ~1.005x RTN)

CancelHook = Callable[[], object]


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



def _pool_cost(k: int) -> float:
    """The candidate pool's cost limit for top-k mode: more directions need more candidates (docs/rounding.md has
    the top-k ratio by limit on MiniLM). Each pass's work scales with the pool."""
    return min(POOL_COST * k, POOL_COST_MAX)



def topk(w2: torch.Tensor, k: int, passes: int, cancel: CancelHook | None, use_graphs: bool = True
         ) -> tuple[torch.Tensor, dict]:
    """Round `w2` ([m, n] float32, already divided by its scale) to fp16 in top-`k` mode with at most `passes`
    search passes. Returns (q fp16 [m, n], info for the report). `use_graphs`: CUDA graphs where w2 is on a GPU."""
    m, n = w2.shape
    dev = w2.device
    chunks = RtnChunks(w2)
    flat, e, d, rtn_pool, other_pool, rtn_rel = candidate_pool(w2, chunks, _pool_cost(k))
    # nothing worth moving: no inexact element (BF16 values in fp16's normal range) or an RTN error that is already
    # negligible (BF16 at scale 1, where only fp16 subnormals round): RTN, no basis needed
    if flat.numel() == 0 or rtn_rel <= NEGLIGIBLE_REL:
        return chunks.rtn(), nothing_to_move(k)
    graphs = device_graphs(dev) if use_graphs else None
    u, v = principal_basis(w2, k, graphs=graphs)
    check = check_basis(w2, k, u, v, graphs)
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
    size = count if graphs is None else bucket(count)
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
        check_cancel(cancel)
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


def nothing_to_move(k: int) -> dict:
    """The info of a tensor left at RTN without a search: no inexact element, or RTN's error already negligible."""
    return {"method": "nothing_to_move", "top_k": k, "iterations": 0, "passes_used": 0, "topk_ratio": 1.0,
            "flips": 0, "extra_frobenius": 0.0}


def _withheld(k: int, check: Check) -> dict:
    return {"method": "topk_withheld", "top_k": k, "iterations": 0, "passes_used": 0, "topk_ratio": None,
            "topk_check": check.withheld + "; kept round-to-nearest", "spectral_gap": check.gap, "flips": 0,
            "extra_frobenius": 0.0}


class _Search:
    """State of the flip search over one candidate pool of `size` elements, held in tensors that `setup` and
    `one_pass` only update in place: on a GPU each is captured once as a CUDA graph per (shape, k, pool bucket) and
    replayed for every tensor that falls in that bucket (see `DeviceGraphs`); on the CPU they simply run.

    Inputs (written by the caller): flat (pool element positions in the [m, n] weight), e, d (its RTN error and the step to
    the other neighbour, float64), u [m, k], v [n, k], mat_rtn = U^T (Q_rtn - W) V, rtn_sq = ||Q_rtn - W||^2.
    Outputs: flipped (which pool elements take the other neighbour), mat (U^T (Q - W) V), spent (extra squared
    error), chosen (the step the last pass took; len(STEPS): none)."""

    def __init__(self, m: int, n: int, k: int, size: int, dev: torch.device, graphs: "DeviceGraphs | None"):
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
