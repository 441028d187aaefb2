"""Calibration statistics: the real inputs each Linear layer sees, summarised, and the bias correction they allow.

File format (safetensors, written by `python -m quant_core capture` or `CalibrationWriter`):

- per *input group* g (layers that read the same tensor, e.g. q/k/v projections, share one group):
  ``g.mean`` float32 [in] = E[x], ``g.gram`` float32 [in, in] = E[x x^T] over all calibration tokens;
  ``g.fit_mean`` / ``g.fit_gram``: the same over the even-numbered calibration sequences only (version 2), so that
  the converter can round on one half and measure on the other (the odd half's statistics follow from the two);
  optionally ``g.eval_mean`` / ``g.eval_gram`` from a disjoint held-out text set (used only for reporting);
- metadata ``fp16lr_calibration`` (JSON): ``{"version": 2, "layers": {weight_key: {"group": g, "has_bias": bool}},
  "groups": {g: {"in_features": int, "count": tokens, "fit_count": tokens, "eval_count": tokens or 0}},
  "source": {...}}``.

Version 1 files (no fit half) are still read: their layers are rounded without the held-out check, and the report
says that its figure is measured on the calibration tokens themselves. Other versions are refused.

The Gram matrix is a sufficient statistic for E||(Q - W) x||^2, so the file size is bounded by the layer widths
(8 * in^2 bytes per group, in float32), never by the amount of text. Tensors are read lazily, one group at a time.
Every problem with a file (not safetensors, no or broken metadata, a missing or misshapen tensor, NaN or infinite
statistics) raises `CalibrationError`: one line naming the file and, where there is one, the tensor.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from .errors import ConversionError

FORMAT_KEY = "fp16lr_calibration"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
_STATS = ("mean", "gram", "fit_mean", "fit_gram", "eval_mean", "eval_gram")


class CalibrationError(ConversionError):
    """A calibration file that cannot be used; the message names the file (and tensor)."""


@dataclass
class LayerCalibration:
    """Input statistics of one Linear layer (weight [out, in]); tensors float32 on the CPU unless moved.

    `mean` [in] = E[x]; `gram` [in, in] = E[x x^T]; `count` tokens behind them. `fit_*`: the same over the
    even-numbered calibration sequences (`fit_count` tokens; None/0 in version 1 files). `eval_*`: the same from
    held-out text (None if the file has none). `has_bias`: the layer adds a bias.
    """

    weight_key: str
    mean: torch.Tensor
    gram: torch.Tensor
    count: int
    has_bias: bool
    eval_mean: torch.Tensor | None = None
    eval_gram: torch.Tensor | None = None
    eval_count: int = 0
    fit_mean: torch.Tensor | None = None
    fit_gram: torch.Tensor | None = None
    fit_count: int = 0

    @property
    def in_features(self) -> int:
        return self.mean.numel()

    @property
    def has_split(self) -> bool:
        """Both halves hold tokens: the rounding can be fitted on one and checked on the other."""
        return self.fit_gram is not None and 0 < self.fit_count < self.count

    def halves(self) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """((mean, gram) of the fit half, (mean, gram) of the other half), float64. The other half is recovered
        from the totals: (n * all - n_fit * fit) / (n - n_fit)."""
        n, nf = self.count, self.fit_count
        fm, fg = self.fit_mean.double(), self.fit_gram.double()
        rm = (n * self.mean.double() - nf * fm) / (n - nf)
        rg = (n * self.gram.double() - nf * fg) / (n - nf)
        return (fm, fg), (rm, rg)

    def second_moment(self, centered: bool = False, device: torch.device | None = None) -> torch.Tensor:
        """E[x x^T] (or the covariance E[(x - mu)(x - mu)^T] if `centered`) as float64 [in, in]."""
        g = self.gram.to(device=device, dtype=torch.float64)
        if centered:
            mu = self.mean.to(device=device, dtype=torch.float64)
            g = g - torch.outer(mu, mu)
        return g


def _meta_error(path: str, what: str) -> CalibrationError:
    return CalibrationError(f"{path}: calibration metadata {what}; make the file with 'python -m quant_core capture'")


class CalibrationSet:
    """A calibration file opened for lookups by checkpoint weight key. Reads tensors on demand."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        try:
            self._file = safe_open(path, "pt")
            meta = self._file.metadata() or {}
            names = set(self._file.keys())
        except Exception as e:  # the parser never unpickles: anything that is not safetensors ends here
            reason = " ".join(str(e).split())[:120]
            raise CalibrationError(f"{path}: not a safetensors calibration file ({reason})") from None
        if FORMAT_KEY not in meta:
            raise CalibrationError(f"{path}: not a calibration file (no '{FORMAT_KEY}' metadata); make one with "
                                   "'python -m quant_core capture'")
        try:
            info = json.loads(meta[FORMAT_KEY])
        except (ValueError, RecursionError):
            raise _meta_error(path, "is not valid JSON") from None
        if not isinstance(info, dict):
            raise _meta_error(path, "is not a JSON object")
        version = info.get("version")
        if type(version) is not int or version not in READABLE_VERSIONS:
            raise CalibrationError(f"{path}: calibration format version {str(version)[:20]} is not supported (this "
                                   f"converter reads versions {', '.join(map(str, READABLE_VERSIONS))}); capture "
                                   "the statistics again with 'python -m quant_core capture'")
        self.version = version
        layers, groups = info.get("layers"), info.get("groups")
        if not isinstance(layers, dict) or not isinstance(groups, dict):
            raise _meta_error(path, "has no 'layers'/'groups' tables")
        for key, layer in layers.items():
            if not isinstance(layer, dict) or layer.get("group") not in groups:
                raise _meta_error(path, f"names no known group for layer '{key[:200]}'")
        for g, ginfo in groups.items():
            self._check_group(path, g, ginfo, names)
        self.layers: dict[str, dict] = layers
        self.groups: dict[str, dict] = groups
        self.source: dict = info.get("source") if isinstance(info.get("source"), dict) else {}
        self._names = names
        self._cache: tuple[str, dict] | None = None

    def _check_group(self, path: str, g: str, ginfo, names: set[str]) -> None:
        """Header-only checks of one group: counts, and every tensor present with its shape (values: `get`)."""
        if not isinstance(ginfo, dict):
            raise _meta_error(path, f"has a malformed entry for group '{g[:200]}'")
        n = ginfo.get("in_features")
        for field in ("count", "fit_count", "eval_count"):
            c = ginfo.get(field, 0)
            if type(c) is not int or c < 0:
                raise _meta_error(path, f"has a bad '{field}' for group '{g[:200]}'")
        if type(n) is not int or n <= 0 or ginfo.get("count", 0) <= 0:
            raise _meta_error(path, f"has a bad 'in_features' or 'count' for group '{g[:200]}'")
        wanted = [("mean", (n,)), ("gram", (n, n))]
        if ginfo.get("fit_count", 0):
            wanted += [("fit_mean", (n,)), ("fit_gram", (n, n))]
        if ginfo.get("eval_count", 0):
            wanted += [("eval_mean", (n,)), ("eval_gram", (n, n))]
        for stat, shape in wanted:
            name = f"{g}.{stat}"
            if name not in names:
                raise CalibrationError(f"{path}: tensor '{name[:200]}' is missing")
            sl = self._file.get_slice(name)
            if tuple(sl.get_shape()) != shape or sl.get_dtype() not in ("F32", "F64", "F16", "BF16"):
                raise CalibrationError(f"{path}: tensor '{name[:200]}' has shape {sl.get_shape()} and dtype "
                                       f"{sl.get_dtype()}; expected float {list(shape)}")

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
        info = self.groups[g]
        if self._cache is None or self._cache[0] != g:
            t = {}
            for s in _STATS:
                name = f"{g}.{s}"
                if name not in self._names or (s.startswith("fit") and not info.get("fit_count", 0)) or (
                        s.startswith("eval") and not info.get("eval_count", 0)):
                    continue
                try:
                    v = self._file.get_tensor(name).float()
                except Exception as e:
                    raise CalibrationError(f"{self.path}: tensor '{name[:200]}' cannot be read "
                                           f"({' '.join(str(e).split())[:120]})") from None
                if not bool(torch.isfinite(v).all()):
                    raise CalibrationError(f"{self.path}: tensor '{name[:200]}' holds NaN or infinite statistics")
                t[s] = v
            self._cache = (g, t)
        t = self._cache[1]
        return LayerCalibration(weight_key=weight_key, mean=t["mean"], gram=t["gram"], count=int(info["count"]),
                                has_bias=bool(layer.get("has_bias", False)), eval_mean=t.get("eval_mean"),
                                eval_gram=t.get("eval_gram"), eval_count=int(info.get("eval_count", 0)),
                                fit_mean=t.get("fit_mean"), fit_gram=t.get("fit_gram"),
                                fit_count=int(info.get("fit_count", 0)) if "fit_gram" in t else 0)


