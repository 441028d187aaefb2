"""The fp16 grid a weight is rounded on: each element's two neighbouring fp16 values, round-to-nearest by row
chunks, and the shortlist of elements close enough to a rounding midpoint to be worth flipping."""

from __future__ import annotations

import torch

NEGLIGIBLE_REL = 2.0 ** -20  # RTN relF below this (e.g. BF16 at scale 1: only subnormals inexact): keep RTN


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


def row_chunks(m: int, n: int, device: torch.device):
    budget = (1 << 26) if device.type == "cuda" else (1 << 18)
    step = max(1, budget // max(n, 1))
    return [(i, min(i + step, m)) for i in range(0, m, step)]



class RtnChunks:
    """RTN value (fp16) and its error e = rtn - w (float32, exact) of `w2`, row chunk by row chunk. On a GPU the
    chunks are computed once and kept (6 bytes per element) for the three passes that need them (pool, RTN error
    matrix, final assembly); on the CPU they are recomputed each time so that memory stays at one chunk."""

    def __init__(self, w2: torch.Tensor):
        self.w2 = w2
        self.chunks = row_chunks(*w2.shape, w2.device)
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



def near_midpoint(ws: torch.Tensor, pool_cost: float) -> torch.Tensor:
    """Elements of float32 `ws` that lie within pool_cost / 2 of an fp16 gap from a rounding midpoint, i.e. whose
    flip to the other neighbour costs less than pool_cost of the squared gap (d (2e + d) < pool_cost d^2). Read off
    the 13 low mantissa bits (the part fp16 drops; the midpoint is 0x1000) with integer operations: exact in fp16's
    normal range; an fp16-subnormal element is tested against the same bits (harmless: the pool is only a
    shortlist, each member's flip is costed exactly). Exact values (low bits 0) are never in it."""
    half = 1 << 12
    band = int(pool_cost * half)  # |low - half| < pool_cost * half
    low = torch.bitwise_and(ws.view(torch.int32), 2 * half - 1)
    return low.sub_(half).abs_() <= (band if band < pool_cost * half else band - 1)


def candidate_pool(w2: torch.Tensor, chunks: "RtnChunks", pool_cost: float) -> tuple[torch.Tensor, ...]:
    """The elements worth considering (`near_midpoint`), compacted: (flat index, e, d, rtn, other, RTN relF) with
    e, d float64 and rtn, other float16 (see `neighbours`). About `pool_cost` of the inexact elements;
    the flips the passes choose are almost all far cheaper than the pool's limit. One host sync (the pool's size)
    per tensor."""
    m, n = w2.shape
    idx = []
    sums = torch.zeros(2, dtype=torch.float64, device=w2.device)
    for r0, r1, (_, e) in chunks:
        ws = w2[r0:r1].reshape(-1)
        sums += torch.stack([torch.dot(e.view(-1), e.view(-1)).double(), torch.dot(ws, ws).double()])
        idx.append(torch.nonzero(near_midpoint(ws, pool_cost)).view(-1) + r0 * n)
    idx = torch.cat(idx)
    e_sq, w_sq = sums.tolist()
    rtn_rel = (e_sq / w_sq) ** 0.5 if w_sq > 0 else 0.0
    rtn, other, e, d = neighbours(w2.reshape(-1)[idx])
    return idx, e.double(), d.double(), rtn, other, rtn_rel
