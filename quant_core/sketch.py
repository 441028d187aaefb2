"""Second moments of wide inputs in bounded memory: the top directions of the rows, plus the exact diagonal and mean.

For rows x (activations of one layer input, width `dim`) the calibrated rounding needs H = sum x x^T ([dim, dim]).
`MomentSketch` keeps, in O(rows * dim) memory instead of O(dim^2):

- ``sum`` = sum x and ``sq`` = sum x*x (the exact diagonal of H), float64 [dim];
- ``b`` [<= rows, dim], held in bfloat16: a truncated incremental SVD of the rows. Each block of rows is stacked
  under b and the stack is cut back to its top `rows` singular directions, kept at their full size
  (``b_i = s_i v_i``). What a cut drops is positive semi-definite with norm ``s_{rows+1}^2``; ``discarded`` sums
  these, so before the rounding to bfloat16 ``0 <= H - b^T b`` (PSD) and ``||H - b^T b||_2 <= discarded``.
  Each rounding to bfloat16 moves b^T b by at most ``||D||_2 (2 ||b||_2 + ||D||_2)`` (D the rounding's change);
  ``rounded`` sums these;
- or, when ``rows >= dim``, the exact H in float64.

The estimate used downstream is ``b^T b`` with its diagonal replaced by the exact one; its spectral-norm error is at
most ``bound`` = discarded + 2 rounded (the error is (E - diag E) + (R - diag R) with E = H - b^T b before rounding,
PSD, so ||E - diag E|| <= ||E|| <= discarded, and R the rounding's change, ||R - diag R|| <= 2 ||R||).

Why this form (measured on MiniLM, docs/rounding.md "Statistics in bounded memory"): Frequent Directions (Liberty
2013), which lowers every kept direction by the dropped amount at each cut, has an a-priori error guarantee but lost
most of the calibrated rounding's gain at FLUX-dev's bytes per layer; the unshrunk cut matched the best rank-`rows`
approximation of the exact matrix. bfloat16 holds twice the rows per byte of float32, and twice the rows lowered the
calibrated rounding's error far more than the rounding raised it. The tracked bound above holds for both.

Rows arrive in blocks; one eigen-decomposition of the stack's small Gram matrix ([rows + block]^2) per block, on the
device the rows are on.
"""

from __future__ import annotations

import torch

BLOCK_ROWS = 2048  # most rows stacked under the sketch per cut (bounds the transient memory, see transient_bytes)
STORE_DTYPE = torch.bfloat16  # the sketch's rows between blocks and in the file: twice the rows per byte of float32
MIN_BLOCK_ROWS = 256  # a block is 2 * rows within [MIN_BLOCK_ROWS, BLOCK_ROWS]: one cut per block of rows, the
# decomposition's cost per row ~ (rows + block)^3 / block is near its least there