def load_calibration(path: str) -> CalibrationSet:
    """Open a calibration file; `CalibrationError` (one line naming the file) for anything unusable."""
    if not os.path.exists(path):
        raise CalibrationError(f"{path}: calibration file not found")
    if not os.path.isfile(path):
        raise CalibrationError(f"{path}: is not a file")
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise CalibrationError(f"{path}: cannot be read ({e.strerror})") from None
    if size == 0:
        raise CalibrationError(f"{path}: empty file, not a calibration file")
    if not os.access(path, os.R_OK):
        raise CalibrationError(f"{path}: cannot be read (permission denied)")
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


def bias_correction_figures(q_deq: torch.Tensor, w: torch.Tensor, layer_calibration: LayerCalibration,
                            rtn_deq: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The bias delta (`bias_correction`, from the mean of all calibration tokens) and the layer's output error with
    it, relative to RTN's without, measured on the eval-text statistics if the file has them, else on the
    calibration tokens (in-sample: the mean that made the delta is the one it is measured with)."""
    cal = layer_calibration
    delta = bias_correction(q_deq, w, cal)
    held = cal.eval_gram is not None
    mean, gram = (cal.eval_mean, cal.eval_gram) if held else (cal.mean, cal.gram)
    with_bias, _ = output_errors(w, q_deq, mean, gram, delta)
    plain, _ = output_errors(w, q_deq, mean, gram)
    rtn, _ = output_errors(w, rtn_deq if rtn_deq is not None else w.to(torch.float16).float(), mean, gram)
    return delta, {"output_error_ratio_bias_corrected": with_bias / rtn if rtn > 0 else 1.0,
                   "bias_correction_gain": with_bias / plain if plain > 0 else 1.0,
                   "bias_figure_on": "eval text" if held else "calibration (in-sample)"}


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

    ``add(group, x)`` with x [tokens, in] (any float dtype/device) adds calibration rows; ``fit=True`` marks rows of
    the fit half (even-numbered sequences; they count towards the totals too); ``held_out=True`` adds rows of the
    held-out text set instead. Memory: up to three [in, in] float64 accumulators per group.
    """

    def __init__(self):
        self._sums: dict[tuple[str, str], list] = {}
        self.layers: dict[str, dict] = {}

    def add_layer(self, weight_key: str, group: str, has_bias: bool) -> None:
        self.layers[weight_key] = {"group": group, "has_bias": bool(has_bias)}

    def add(self, group: str, x: torch.Tensor, held_out: bool = False, fit: bool = False) -> None:
        # per-batch products in float32 (fast; a batch holds a few thousand rows), accumulated in float64
        x = x.reshape(-1, x.shape[-1]).float()
        s, ss = x.sum(0, dtype=torch.float64), (x.T @ x).double()
        for kind in (("eval",) if held_out else ("all", "fit") if fit else ("all",)):
            key = (group, kind)
            if key not in self._sums:
                d = x.shape[1]
                self._sums[key] = [torch.zeros(d, dtype=torch.float64, device=x.device),
                                   torch.zeros(d, d, dtype=torch.float64, device=x.device), 0]
            acc = self._sums[key]
            acc[0] += s
            acc[1] += ss
            acc[2] += x.shape[0]

    def counts(self, held_out: bool = False) -> dict[str, int]:
        want = "eval" if held_out else "all"
        return {g: acc[2] for (g, kind), acc in self._sums.items() if kind == want}

    def save(self, path: str, source: dict | None = None) -> None:
        from safetensors.torch import save_file

        tensors, groups = {}, {}
        for (g, kind), (s, ss, n) in sorted(self._sums.items()):
            if n == 0:
                continue
            prefix = {"all": "", "fit": "fit_", "eval": "eval_"}[kind]
            tensors[f"{g}.{prefix}mean"] = (s / n).float().cpu().contiguous()
            tensors[f"{g}.{prefix}gram"] = (ss / n).float().cpu().contiguous()
            info = groups.setdefault(g, {"in_features": s.numel(), "count": 0, "fit_count": 0, "eval_count": 0})
            info[{"all": "count", "fit": "fit_count", "eval": "eval_count"}[kind]] = int(n)
        groups = {g: info for g, info in groups.items() if info["count"] > 0}
        for g in list(tensors):
            if g.rsplit(".", 1)[0] not in groups:
                del tensors[g]
        layers = {k: v for k, v in self.layers.items() if v["group"] in groups}
        meta = {"version": FORMAT_VERSION, "layers": layers, "groups": groups, "source": source or {}}
        tmp = path + ".tmp"
        save_file(tensors, tmp, metadata={FORMAT_KEY: json.dumps(meta)})
        os.replace(tmp, path)
