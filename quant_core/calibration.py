"""Calibration statistics: the real inputs each Linear layer sees, summarised, and the bias correction they allow.

File format (safetensors, written by `python -m quant_core capture` or `CalibrationWriter`):

- per *input group* g (layers that read the same tensor, e.g. q/k/v projections, share one group):
  ``g.mean`` float32 [in] = E[x], ``g.gram`` float32 [in, in] = E[x x^T] over the calibration tokens, and
  optionally ``g.eval_mean`` / ``g.eval_gram`` from a disjoint held-out text set (used only for reporting);
- metadata ``fp16lr_calibration`` (JSON): ``{"version": 1, "layers": {weight_key: {"group": g, "has_bias": bool}},
  "groups": {g: {"in_features": int, "count": tokens, "eval_count": tokens or 0}}, "source": {...}}``.

The Gram matrix is a sufficient statistic for E||(Q - W) x||^2, so the file size is bounded by the layer widths
(4 * in^2 bytes per group, in float32), never by the amount of text. Tensors are read lazily, one group at a time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

FORMAT_KEY = "fp16lr_calibration"
FORMAT_VERSION = 1


@dataclass
class LayerCalibration:
    """Input statistics of one Linear layer (weight [out, in]); tensors float32 on the CPU unless moved.

    `mean` [in] = E[x]; `gram` [in, in] = E[x x^T]; `count` tokens behind them. `eval_*`: the same from held-out
    text (None if the file has none). `has_bias`: the layer adds a bias, so a mean error can be corrected there.
    """

    weight_key: str
    mean: torch.Tensor
    gram: torch.Tensor
    count: int
    has_bias: bool
    eval_mean: torch.Tensor | None = None
    eval_gram: torch.Tensor | None = None
    eval_count: int = 0

    @property
    def in_features(self) -> int:
        return self.mean.numel()

    def second_moment(self, centered: bool, device: torch.device | None = None) -> torch.Tensor:
        """E[x x^T] (or the covariance E[(x - mu)(x - mu)^T] if `centered`) as float64 [in, in]."""
        g = self.gram.to(device=device, dtype=torch.float64)
        if centered:
            mu = self.mean.to(device=device, dtype=torch.float64)
            g = g - torch.outer(mu, mu)
        return g


class CalibrationSet:
    """A calibration file opened for lookups by checkpoint weight key. Reads tensors on demand."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        self._file = safe_open(path, "pt")
        meta = self._file.metadata() or {}
        if FORMAT_KEY not in meta:
            raise ValueError(f"{path}: not a calibration file (no '{FORMAT_KEY}' metadata); make one with "
                             "'python -m quant_core capture'")
        info = json.loads(meta[FORMAT_KEY])
        if info.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: calibration format version {info.get('version')} is not supported")
        self.layers: dict[str, dict] = info["layers"]
        self.groups: dict[str, dict] = info["groups"]
        self.source: dict = info.get("source", {})
        self._cache: tuple[str, dict] | None = None

    def keys(self) -> list[str]:
        return list(self.layers)

    def resolve(self, weight_key: str) -> str | None:
        """The recorded layer for a checkpoint key: exact match, else the one recorded key that is a dotted suffix
        of it or of which it is one (checkpoints often add or drop a prefix such as ``model.``)."""
        if weight_key in self.layers:
            return weight_key
        hits = [k for k in self.layers if weight_key.endswith("." + k) or k.endswith("." + weight_key)]
        return hits[0] if len(hits) == 1 else None

    def get(self, weight_key: str) -> LayerCalibration | None:
        key = self.resolve(weight_key)
        if key is None:
            return None
        layer = self.layers[key]
        g = layer["group"]
        if self._cache is None or self._cache[0] != g:
            names = set(self._file.keys())
            t = {s: self._file.get_tensor(f"{g}.{s}") for s in ("mean", "gram", "eval_mean", "eval_gram")
                 if f"{g}.{s}" in names}
            self._cache = (g, t)
        t = self._cache[1]
        info = self.groups[g]
        return LayerCalibration(weight_key=weight_key, mean=t["mean"], gram=t["gram"], count=int(info["count"]),
                                has_bias=bool(layer.get("has_bias", False)), eval_mean=t.get("eval_mean"),
                                eval_gram=t.get("eval_gram"), eval_count=int(info.get("eval_count", 0)))


