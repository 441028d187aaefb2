"""Second moments of wide inputs in bounded memory: a Frequent-Directions sketch plus the exact diagonal and mean.

For rows x (activations of one layer input, width `dim`) the calibrated rounding needs H = sum x x^T ([dim, dim]).
`MomentSketch` keeps, in O(rows * dim) memory instead of O(dim^2):

- ``sum`` = sum x and ``sq`` = sum x*x (the exact diagonal of H), float64 [dim];
- ``b`` [<= rows, dim]: a Frequent-Directions sketch (Liberty 2013, Ghashami et al. 2016) with
  ``0 <= H - b^T b`` (positive semi-definite) and ``||H - b^T b||_2 <= shrunk``, where ``shrunk`` is tracked exactly
  and is itself at most ``min_k ||X - X_k||_F^2 / (rows + 1 - k)`` (X_k the best rank-k approximation of the rows):
  the best rank-`rows` structure of H is kept, the rest is bounded;
- or, when ``rows >= dim``, the exact H in float64 (the sketch could not be smaller).

The estimate used downstream is ``b^T b`` with its diagonal replaced by the exact one; its error is
``E - diag(E)`` with E = H - b^T b PSD, so its spectral norm is still at most ``shrunk``.

Rows arrive in blocks; a block is stacked under the sketch and the stack is cut back to `rows` directions in one
eigen-decomposition of its small Gram matrix ([rows + block]^2), on the device the rows are on. Shrinking by the
(rows+1)-th eigenvalue of the stack is the block form of Frequent Directions; the bounds above hold for it.
"""

from __future__ import annotations

import torch

BLOCK_ROWS = 2048  # most rows stacked under the sketch per shrink (bounds the transient memory, see transient_bytes)
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
        self.shrunk = 0.0  # sum of the shrink amounts: ||H - b^T b||_2 <= shrunk
        self.gram: torch.Tensor | None = None
        self.b: torch.Tensor | None = None
        if self.exact:
            self.gram = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)
        else:
            self.b = torch.zeros(0, self.dim, dtype=torch.float32, device=self.device)

    @property
    def exact(self) -> bool:
        return self.rows >= self.dim

    @staticmethod
    def held_bytes(dim: int, rows: int) -> int:
        """Memory one sketch holds between blocks."""
        return 8 * dim * dim + 16 * dim if rows >= dim else 4 * rows * dim + 16 * dim

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
        m = torch.cat([self.b, x]).double()
        if m.shape[0] <= self.rows:
            self.b = m.float()
            return
        self.b, delta = _shrink(m, self.rows)
        self.shrunk += delta

    def resize(self, rows: int) -> None:
        """Keep at most `rows` directions from now on (fewer: shrink now; the error bound keeps accumulating)."""
        rows = int(rows)
        if rows == self.rows:
            return
        if self.exact and rows < self.dim:  # exact -> sketch: the top `rows` eigen-directions of H
            lam, vec = torch.linalg.eigh(self.gram)
            lam, vec = lam.flip(0).clamp_min(0.0), vec.flip(1)
            delta = float(lam[rows])
            self.b = ((lam[:rows] - delta).sqrt()[:, None] * vec[:, :rows].T).float()
            self.shrunk += delta
            self.gram = None
        elif not self.exact and rows < self.b.shape[0]:
            self.b, delta = _shrink(self.b.double(), rows)
            self.shrunk += delta
        elif not self.exact and rows >= self.dim:  # room for the full matrix: accumulate it from here on
            self.gram = self.second_moment(torch.float64)  # what was shrunk before stays in `shrunk`
            self.b = None
        self.rows = rows

    def second_moment(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """sum x x^T: exact, or b^T b with the exact diagonal, [dim, dim]."""
        if self.exact:
            return self.gram.to(dtype)
        g = (self.b.T @ self.b).to(dtype)
        g.diagonal().copy_(self.sq)
        return g


def _shrink(m: torch.Tensor, rows: int) -> tuple[torch.Tensor, float]:
    """Frequent-Directions shrink of the stacked rows m [r, dim] (float64, r > rows) to `rows` rows:
    sqrt(s_i^2 - delta) v_i^T for the top `rows` singular pairs, delta = s_{rows+1}^2. Returns (rows x dim float32,
    delta)."""
    if m.shape[0] > m.shape[1]:  # more rows than width: decompose m^T m instead (same spectrum, smaller)
        lam, v = torch.linalg.eigh(m.T @ m)
        lam, v = lam.flip(0).clamp_min(0.0), v.flip(1)
        delta = float(lam[rows]) if rows < lam.numel() else 0.0
        b = (lam[:rows] - delta).clamp_min(0.0).sqrt()[:, None] * v[:, :rows].T
        return b.float(), delta
    g = m @ m.T
    lam, u = torch.linalg.eigh(g)
    lam, u = lam.flip(0).clamp_min(0.0), u.flip(1)
    delta = float(lam[rows])
    top = lam[:rows]
    coef = torch.where(top > delta, ((top - delta) / top.clamp_min(1e-300)).sqrt(), torch.zeros_like(top))
    b = (coef[:, None] * u[:, :rows].T) @ m  # u_i^T m = s_i v_i^T
    return b.float(), delta
