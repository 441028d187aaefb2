"""Second moments of wide inputs in bounded memory: a Frequent-Directions sketch plus the exact diagonal and mean.

For rows x (activations of one layer input, width `dim`) the calibrated rounding needs H = sum x x^T ([dim, dim]).
`MomentSketch` keeps, in O(rows * dim) memory instead of O(dim^2):

- ``sum`` = sum x and ``sq`` = sum x*x (the exact diagonal of H), float64 [dim];
- ``b`` [<= rows, dim], held in bfloat16: a Frequent-Directions sketch (Liberty 2013, Ghashami et al. 2016). Before
  its rows are rounded to bfloat16 it satisfies ``0 <= H - b^T b`` (positive semi-definite) and
  ``||H - b^T b||_2 <= shrunk``, where ``shrunk`` is tracked exactly and is itself at most
  ``min_k ||X - X_k||_F^2 / (rows + 1 - k)`` (X_k the best rank-k approximation of the rows): the best rank-`rows`
  structure of H is kept, the rest is bounded. Each rounding to bfloat16 moves b^T b by at most
  ``||D||_2 (2 ||b||_2 + ||D||_2)`` (D the rounding change); ``rounded`` sums these, so ``||H - b^T b||_2 <= shrunk + rounded``. Rounding costs
  far less than it buys: at a given number of bytes bfloat16 holds twice the rows, and twice the rows lowered the
  calibrated rounding's error more than the rounding raised it (docs/rounding.md, "Statistics in bounded memory");
- or, when ``rows >= dim``, the exact H in float64.

The estimate used downstream is ``b^T b`` with its diagonal replaced by the exact one; its spectral-norm error is at
most ``bound`` = shrunk + 2 rounded (the error is (E - diag E) + (R - diag R) with E = H - b^T b before rounding,
PSD, so ||E - diag E|| <= ||E|| <= shrunk, and R the rounding's change, ||R - diag R|| <= 2 ||R||).

Rows arrive in blocks; a block is stacked under the sketch and the stack is cut back to `rows` directions in one
eigen-decomposition of its small Gram matrix ([rows + block]^2), on the device the rows are on. Shrinking by the
(rows+1)-th eigenvalue of the stack is the block form of Frequent Directions; the bounds above hold for it.
"""

from __future__ import annotations

import torch

BLOCK_ROWS = 2048  # most rows stacked under the sketch per shrink (bounds the transient memory, see transient_bytes)
STORE_DTYPE = torch.bfloat16  # the sketch's rows between blocks and in the file: twice the rows per byte of float32
MIN_BLOCK_ROWS = 256  # a block is 2 * rows within [MIN_BLOCK_ROWS, BLOCK_ROWS]: one shrink per block of rows, the
# decomposition's cost per row ~ (rows + block)^3 / block is near its least there


class MomentSketch:
    """Streaming sum / diagonal / second-moment sketch of rows of width `dim` (see the module docstring)."""

    def __init__(self, dim: int, rows: int, device: torch.device | str | None = None):
        self.dim, self.rows = int(dim), int(rows)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.count = 0
        self.sum = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        self.sq = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        self.shrunk = 0.0  # sum of the shrink amounts
        self.rounded = 0.0  # sum of the bfloat16 rounding bounds: ||H - b^T b||_2 <= shrunk + rounded
        self.orthogonal = False  # the rows of b are orthogonal (true after a shrink)
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
        return self.shrunk + 2.0 * self.rounded

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
        b, delta = _shrink(m, self.rows)
        self.shrunk += delta
        self._store(b, orthogonal=True)

    def _store(self, b: torch.Tensor, orthogonal: bool) -> None:
        """Keep b in bfloat16 and add the bound of what the rounding moved b^T b by to `rounded`."""
        self.b = b.to(STORE_DTYPE)
        self.orthogonal = orthogonal
        self.rounded += rounding_bound(b, self.b, orthogonal)

    def resize(self, rows: int) -> None:
        """Keep at most `rows` directions from now on (fewer: shrink now; the error bound keeps accumulating)."""
        rows = int(rows)
        if rows == self.rows:
            return
        if self.exact and rows < self.dim:  # exact -> sketch: the top `rows` eigen-directions of H
            lam, vec = torch.linalg.eigh(self.gram)
            lam, vec = lam.flip(0).clamp_min(0.0), vec.flip(1)
            delta = float(lam[rows])
            self.gram = None
            self.shrunk += delta
            self._store((lam[:rows] - delta).sqrt()[:, None] * vec[:, :rows].T, orthogonal=True)
        elif not self.exact and rows < self.b.shape[0]:
            b, delta = _shrink(self.b.double(), rows)
            self.shrunk += delta
            self._store(b, orthogonal=True)
        elif not self.exact and rows >= self.dim:  # room for the full matrix: accumulate it from here on
            self.gram = self.second_moment(torch.float64)  # what was shrunk before stays in `shrunk`
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


def _shrink(m: torch.Tensor, rows: int) -> tuple[torch.Tensor, float]:
    """Frequent-Directions shrink of the stacked rows m [r, dim] (float64, r > rows) to `rows` rows:
    sqrt(s_i^2 - delta) v_i^T for the top `rows` singular pairs, delta = s_{rows+1}^2. Returns (rows x dim float64,
    orthogonal rows; delta)."""
    if m.shape[0] > m.shape[1]:  # more rows than width: decompose m^T m instead (same spectrum, smaller)
        lam, v = torch.linalg.eigh(m.T @ m)
        lam, v = lam.flip(0).clamp_min(0.0), v.flip(1)
        delta = float(lam[rows]) if rows < lam.numel() else 0.0
        b = (lam[:rows] - delta).clamp_min(0.0).sqrt()[:, None] * v[:, :rows].T
        return b, delta
    g = m @ m.T
    lam, u = torch.linalg.eigh(g)
    lam, u = lam.flip(0).clamp_min(0.0), u.flip(1)
    delta = float(lam[rows])
    top = lam[:rows]
    coef = torch.where(top > delta, ((top - delta) / top.clamp_min(1e-300)).sqrt(), torch.zeros_like(top))
    b = (coef[:, None] * u[:, :rows].T) @ m  # u_i^T m = s_i v_i^T
    return b, delta