class MomentSketch:
    """Streaming sum / diagonal / second-moment sketch of rows of width `dim` (see the module docstring)."""

    def __init__(self, dim: int, rows: int, device: torch.device | str | None = None):
        self.dim, self.rows = int(dim), int(rows)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.count = 0
        self.sum = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        self.sq = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        self.discarded = 0.0  # sum of the norms of what the cuts dropped
        self.rounded = 0.0  # sum of the bfloat16 rounding bounds: ||H - b^T b||_2 <= discarded + rounded
        self.orthogonal = False  # the rows of b are orthogonal (true after a cut)
        self.gram: torch.Tensor | None = None
        self.b: torch.Tensor | None = None
        if self.exact:
            self.gram = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)
        else:
            self.b = torch.zeros(0, self.dim, dtype=STORE_DTYPE, device=self.device)

    @property
    def exact(self) -> bool:
        return self.rows >= self.dim

    @property
    def bound(self) -> float:
        """Spectral-norm bound on the error of `second_moment()` (0 for the exact matrix)."""
        return self.discarded + 2.0 * self.rounded

    @staticmethod
    def held_bytes(dim: int, rows: int) -> int:
        """Memory one sketch holds between blocks."""
        return 8 * dim * dim + 16 * dim if rows >= dim else 2 * rows * dim + 16 * dim

    @staticmethod
    def block_rows(rows: int) -> int:
        return min(BLOCK_ROWS, max(MIN_BLOCK_ROWS, 2 * rows))

    @staticmethod
    def transient_bytes(dim: int, rows: int) -> int:
        """Extra memory while one block is absorbed (the block in float32, the stack in float32 and float64, the
        Gram matrix of its smaller side with eigenvectors and workspace, the new rows in float64)."""
        if rows >= dim:
            return 4 * dim * dim + 4 * BLOCK_ROWS * dim
        block = MomentSketch.block_rows(rows)
        m = rows + block
        side = min(m, dim)
        return 4 * block * dim + 12 * m * dim + 24 * side * side + 8 * rows * dim

    def add(self, x: torch.Tensor) -> None:
        """Add rows x [n, dim] (any float dtype; moved to the sketch's device block by block)."""
        x = x.reshape(-1, self.dim)
        block = BLOCK_ROWS if self.exact else self.block_rows(self.rows)
        for i in range(0, x.shape[0], block):
            c = x[i:i + block].to(device=self.device, dtype=torch.float32)
            self.count += c.shape[0]
            self.sum += c.sum(0, dtype=torch.float64)
            self.sq += (c * c).sum(0, dtype=torch.float64)
            if self.exact:
                self.gram += c.T @ c
            else:
                self._absorb(c)

    def _absorb(self, x: torch.Tensor) -> None:
        m = torch.cat([self.b.double(), x.double()])
        if m.shape[0] <= self.rows:  # not yet full: the rows as they came (not orthogonal)
            self._store(m, orthogonal=False)
            return
        b, dropped = _top_rows(m, self.rows)
        self.discarded += dropped
        self._store(b, orthogonal=True)

    def _store(self, b: torch.Tensor, orthogonal: bool) -> None:
        """Keep b in bfloat16 and add the bound of what the rounding moved b^T b by to `rounded`."""
        self.b = b.to(STORE_DTYPE)
        self.orthogonal = orthogonal
        self.rounded += rounding_bound(b, self.b, orthogonal)

    def resize(self, rows: int) -> None:
        """Keep at most `rows` directions from now on (fewer: cut now; the error bound keeps accumulating)."""
        rows = int(rows)
        if rows == self.rows:
            return
        if self.exact and rows < self.dim:  # exact -> sketch: the top `rows` eigen-directions of H
            lam, vec = torch.linalg.eigh(self.gram)
            lam, vec = lam.flip(0).clamp_min(0.0), vec.flip(1)
            self.gram = None
            self.discarded += float(lam[rows])
            self._store(lam[:rows].sqrt()[:, None] * vec[:, :rows].T, orthogonal=True)
        elif not self.exact and rows < self.b.shape[0]:
            b, dropped = _top_rows(self.b.double(), rows)
            self.discarded += dropped
            self._store(b, orthogonal=True)
        elif not self.exact and rows >= self.dim:  # room for the full matrix: accumulate it from here on
            self.gram = self.second_moment(torch.float64)  # what was dropped before stays in `discarded`
            self.b = None
        self.rows = rows

    def second_moment(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """sum x x^T: exact, or b^T b with the exact diagonal, [dim, dim]."""
        if self.exact:
            return self.gram.to(dtype)
        b = self.b.to(torch.float64 if dtype == torch.float64 else torch.float32)
        g = (b.T @ b).to(dtype)
        g.diagonal().copy_(self.sq)
        return g


def rounding_bound(b: torch.Tensor, rounded: torch.Tensor, orthogonal: bool) -> float:
    """A bound on ||b^T b - r^T r||_2 for r = b rounded: ||D||_2 (2 ||b||_2 + ||D||_2) with D = r - b (spectral norms
    from the Gram matrix of the smaller side; ||b||_2 is the largest row norm when the rows are orthogonal)."""
    if b.numel() == 0:
        return 0.0
    b = b.double()
    d = _spectral_norm(rounded.double() - b)
    norm = float(b.norm(dim=1).max()) if orthogonal else _spectral_norm(b)
    return d * (2.0 * norm + d)


def _spectral_norm(a: torch.Tensor) -> float:
    g = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
    return float(torch.linalg.eigvalsh(g)[-1].clamp_min(0.0)) ** 0.5


def _top_rows(m: torch.Tensor, rows: int) -> tuple[torch.Tensor, float]:
    """The top `rows` singular directions of the stacked rows m [r, dim] (float64, r > rows) at full size,
    s_i v_i^T, and the norm of what is dropped, s_{rows+1}^2. Returns (rows x dim float64, orthogonal rows; dropped)."""
    if m.shape[0] > m.shape[1]:  # more rows than width: decompose m^T m instead (same spectrum, smaller)
        lam, v = torch.linalg.eigh(m.T @ m)
        lam, v = lam.flip(0).clamp_min(0.0), v.flip(1)
        dropped = float(lam[rows]) if rows < lam.numel() else 0.0
        return lam[:rows].sqrt()[:, None] * v[:, :rows].T, dropped
    lam, u = torch.linalg.eigh(m @ m.T)
    lam, u = lam.flip(0).clamp_min(0.0), u.flip(1)
    return u[:, :rows].T @ m, float(lam[rows])  # u_i^T m = s_i v_i^T
