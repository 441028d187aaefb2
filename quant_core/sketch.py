"""Second moments of wide inputs in bounded memory: the top directions of the rows, plus the exact diagonal and mean.

For rows x (activations of one layer input, width `dim`) the calibrated rounding needs H = sum x x^T ([dim, dim]).
`MomentSketch` keeps, in O(rows * dim) memory instead of O(dim^2):

- per part (e.g. the fit half and the rest of the calibration text): ``sum`` = sum x and ``sq`` = sum x*x (the
  exact diagonal of that part's H), float64 [dim];
- ``b`` [<= rows, dim], held in bfloat16: a truncated incremental SVD of all the rows, whichever part they belong to.
  Each block of rows is stacked under b and the stack is cut back to its top `rows` singular directions, kept at
  their full size (``b_i = s_i v_i``). What a cut drops is positive semi-definite with norm ``s_{rows+1}^2``;
  ``discarded`` sums these, so before the rounding to bfloat16 ``0 <= H - b^T b`` (PSD) and
  ``||H - b^T b||_2 <= discarded``. Each rounding to bfloat16 moves b^T b by at most ``||D||_2 (2 ||b||_2 + ||D||_2)``
  (D the rounding's change); ``rounded`` sums these;
- with several parts, one [r, r] weight matrix per part but the last (float16; the last part's is I minus the
  others'): part p's H is ``b^T K_p b``. The parts share the basis, so the statistics of the whole text get all
  `rows` directions (two separate sketches of half the text each would mostly hold the same top directions twice)
  while each part keeps its own second moment within them. A cut projects every part onto the kept directions;
  beyond the shared dropped part this moves a part by its cross terms ``(I - P) H_p P + P H_p (I - P)`` (P onto
  the kept directions), whose norms are computed at each cut and summed in ``cross``;
- or, when ``rows >= dim``, the exact H of each part in float64.

The estimate used downstream is ``b^T K_p b`` (``b^T b`` for all parts together) with its diagonal raised to the
exact one where it falls short (so it stays positive semi-definite; the diagonal is exact up to the estimate's own
error). Its spectral-norm error is at most ``bound`` = discarded + 3 rounded for all parts together: with E = D + R
(D = H - b^T b before rounding, PSD, ||D|| <= discarded; R the rounding's change), the error is (D - diag D) +
(R - diag R) + diag(min(0, E_ii)), of norms <= ||D||, 2 ||R|| and ||R|| (D's diagonal is >= 0). For one part
(``part_bound(p)``) the cross terms and the weights' rounding join R: discarded + 3 (cross + rounded +
weights_rounded).

Why this form (measured on MiniLM, docs/rounding.md "Statistics in bounded memory"): Frequent Directions (Liberty
2013), which lowers every kept direction by the dropped amount at each cut, has an a-priori error guarantee but lost
most of the calibrated rounding's gain at FLUX-dev's bytes per layer; the unshrunk cut matched the best rank-`rows`
approximation of the exact matrix. bfloat16 holds twice the rows per byte of float32, and twice the rows lowered the
calibrated rounding's error far more than the rounding raised it. One basis shared by the fit half and the rest
gave the same calibrated rounding as two sketches of the same rows each, in half the bytes.

Rows arrive in blocks; one eigen-decomposition of the stack's small Gram matrix ([rows + block]^2) per block, on the
device the rows are on.
"""

from __future__ import annotations

import torch

BLOCK_ROWS = 2048  # most rows stacked under the sketch per cut (bounds the transient memory, see transient_bytes)
STORE_DTYPE = torch.bfloat16  # the sketch's rows between blocks and in the file: twice the rows per byte of float32
WEIGHT_DTYPE = torch.float16  # the parts' [r, r] weight matrices (entries within [-1, 1]) between blocks and in
# the file: their rounding is tracked in the bound and is far below the bfloat16 rows'
CHUNK = 1024  # columns of the stack handled at a time in a cut (its float64 copy is never held whole)
MIN_BLOCK_ROWS = 256  # a block is `rows` rows within [MIN_BLOCK_ROWS, BLOCK_ROWS]: one cut per block; a cut's cost
# per row, ~ (rows + block)^2 dim / block for the Gram matrix and the new rows, is least there