def load_calibration(path: str) -> CalibrationSet:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: calibration file not found")
    return CalibrationSet(path)


def bias_correction(q_deq: torch.Tensor, w: torch.Tensor, layer_calibration: LayerCalibration) -> torch.Tensor:
    """Delta to add to the layer's bias so that the mean output is unchanged: ``-(Q - W) @ E[x]``.

    `q_deq` (the stored weight dequantized) and `w` (the original) are [out, in] or [out, ...] in the same units;
    returns float32 [out] on their device. Only a real input mean carries signal: with zero-mean synthetic inputs the
    expected correction is exactly zero, which is why there is no synthetic variant.
    """
    out = w.shape[0]
    e = q_deq.reshape(out, -1).double() - w.reshape(out, -1).double()
    mu = layer_calibration.mean.to(device=e.device, dtype=torch.float64)
    return (-(e @ mu)).float()


def output_errors(w: torch.Tensor, q_deq: torch.Tensor, mean: torch.Tensor, gram: torch.Tensor,
                  bias_delta: torch.Tensor | None = None) -> tuple[float, float]:
    """(||(Q - W) x + db||, ||W x||) in the root-mean-square sense over the inputs summarised by (mean, gram):
    E||(Q - W) x + db||^2 = tr(E G E^T) + 2 db . E mu + ||db||^2. `w`, `q_deq` [out, in], same units."""
    out = w.shape[0]
    wd = w.reshape(out, -1).double()
    e = q_deq.reshape(out, -1).double() - wd
    g = gram.to(device=e.device, dtype=torch.float64)
    err = ((e @ g) * e).sum()
    if bias_delta is not None:
        db = bias_delta.to(device=e.device, dtype=torch.float64)
        err = err + 2.0 * (db * (e @ mean.to(device=e.device, dtype=torch.float64))).sum() + (db * db).sum()
    ref = ((wd @ g) * wd).sum()
    return float(err.clamp_min(0.0)) ** 0.5, float(ref) ** 0.5


class CalibrationWriter:
    """Accumulates per-group sums in float64 and writes a calibration file.

    ``add(group, x)`` with x [tokens, in] (any float dtype/device); ``add(group, x, held_out=True)`` for the held-out
    set. Memory: two [in, in] float64 accumulators per group.
    """

    def __init__(self):
        self._sums: dict[tuple[str, bool], list] = {}
        self.layers: dict[str, dict] = {}

    def add_layer(self, weight_key: str, group: str, has_bias: bool) -> None:
        self.layers[weight_key] = {"group": group, "has_bias": bool(has_bias)}

    def add(self, group: str, x: torch.Tensor, held_out: bool = False) -> None:
        # per-batch products in float32 (fast; a batch holds a few thousand rows), accumulated in float64
        x = x.reshape(-1, x.shape[-1]).float()
        key = (group, held_out)
        if key not in self._sums:
            d = x.shape[1]
            self._sums[key] = [torch.zeros(d, dtype=torch.float64, device=x.device),
                               torch.zeros(d, d, dtype=torch.float64, device=x.device), 0]
        acc = self._sums[key]
        acc[0] += x.sum(0, dtype=torch.float64)
        acc[1] += (x.T @ x).double()
        acc[2] += x.shape[0]

    def counts(self, held_out: bool = False) -> dict[str, int]:
        return {g: acc[2] for (g, h), acc in self._sums.items() if h == held_out}

    def save(self, path: str, source: dict | None = None) -> None:
        from safetensors.torch import save_file

        tensors, groups = {}, {}
        for (g, held_out), (s, ss, n) in sorted(self._sums.items()):
            if n == 0:
                continue
            prefix = "eval_" if held_out else ""
            tensors[f"{g}.{prefix}mean"] = (s / n).float().cpu().contiguous()
            tensors[f"{g}.{prefix}gram"] = (ss / n).float().cpu().contiguous()
            info = groups.setdefault(g, {"in_features": s.numel(), "count": 0, "eval_count": 0})
            info["eval_count" if held_out else "count"] = int(n)
        layers = {k: v for k, v in self.layers.items() if groups.get(v["group"], {}).get("count", 0) > 0}
        meta = {"version": FORMAT_VERSION, "layers": layers, "groups": groups, "source": source or {}}
        tmp = path + ".tmp"
        save_file(tensors, tmp, metadata={FORMAT_KEY: json.dumps(meta)})
        os.replace(tmp, path)