class MomentSketch:
    """Streaming sum / diagonal / second-moment sketch of rows of width `dim`, in one or more parts that share one
    basis (see the module docstring)."""

    def __init__(self, dim: int, rows: int, device: torch.device | str | None = None, parts: tuple = ("all",)):
        self.dim, self.rows = int(dim), int(rows)
        self.parts = tuple(parts)
        if not self.parts or len(set(self.parts)) != len(self.parts):
            raise ValueError(f"parts must be distinct names, not {parts!r}")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        zeros = lambda: torch.zeros(self.dim, dtype=torch.float64, device=self.device)  # noqa: E731
        self.counts = {p: 0 for p in self.parts}
        self.sums = {p: zeros() for p in self.parts}
        self.sqs = {p: zeros() for p in self.parts}
        self.discarded = 0.0  # sum of the norms of what the cuts dropped (all parts together)
        self.cross = 0.0  # sum of the bounds on the cuts' cross terms (one part)
        self.rounded = 0.0  # sum of the bfloat16 rounding bounds
        self.weights_rounded = 0.0  # sum of the WEIGHT_DTYPE rounding bounds of the weight matrices
        self.orthogonal = False  # the rows of b are orthogonal (true after a cut)
        self.grams: dict[str, torch.Tensor] | None = None
        self.b: torch.Tensor | None = None
        self.k: torch.Tensor | None = None  # [parts - 1, r, r]: part p's second moment is b^T k[p] b
        if self.exact:
            self.grams = {p: torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)
                          for p in self.parts}
        else:
            self.b = torch.zeros(0, self.dim, dtype=STORE_DTYPE, device=self.device)
            self.k = torch.zeros(len(self.parts) - 1, 0, 0, dtype=WEIGHT_DTYPE, device=self.device)

    # -- totals over the parts -----------------------------------------------------------------------------
    @property
    def count(self) -> int:
        return sum(self.counts.values())

    @property
    def sum(self) -> torch.Tensor:
        return sum(self.sums.values())

    @property
    def sq(self) -> torch.Tensor:
        return sum(self.sqs.values())

    @property
    def gram(self) -> torch.Tensor | None:
        return None if self.grams is None else sum(self.grams.values())

    @property
    def exact(self) -> bool:
        return self.rows >= self.dim

    @property
    def bound(self) -> float:
        """Spectral-norm bound on the error of `second_moment()` (all parts together; 0 when exact)."""
        return self.discarded + 3.0 * self.rounded

    def part_bound(self, part: str) -> float:
        """Spectral-norm bound on the error of `second_moment(part=part)`."""
        if len(self.parts) == 1:
            return self.bound
        return self.discarded + 3.0 * (self.cross + self.rounded + self.weights_rounded)

    @staticmethod
    def held_bytes(dim: int, rows: int, parts: int = 1) -> int:
        """Memory one sketch of `parts` parts holds between blocks."""
        if rows >= dim:
            return parts * (8 * dim * dim + 16 * dim)
        return 2 * rows * dim + 2 * rows * rows * (parts - 1) + parts * 16 * dim

    @staticmethod
    def block_rows(rows: int) -> int:
        return min(BLOCK_ROWS, max(MIN_BLOCK_ROWS, rows))

    @staticmethod
    def transient_bytes(dim: int, rows: int, parts: int = 1) -> int:
        """Extra memory while one block is absorbed: the block in float32, the new rows in bfloat16, the weights
        (their product by u and the new weights, float64), and either (stack of at most `dim` rows) its Gram matrix
        with eigenvectors and workspace, u and three float64 chunks, or (more rows than width) the stack in
        float64, the [dim, dim] decomposition, u, the kept rows in float64 and the cross terms."""
        if rows >= dim:
            return 4 * dim * dim + 4 * BLOCK_ROWS * dim
        block = MomentSketch.block_rows(rows)
        m = rows + block
        common = 4 * block * dim + 2 * rows * dim + (8 * m * rows + 16 * rows * rows) * (parts - 1) + 8 * m * rows
        if m <= dim:
            return common + 24 * m * m + 24 * m * CHUNK
        return common + 8 * m * dim + 24 * dim * dim + 16 * rows * dim + 8 * dim * rows

    # -- rows ----------------------------------------------------------------------------------------------
    def add(self, x: torch.Tensor, part: str | None = None) -> None:
        """Add rows x [n, dim] of `part` (the only part when None; any float dtype; moved to the sketch's device
        block by block)."""
        if part is None:
            if len(self.parts) != 1:
                raise ValueError(f"rows of a sketch of parts {self.parts} need a part")
            part = self.parts[0]
        if part not in self.counts:
            raise ValueError(f"unknown part {part!r} (this sketch holds {self.parts})")
        x = x.reshape(-1, self.dim)
        block = BLOCK_ROWS if self.exact else self.block_rows(self.rows)
        for i in range(0, x.shape[0], block):
            c = x[i:i + block].to(device=self.device, dtype=torch.float32)
            self.counts[part] += c.shape[0]
            self.sums[part] += c.sum(0, dtype=torch.float64)
            self.sqs[part] += (c * c).sum(0, dtype=torch.float64)
            if self.exact:
                self.grams[part] += c.T @ c
            else:
                self._absorb(c, part)

    def _absorb(self, x: torch.Tensor, part: str) -> None:
        self._cut([self.b, x], _Weights(self.k.double(), x.shape[0], self.parts.index(part)), self.rows)

    def _cut(self, pieces: list[torch.Tensor], k: "_Weights", rows: int) -> None:
        """Keep the top `rows` singular directions of the stack m = [pieces] ([r, dim]; all of it while r <= rows,
        not orthogonal then) and carry the parts' weights k (of the stack's rows) into them. When r <= dim the
        stack is never held in float64 whole: its Gram matrix, the new rows and the bounds are built CHUNK columns
        at a time."""
        r = sum(int(t.shape[0]) for t in pieces)
        if r > self.dim:  # more rows than width (narrow inputs): decompose m^T m, m held whole
            m = torch.cat([t.double() for t in pieces])
            lam, v = torch.linalg.eigh(m.T @ m)
            lam, v = lam.flip(0).clamp_min(0.0), v.flip(1)
            keep = min(rows, self.dim)
            s = lam[:keep].sqrt()
            live = s > s[:1].clamp_min(1e-300) * 1e-12
            u = (m @ v[:, :keep]) / torch.where(live, s, torch.ones_like(s))
            u[:, ~live] = 0.0
            self.discarded += float(lam[keep]) if keep < lam.numel() else 0.0
            self._rotate(lambda c0, c1: m[:, c0:c1], u, s, k, orthogonal=True)
            return

        def chunk(c0: int, c1: int) -> torch.Tensor:
            return torch.cat([t[:, c0:c1].double() for t in pieces])

        if r <= rows:  # not yet full: the rows as they came
            self._rotate(chunk, None, None, k.full(), orthogonal=False)
            return
        g = torch.zeros(r, r, dtype=torch.float64, device=self.device)
        for c0 in range(0, self.dim, CHUNK):
            mc = chunk(c0, c0 + CHUNK)
            g += mc @ mc.T
        lam, u = torch.linalg.eigh(g)
        del g
        lam, u = lam.flip(0).clamp_min(0.0), u.flip(1)
        self.discarded += float(lam[rows])
        self._rotate(chunk, u[:, :rows].contiguous(), lam[:rows].sqrt(), k, orthogonal=True)

    def _rotate(self, chunk, u: torch.Tensor | None, s: torch.Tensor | None, k, orthogonal: bool) -> None:
        """New rows b = u^T m (m itself when u is None), rounded to bfloat16 chunk by chunk, the weights u^T k u,
        and the bounds: the rounding's (``rounded``), each part's cross terms (``cross``; with s the singular values
        of the kept directions) and the weights' rounding (``weights_rounded``)."""
        kept = u.shape[1] if u is not None else k.shape[1]
        out = torch.empty(kept, self.dim, dtype=STORE_DTYPE, device=self.device)
        dd = torch.zeros(kept, kept, dtype=torch.float64, device=self.device)  # D D^T (D: the rounding's change)
        bb = torch.zeros(kept, kept, dtype=torch.float64, device=self.device)  # b b^T
        if u is not None:
            ky = k.times(u)  # [parts - 1, r, kept]
            k = u.T @ ky
            zz = torch.zeros(k.shape[0], kept, kept, dtype=torch.float64, device=self.device)
        for c0 in range(0, self.dim, CHUNK):
            mc = chunk(c0, c0 + CHUNK)
            bc = mc if u is None else u.T @ mc
            rc = bc.to(STORE_DTYPE)
            out[:, c0:c0 + CHUNK] = rc
            d = rc.double() - bc
            dd += d @ d.T
            bb += bc @ bc.T
            if u is not None:
                for p in range(k.shape[0]):
                    # part p's cross term (I - P) A_p P with A_p = m^T k_p m and P onto the kept directions V
                    # (m V = u s, b^T = V s): (I - P) A_p V = m^T k_p u s - b^T (u^T k_p u) s
                    z = mc.T @ (ky[p] * s) - bc.T @ (k[p] * s)
                    zz[p] += z.T @ z
        if u is not None:  # ||S_p|| <= 2 ||that||; the last part's is minus the others' summed: the sum bounds all
            self.cross += sum(2.0 * _top_eigenvalue(zz[p]) ** 0.5 for p in range(k.shape[0]))
        d_norm = _top_eigenvalue(dd) ** 0.5
        b_norm = (float(bb.diagonal().max()) if orthogonal else _top_eigenvalue(bb)) ** 0.5 if kept else 0.0
        self.rounded += d_norm * (2.0 * b_norm + d_norm)
        self.b, self.orthogonal = out, orthogonal
        self._set_weights(k, b_norm + d_norm)

    def _set_weights(self, k: torch.Tensor, b_norm: float) -> None:
        """Hold the weights in WEIGHT_DTYPE; b~^T (K~ - K) b~ for every part (the last part's change is minus the
        others' summed) goes to `weights_rounded` (b_norm >= ||b~||)."""
        self.k = k.to(WEIGHT_DTYPE)
        if k.numel():
            dk = float((self.k.double() - k).flatten(1).norm(dim=1).sum())
            self.weights_rounded += dk * b_norm * b_norm

    def resize(self, rows: int) -> None:
        """Keep at most `rows` directions from now on (fewer: cut now; the error bound keeps accumulating)."""
        rows = int(rows)
        if rows == self.rows:
            return
        if self.exact and rows < self.dim:  # exact -> sketch: the top `rows` directions of the parts together
            m, k = self._factor_of_grams()
            self.grams = None
            self.b = torch.zeros(0, self.dim, dtype=STORE_DTYPE, device=self.device)
            self._cut([m], _Weights(k), rows)
        elif not self.exact and rows < self.b.shape[0]:
            self._cut([self.b], _Weights(self.k.double()), rows)
        elif not self.exact and rows >= self.dim:  # room for the full matrices: accumulate them from here on
            self.grams = {p: self._raw_moment(p, torch.float64) for p in self.parts}  # the dropped stays in bounds
            self.b = self.k = None
        self.rows = rows

    def _factor_of_grams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, k) with m^T m = the parts' grams summed and m^T k[p] m = part p's (exact -> sketch)."""
        total = self.gram
        lam, v = torch.linalg.eigh(total)
        keep = lam > lam.max().clamp_min(0.0) * 1e-14
        s = lam[keep].sqrt()
        m = s[:, None] * v[:, keep].T
        inv = v[:, keep] / s  # m^T k m = g  <=  k = inv^T g inv
        k = torch.stack([inv.T @ self.grams[p] @ inv for p in self.parts[:-1]]) if len(self.parts) > 1 else \
            torch.zeros(0, m.shape[0], m.shape[0], dtype=torch.float64, device=self.device)
        return m, k

    def _weight(self, part: str | None, dtype) -> torch.Tensor | None:
        """k of `part` in `dtype` (None: all parts, the identity)."""
        if part is None or len(self.parts) == 1:
            return None
        i = self.parts.index(part)
        if i < self.k.shape[0]:
            return self.k[i].to(dtype)
        return torch.eye(self.k.shape[1], dtype=dtype, device=self.device) - self.k.to(dtype).sum(0)

    def _raw_moment(self, part: str | None, dtype) -> torch.Tensor:
        if self.exact:
            return (self.grams[part] if part is not None else self.gram).to(dtype)
        work = torch.float64 if dtype == torch.float64 else torch.float32
        b = self.b.to(work)
        w = self._weight(part, work)
        return (b.T @ b if w is None else b.T @ (w @ b)).to(dtype)

    def second_moment(self, dtype: torch.dtype = torch.float32, part: str | None = None) -> torch.Tensor:
        """sum x x^T of `part` (all parts when None): exact, or the sketch's with its diagonal raised to the exact
        one where it falls short, [dim, dim]."""
        g = self._raw_moment(part, dtype)
        if not self.exact:  # raised to the exact diagonal where it falls short: stays positive semi-definite
            exact = (self.sq if part is None else self.sqs[part]).to(g.dtype)
            g.diagonal().copy_(torch.maximum(g.diagonal(), exact))
        return g

    def weight(self, part: str) -> torch.Tensor:
        """Part `part`'s [r, r] weight matrix (float64): its second moment is b^T weight b."""
        return self._weight(part, torch.float64)


class _Weights:
    """The parts' weights of a stack [b; new rows]: k [parts - 1, r0, r0] for b's rows, and for the `n` new rows
    1 in the tracked part `part` (none when it is the last part), never built as [r0 + n]^2 unless asked."""

    def __init__(self, k: torch.Tensor, n: int = 0, part: int | None = None):
        self.k, self.n, self.part = k, n, part
        self.shape = (k.shape[0], k.shape[1] + n, k.shape[2] + n)

    def full(self) -> torch.Tensor:
        p, r0 = self.k.shape[0], self.k.shape[1]
        out = torch.zeros(self.shape, dtype=torch.float64, device=self.k.device)
        out[:, :r0, :r0] = self.k
        if self.part is not None and self.part < p:
            out[self.part, range(r0, r0 + self.n), range(r0, r0 + self.n)] = 1.0
        return out

    def times(self, u: torch.Tensor) -> torch.Tensor:
        """k @ u for u [r0 + n, kept]: [parts - 1, r0 + n, kept]."""
        r0 = self.k.shape[1]
        out = torch.zeros(self.shape[0], self.shape[1], u.shape[1], dtype=torch.float64, device=u.device)
        out[:, :r0] = self.k @ u[:r0]
        if self.part is not None and self.part < self.shape[0]:
            out[self.part, r0:] = u[r0:]
        return out


def rounding_bound(b: torch.Tensor, rounded: torch.Tensor, orthogonal: bool) -> float:
    """A bound on ||b^T W b - r^T W r||_2 for r = b rounded and any 0 <= W <= I: ||D||_2 (2 ||b||_2 + ||D||_2) with
    D = r - b (spectral norms from the Gram matrix of the smaller side; ||b||_2 is the largest row norm when the rows
    are orthogonal)."""
    if b.numel() == 0:
        return 0.0
    b = b.double()
    d = _spectral_norm(rounded.double() - b)
    norm = float(b.norm(dim=1).max()) if orthogonal else _spectral_norm(b)
    return d * (2.0 * norm + d)


def _spectral_norm(a: torch.Tensor) -> float:
    return _top_eigenvalue(a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a) ** 0.5


def _top_eigenvalue(g: torch.Tensor) -> float:
    """The largest eigenvalue of a symmetric PSD matrix (0 for an empty one)."""
    if g.numel() == 0:
        return 0.0
    return float(torch.linalg.eigvalsh(g)[-1].clamp_min(0.0))
