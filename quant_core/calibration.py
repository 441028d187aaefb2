"""Calibration statistics: the real inputs each Linear layer sees, summarised, and the bias correction they allow.

File format (safetensors, written by `python -m quant_core capture` or `CalibrationWriter`), version 4:

- per *input group* g (layers that read the same tensor, e.g. q/k/v projections, share one group) and per *part*
  p: ``fit`` (the even-numbered calibration sequences), ``rest`` (the others) and optionally ``eval`` (a disjoint
  held-out text set, used only for reporting):
  ``g.p_mean`` float32 [in] = E[x], ``g.p_diag`` float32 [in] = E[x*x] (exact), and either
  ``g.p_gram`` float32 [in, in] = E[x x^T] (exact: when the rows kept per layer reach the input width) or a sketch
  (the top directions of the rows, sketch.py; bfloat16):
  - fit and rest share one basis: ``g.basis`` bfloat16 [r <= rows, in], B with B^T B ~ E[x x^T] over both halves,
    and (when both halves hold rows) ``g.fit_weight`` float16 [r, r], K with E_fit[x x^T] ~ (n / n_fit) B^T K B and
    E_rest[x x^T] ~ (n / n_rest) B^T (I - K) B (n = n_fit + n_rest);
  - the held-out part has its own: ``g.eval_sketch`` bfloat16 [r <= rows, in], S with S^T S ~ E_eval[x x^T];
  ||E[x x^T] - estimate||_2 is at most the recorded bound (which includes the rounding to bfloat16); the second
  moment used is the estimate with its diagonal raised to the exact one where it falls short (it stays positive
  semi-definite);
- metadata ``fp16lr_calibration`` (JSON): ``{"version": 4, "layers": {weight_key: {"group": g, "has_bias": bool}},
  "groups": {g: {"in_features": int, "count": fit + rest tokens, "fit_count", "rest_count", "eval_count",
  "rows": {p: rows held}, "exact": {p: bool}, "error_bound": {p: bound on ||E[x x^T] - estimate||_2}}},
  "statistics": {"rows_requested", "rows", "budget_bytes", "notes"}, "source": {...}}``.

The file holds at most `rows` x in values per group and part, so its size (like the writer's memory) is bounded by
the budget the writer was given, never by the amount of text or by in^2. The [in, in] matrices are built on first
use, one group at a time (on the device given to `load_calibration`).

Version 3 files (like version 4, but each of fit and rest with its own ``g.p_sketch`` [r, in], bfloat16 or float32)
are read as before. Version 2 files (``g.mean``/``g.gram`` over all tokens, ``g.fit_mean``/``g.fit_gram`` over the fit half, optional
``g.eval_*``; the other half derived from the totals) and version 1 files (no fit half: rounded without the held-out
check, the report says its figure is in-sample) are read as before. Other versions are refused.

Tensors are read lazily, one group at a time. Every problem with a file (not safetensors, no or broken metadata, a
missing or misshapen tensor, NaN or infinite statistics, counts that do not add up) raises `CalibrationError`: one
line naming the file and, where there is one, the tensor.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from .errors import ConversionError
from .sketch import STORE_DTYPE, WEIGHT_DTYPE, MomentSketch, rounding_bound

FORMAT_KEY = "fp16lr_calibration"
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
_STATS = ("mean", "gram", "fit_mean", "fit_gram", "eval_mean", "eval_gram")
_PARTS = ("fit", "rest", "eval")
_PART_COUNT = {"fit": "fit_count", "rest": "rest_count", "eval": "eval_count"}
DEFAULT_ROWS = 3072  # rows (directions) kept per group and part; at or above the input width the statistics are exact
DEFAULT_BUDGET_BYTES = 35 * 10 ** 8  # memory the writer's statistics may hold (and so the file's size); the rest of
# 4 GB is left for the activation blocks being converted (FLUX-dev/T5XXL peaks: docs/rounding.md)
MIN_ROWS = 8  # a budget that cannot hold this many rows per layer is refused


class CalibrationError(ConversionError):
    """A calibration file that cannot be used; the message names the file (and tensor)."""


class _Matrix:
    """A second-moment attribute of `LayerCalibration`: the matrix it was given (versions 1-2), else, for a version 3
    file, the one built from the parts named here on first read."""

    def __init__(self, part: str):
        self.part = part

    def __set_name__(self, owner, name):
        self.slot = "_" + name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        value = getattr(obj, self.slot)
        return value if value is not None or not obj._parts else obj._built(self.part)

    def __set__(self, obj, value):
        setattr(obj, self.slot, value)


class LayerCalibration:
    """Input statistics of one Linear layer (weight [out, in]); tensors float32 on the CPU unless moved.

    `mean` [in] = E[x]; `gram` [in, in] = E[x x^T]; `count` tokens behind them. `fit_*`: the same over the
    even-numbered calibration sequences (`fit_count` tokens; None/0 in version 1 files). `eval_*`: the same from
    held-out text (None if the file has none). `has_bias`: the layer adds a bias.

    Version 3 files hold compact statistics (see the module docstring); their `gram`, `fit_gram` and `eval_gram` are
    built on first use ([in, in] float32; the set keeps the last one built for its group, nothing more), and
    `halves()` builds each half from its own statistics.
    """

    gram = _Matrix("all")
    fit_gram = _Matrix("fit")
    eval_gram = _Matrix("eval")

    def __init__(self, weight_key: str, mean: torch.Tensor, gram: torch.Tensor | None, count: int, has_bias: bool,
                 eval_mean: torch.Tensor | None = None, eval_gram: torch.Tensor | None = None, eval_count: int = 0,
                 fit_mean: torch.Tensor | None = None, fit_gram: torch.Tensor | None = None, fit_count: int = 0,
                 parts: dict | None = None, cache: dict | None = None, device=None):
        self.weight_key = weight_key
        self.mean, self._gram, self.count, self.has_bias = mean, gram, count, has_bias
        self.eval_mean, self._eval_gram, self.eval_count = eval_mean, eval_gram, eval_count
        self.fit_mean, self._fit_gram, self.fit_count = fit_mean, fit_gram, fit_count
        self._parts = parts or {}  # version 3: {"fit"|"rest"|"eval": _Part}
        self._cache = cache if cache is not None else {}
        self._device = device  # where version 3 matrices are built (None: the CPU)

    def __repr__(self) -> str:
        return f"LayerCalibration({self.weight_key!r}, in={self.in_features}, count={self.count})"

    @property
    def in_features(self) -> int:
        return self.mean.numel()

    @property
    def sketched(self) -> bool:
        """The statistics are compact (version 3 sketches): the [in, in] matrices are estimates."""
        return any(p.sketch is not None or p.basis is not None for p in self._parts.values())

    def _built(self, which: str) -> torch.Tensor | None:
        device = self._device
        names = ("fit", "rest") if which == "all" else (which,)
        parts = [self._parts[n] for n in names if n in self._parts]
        if not parts:
            return None
        key = (id(self._parts), which, str(device))
        if key not in self._cache:
            self._cache.clear()  # one matrix at a time
            self._cache[key] = _build_second_moment(parts, device)
        return self._cache[key]

    @property
    def has_split(self) -> bool:
        """Both halves hold tokens: the rounding can be fitted on one and checked on the other."""
        if self._parts and self._fit_gram is None:
            return "fit" in self._parts and 0 < self.fit_count < self.count
        return self.fit_gram is not None and 0 < self.fit_count < self.count

    def halves(self) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """((mean, gram) of the fit half, (mean, gram) of the other half). Versions 1-2: float64, the other half
        recovered from the totals: (n * all - n_fit * fit) / (n - n_fit). Version 3: each half from its own
        statistics (means float64, matrices float32, built here and not kept)."""
        if self._parts and self._fit_gram is None:
            f, r = self._parts["fit"], self._parts["rest"]
            return ((f.mean.double(), _build_second_moment([f], self._device)),
                    (r.mean.double(), _build_second_moment([r], self._device)))
        n, nf = self.count, self.fit_count
        fm, fg = self.fit_mean.double(), self.fit_gram.double()
        rm = (n * self.mean.double() - nf * fm) / (n - nf)
        rg = (n * self.gram.double() - nf * fg) / (n - nf)
        return (fm, fg), (rm, rg)

    def second_moment(self, centered: bool = False, device: torch.device | None = None) -> torch.Tensor:
        """E[x x^T] (or the covariance E[(x - mu)(x - mu)^T] if `centered`) as float64 [in, in] (built on `device`
        from a version 3 file's statistics)."""
        if self._parts and self._gram is None:
            g = _build_second_moment([self._parts[n] for n in ("fit", "rest") if n in self._parts],
                                     device if device is not None else self._device)
        else:
            g = self.gram
        g = g.to(device=device, dtype=torch.float64)
        if centered:
            mu = self.mean.to(device=device, dtype=torch.float64)
            g = g - torch.outer(mu, mu)
        return g


@dataclass
class _Part:
    """Version 3 statistics of one part (fit half, rest, eval) of a group: means over `count` rows."""

    count: int
    mean: torch.Tensor  # E[x]
    diag: torch.Tensor  # E[x*x] (exact)
    gram: torch.Tensor | None  # E[x x^T] (exact parts)
    sketch: torch.Tensor | None  # s [r, in] with s^T s ~ E[x x^T] (sketched parts with a sketch of their own)
    basis: torch.Tensor | None = None  # b [r, in] shared by parts (version 4 fit/rest) ...
    weight: torch.Tensor | None = None  # ... and w [r, r] with b^T w b ~ E[x x^T]


def _build_second_moment(parts: list[_Part], device=None) -> torch.Tensor:
    """Count-weighted E[x x^T] of the parts, [in, in] float32: exact matrices summed, sketches stacked (one
    product), the diagonal exact."""
    n = sum(p.count for p in parts)
    g = None
    sketches = [p.sketch.to(device) * (p.count / n) ** 0.5 for p in parts if p.sketch is not None]
    if sketches:
        s = torch.cat(sketches) if len(sketches) > 1 else sketches[0]
        g = s.T @ s
    shared = [p for p in parts if p.basis is not None]
    if shared:  # version 4: one basis, the parts' weights summed (fit and rest together: the identity)
        b = shared[0].basis.to(device)
        w = sum(p.weight.to(device=device, dtype=torch.float64) * (p.count / n) for p in shared).float()
        t = b.T @ (w @ b)
        g = t if g is None else g.add_(t)
    for p in parts:
        if p.gram is not None:
            t = p.gram.to(device=device, dtype=torch.float32) * (p.count / n)
            g = t if g is None else g.add_(t)
    if sketches or shared:
        diag = sum(p.diag.to(device=device, dtype=torch.float64) * (p.count / n) for p in parts)
        g.diagonal().copy_(torch.maximum(g.diagonal(), diag.to(g.dtype)))  # stays PSD
    return g


def _part_weights(k: torch.Tensor | None, r: int, info: dict) -> dict[str, torch.Tensor]:
    """Version 4: {part: w [r, r]} with E_part[x x^T] ~ basis^T w basis, from the fit weight K (None: one half only,
    whose weight is the identity)."""
    n = info["fit_count"] + info["rest_count"]
    eye = torch.eye(r, dtype=torch.float64)
    if k is None:
        return {"fit": eye, "rest": eye}
    # 0 <= K <= I in exact arithmetic; the stored float16 K is brought back within it (so that both halves' estimates
    # are positive semi-definite)
    lam, v = torch.linalg.eigh((k + k.T) / 2)
    k = (v * lam.clamp(0.0, 1.0)) @ v.T
    return {"fit": k * (n / info["fit_count"]), "rest": (eye - k) * (n / info["rest_count"])}


def _scaled(sk: MomentSketch) -> torch.Tensor:
    """The sketch of a mean second moment: b / sqrt(count) (float64; stored rounded to the sketch's dtype)."""
    return sk.b.double() / sk.count ** 0.5


def _meta_error(path: str, what: str) -> CalibrationError:
    return CalibrationError(f"{path}: calibration metadata {what}; make the file with 'python -m quant_core capture'")


class CalibrationSet:
    """A calibration file opened for lookups by checkpoint weight key. Reads tensors on demand."""

    def __init__(self, path: str, device=None):
        from safetensors import safe_open

        self.path = path
        self.device = device  # version 3: build the [in, in] matrices there (the device the rounding runs on)
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
        self._built: dict = {}  # the last [in, in] matrix built from version 3 statistics (one group's)

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
        if self.version >= 3:
            self._check_parts(path, g, ginfo, n, names)
            return
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

    def _check_parts(self, path: str, g: str, ginfo: dict, n: int, names: set[str]) -> None:
        """Version 3: per part with tokens, mean and exact diagonal [in], and an exact [in, in] matrix or a sketch
        [rows <= in, in]; the count is the fit and rest counts together."""
        c = ginfo.get("rest_count", 0)
        if type(c) is not int or c < 0 or ginfo["count"] != ginfo.get("fit_count", 0) + c:
            raise _meta_error(path, f"has a bad 'rest_count' for group '{g[:200]}'")
        for part in _PARTS:
            if not ginfo.get(_PART_COUNT[part], 0):
                continue
            for stat in ("mean", "diag"):
                self._check_tensor(path, f"{g}.{part}_{stat}", names, lambda s: s == [n], [n])
            gram, sketch = f"{g}.{part}_gram", f"{g}.{part}_sketch"
            if self.version >= 4 and part != "eval":
                sketch = f"{g}.basis"
            rows = ginfo.get("rows")
            if gram in names or (sketch not in names and isinstance(rows, dict) and rows.get(part) == n):
                self._check_tensor(path, gram, names, lambda s: s == [n, n], [n, n])
                continue
            self._check_tensor(path, sketch, names, lambda s: len(s) == 2 and 0 < s[0] <= n and s[1] == n,
                               ["rows", n])
            if sketch.endswith(".basis") and part == "fit" and ginfo.get("rest_count", 0):
                r = self._file.get_slice(sketch).get_shape()[0]
                self._check_tensor(path, f"{g}.fit_weight", names, lambda s: s == [r, r], [r, r])

    def _check_tensor(self, path: str, name: str, names: set[str], shape_ok, expected: list) -> None:
        if name not in names:
            raise CalibrationError(f"{path}: tensor '{name[:200]}' is missing")
        sl = self._file.get_slice(name)
        if not shape_ok(list(sl.get_shape())) or sl.get_dtype() not in ("F32", "F64", "F16", "BF16"):
            raise CalibrationError(f"{path}: tensor '{name[:200]}' has shape {sl.get_shape()} and dtype "
                                   f"{sl.get_dtype()}; expected float {expected}")

    def _read(self, name: str) -> torch.Tensor:
        try:
            v = self._file.get_tensor(name).float()
        except Exception as e:
            raise CalibrationError(f"{self.path}: tensor '{name[:200]}' cannot be read "
                                   f"({' '.join(str(e).split())[:120]})") from None
        if not bool(torch.isfinite(v).all()):
            raise CalibrationError(f"{self.path}: tensor '{name[:200]}' holds NaN or infinite statistics")
        return v

    def _get_v3(self, weight_key: str, layer: dict, g: str, info: dict) -> LayerCalibration:
        if self._cache is None or self._cache[0] != g:
            self._cache = None
            self._built.clear()
            parts = {}
            basis = weights = None
            for part in _PARTS:
                count = info.get(_PART_COUNT[part], 0)
                if not count:
                    continue
                gram_name = f"{g}.{part}_gram"
                full = gram_name in self._names
                stats = dict(count=count, mean=self._read(f"{g}.{part}_mean"), diag=self._read(f"{g}.{part}_diag"),
                             gram=self._read(gram_name) if full else None, sketch=None)
                if not full and (self.version < 4 or part == "eval"):
                    stats["sketch"] = self._read(f"{g}.{part}_sketch")
                elif not full:  # version 4 fit / rest: the shared basis and this part's weight
                    if basis is None:
                        basis = self._read(f"{g}.basis")
                        weights = _part_weights(self._read(f"{g}.fit_weight").double()
                                                if f"{g}.fit_weight" in self._names and info.get("fit_count", 0)
                                                and info.get("rest_count", 0) else None,
                                                basis.shape[0], info)
                    stats.update(basis=basis, weight=weights[part])
                parts[part] = _Part(**stats)
            self._cache = (g, parts)
        parts = self._cache[1]
        n = int(info["count"])
        mean = sum(parts[p].mean.double() * (parts[p].count / n) for p in ("fit", "rest") if p in parts).float()
        ev = parts.get("eval")
        return LayerCalibration(weight_key=weight_key, mean=mean, gram=None, count=n,
                                has_bias=bool(layer.get("has_bias", False)),
                                eval_mean=ev.mean if ev else None, eval_count=ev.count if ev else 0,
                                fit_mean=parts["fit"].mean if "fit" in parts else None,
                                fit_count=parts["fit"].count if "fit" in parts and "rest" in parts else 0,
                                parts=parts, cache=self._built, device=self.device)

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
        if self.version >= 3:
            return self._get_v3(weight_key, layer, g, info)
        if self._cache is None or self._cache[0] != g:
            t = {}
            for s in _STATS:
                name = f"{g}.{s}"
                if name not in self._names or (s.startswith("fit") and not info.get("fit_count", 0)) or (
                        s.startswith("eval") and not info.get("eval_count", 0)):
                    continue
                t[s] = self._read(name)
            self._cache = (g, t)
        t = self._cache[1]
        return LayerCalibration(weight_key=weight_key, mean=t["mean"], gram=t["gram"], count=int(info["count"]),
                                has_bias=bool(layer.get("has_bias", False)), eval_mean=t.get("eval_mean"),
                                eval_gram=t.get("eval_gram"), eval_count=int(info.get("eval_count", 0)),
                                fit_mean=t.get("fit_mean"), fit_gram=t.get("fit_gram"),
                                fit_count=int(info.get("fit_count", 0)) if "fit_gram" in t else 0)


def load_calibration(path: str, device=None) -> CalibrationSet:
    """Open a calibration file; `CalibrationError` (one line naming the file) for anything unusable. `device`: where
    a version 3 file's [in, in] matrices are built (None: the CPU; give the rounding's device to keep them out of
    host memory)."""
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
    return CalibrationSet(path, device)


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


_NO_CAP = 1 << 40  # a group's cap when the caller knows none


def _entry(w) -> tuple[int, int, int]:
    """(width, parts, cap) of a `bytes_needed` entry: a width, (width, parts) or (width, parts, cap)."""
    w = w if isinstance(w, tuple) else (w,)
    return (int(w[0]), int(w[1]) if len(w) > 1 else 1, int(w[2]) if len(w) > 2 else _NO_CAP)


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPE_NAME = {v: k for k, v in _DTYPES.items()}


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


class CalibrationWriter:
    """Accumulates per-group input statistics within a memory budget and writes a calibration file (version 4).

    ``add(group, x)`` with x [tokens, in] (any float dtype, on any device: the statistics live and are cut on x's
    device) adds calibration rows; ``fit=True`` marks rows of the fit half (even-numbered sequences; they count
    towards the totals too); ``held_out=True`` adds rows of the held-out text set instead.

    Per group the writer keeps a `sketch.MomentSketch` of the fit half and the rest (exact mean and diagonal of each,
    `rows` directions of the second moment shared by both, each half's weight within them; the exact matrices when
    rows >= the input width) and one of the held-out text if there is any.
    `rows` (default 3072, the meaning of `calib_samples` with a calibration source) is lowered so that everything
    held, plus the transient of one cut, stays within `budget_bytes` (None: no limit): `plan()` sets it for known
    widths before any row arrives (`capture._Recorder` does); a group that appears unplanned and would overflow the
    budget lowers it for all groups then. Every such change is a line in `notes` (and goes to `on_note`). A budget
    that cannot hold MIN_ROWS rows per group raises `CalibrationError` saying how much would be needed.
    """

    def __init__(self, rows: int | None = DEFAULT_ROWS, budget_bytes: int | None = DEFAULT_BUDGET_BYTES,
                 on_note=None):
        if rows is not None and (type(rows) is not int or rows < 1):
            raise ValueError(f"rows must be a positive integer or None, not {rows!r}")
        if budget_bytes is not None and budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be positive or None, not {budget_bytes!r}")
        self.requested_rows = rows
        self.rows = rows if rows is not None else 1 << 40  # None: as many as the budget allows (exact if it can)
        self.budget_bytes = budget_bytes
        self.layers: dict[str, dict] = {}
        self.notes: list[str] = []
        self._on_note = on_note
        self._sketches: dict[tuple[str, str], MomentSketch] = {}  # (group, "cal" | "eval")
        self._planned: dict[str, int] | None = None
        self._planned_parts = 2
        self._caps: dict[str, int] = {}  # group -> most rows it can receive (known to the caller): its sketch keeps
        # no more directions than that, and the budget reserves no more for it

    # -- budget ------------------------------------------------------------------------------------------------
    @staticmethod
    def bytes_needed(widths, rows: int) -> int:
        """Memory statistics of these input widths hold at `rows` rows, plus one cut's transient. Each entry is a
        width (a statistic of one part), (width, parts) (one sketch of that many parts sharing a basis) or (width,
        parts, cap) (one that never holds more than `cap` rows)."""
        entries = [_entry(w) for w in widths]
        if not entries:
            return 0
        return (sum(MomentSketch.held_bytes(d, min(rows, c), k) for d, k, c in entries)
                + max(MomentSketch.transient_bytes(d, min(rows, c), k) for d, k, c in entries))

    def rows_for(self, widths, limit: int | None = None) -> int:
        """The most rows (<= `limit`, default the requested rows) whose statistics for parts of these widths fit the
        budget; raises CalibrationError when not even MIN_ROWS fit."""
        widths = [_entry(w) for w in widths]
        hi = self.rows if limit is None else limit
        if self.budget_bytes is None or self.bytes_needed(widths, hi) <= self.budget_bytes:
            return hi
        if self.bytes_needed(widths, MIN_ROWS) > self.budget_bytes:
            raise CalibrationError(
                f"calibration statistics: a budget of {_gb(self.budget_bytes)} cannot hold {MIN_ROWS} rows per layer "
                f"for {len(widths)} statistics of input widths up to {max(w[0] for w in widths)} (sum "
                f"{sum(w[0] for w in widths)}); at least "
                f"{_gb(self.bytes_needed(widths, MIN_ROWS))} is needed: raise the budget")
        lo, hi = MIN_ROWS, min(hi, max(w[0] for w in widths))
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.bytes_needed(widths, mid) <= self.budget_bytes:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _note(self, line: str) -> None:
        self.notes.append(line)
        if self._on_note is not None:
            self._on_note(line)

    def _set_rows(self, rows: int, why: str) -> None:
        if rows == self.rows:
            return
        old = self.rows
        self.rows = rows
        for (g, _), sk in self._sketches.items():
            sk.resize(self._rows_of(g))
        if self.requested_rows is not None and rows < self.requested_rows:
            self._note(f"calibration statistics keep {rows} rows per layer (asked {self.requested_rows}"
                       f"{'' if old == self.requested_rows else f', was {old}'}): {why} within the "
                       f"{_gb(self.budget_bytes)} budget")

    def plan(self, widths: dict[str, int], parts: int = 2, caps: dict[str, int] | None = None) -> int:
        """Fix the rows per layer for groups of these input widths ({group: in_features}, each with `parts` parts:
        2 = fit half and rest, 3 = with held-out text) before their rows arrive; may be called again with better
        knowledge (rows then grow back towards the requested number or shrink). `caps` ({group: rows}): the most
        rows a group will receive, where the caller knows it (e.g. a modulation input that sees one row per model
        call): such a group keeps at most that many and the budget reserves no more for it, so the others get more.
        Returns the rows."""
        self._planned, self._planned_parts = dict(widths), parts
        self._caps = {g: int(c) for g, c in (caps or {}).items() if int(c) >= 1}
        rows = self.rows_for(self._widths_planned(), self.requested_rows or (1 << 40))
        self._set_rows(rows, f"{len(widths)} groups of input widths up to {max(widths.values(), default=0)}")
        return self.rows

    def _rows_of(self, group: str) -> int:
        return min(self.rows, self._caps.get(group, self.rows))

    def _widths_planned(self, extra: tuple[int, int] | None = None) -> list[tuple[int, int, int]]:
        """(width, parts, cap) of every statistic held or planned (plus `extra`)."""
        widths = [(sk.dim, len(sk.parts), self._caps.get(g, _NO_CAP)) for (g, _), sk in self._sketches.items()]
        if self._planned:
            for g, d in self._planned.items():
                if (g, "cal") not in self._sketches:
                    widths.append((d, 2, self._caps.get(g, _NO_CAP)))
                if self._planned_parts > 2 and (g, "eval") not in self._sketches:
                    widths.append((d, 1, self._caps.get(g, _NO_CAP)))
        if extra is not None:
            widths.append(_entry(extra))
        return widths

    def bytes_held(self) -> int:
        """Memory the statistics hold now (their planned size, without a cut's transient)."""
        return sum(MomentSketch.held_bytes(sk.dim, sk.rows, len(sk.parts)) for sk in self._sketches.values())

    # -- recording ---------------------------------------------------------------------------------------------
    def add_layer(self, weight_key: str, group: str, has_bias: bool) -> None:
        self.layers[weight_key] = {"group": group, "has_bias": bool(has_bias)}

    def add(self, group: str, x: torch.Tensor, held_out: bool = False, fit: bool = False) -> None:
        x = x.reshape(-1, x.shape[-1])
        part = "eval" if held_out else "fit" if fit else "rest"
        key = (group, "eval" if held_out else "cal")
        parts = ("eval",) if held_out else ("fit", "rest")
        sk = self._sketches.get(key)
        if sk is None:
            dim = x.shape[1]
            if any(s.dim != dim for (g, _), s in self._sketches.items() if g == group):
                raise ValueError(f"group '{group}': rows of width {dim} after rows of another width")
            planned = self._planned is not None and self._planned.get(group) == dim and (
                not held_out or self._planned_parts > 2)
            if not planned:  # unplanned: lower the rows (by at least a fifth, so that this happens rarely) to fit
                widths = self._widths_planned((dim, len(parts)))
                if self.budget_bytes is not None and self.bytes_needed(widths, self.rows) > self.budget_bytes:
                    rows = min(self.rows_for(widths), max(MIN_ROWS, self.rows * 4 // 5))
                    self._set_rows(rows, f"{len(widths)} statistics of input widths up to "
                                         f"{max(w[0] for w in widths)}")
            sk = MomentSketch(dim, self._rows_of(group), device=x.device, parts=parts)
            self._sketches[key] = sk
        sk.add(x, part)

    def counts(self, held_out: bool = False) -> dict[str, int]:
        out: dict[str, int] = {}
        for (g, kind), sk in self._sketches.items():
            if (kind == "eval") == held_out:
                out[g] = out.get(g, 0) + sk.count
        return out

    def errors(self) -> dict[str, dict[str, float]]:
        """{group: {part: bound}}: ||E[x x^T] - estimate||_2 <= bound (0 where exact), relative to the largest
        diagonal entry."""
        out: dict[str, dict[str, float]] = {}
        for (g, _), sk in self._sketches.items():
            for part in sk.parts:
                if sk.counts[part]:
                    top = float(sk.sqs[part].max()) if sk.dim else 0.0
                    out.setdefault(g, {})[part] = sk.part_bound(part) / top if top > 0 else 0.0
        return out

    # -- file --------------------------------------------------------------------------------------------------
    def save(self, path: str, source: dict | None = None) -> None:
        """Write the statistics (version 4): one tensor at a time, the file appears complete or not at all."""
        from .safetensors_io import StreamingWriter

        groups: dict[str, dict] = {}
        plan: list[tuple[str, str, tuple[int, ...], object]] = []  # (name, dtype, shape, () -> tensor)
        for (g, kind), sk in sorted(self._sketches.items()):
            live = [p for p in sk.parts if sk.counts[p]]
            if not live:
                continue
            info = groups.setdefault(g, {"in_features": sk.dim, "count": 0, "fit_count": 0, "rest_count": 0,
                                         "eval_count": 0, "rows": {}, "exact": {}, "error_bound": {}})
            n = sk.count
            scaled = None if sk.exact else _scaled(sk)
            stored_rounding = 0.0 if sk.exact else rounding_bound(scaled, scaled.to(STORE_DTYPE), sk.orthogonal)
            for part in live:
                c = sk.counts[part]
                info[_PART_COUNT[part]] = c
                info["rows"][part] = sk.dim if sk.exact else int(sk.b.shape[0])
                bound = sk.part_bound(part) if len(live) > 1 else sk.bound
                info["exact"][part] = bool(sk.exact and bound == 0.0)
                # ||E[x x^T] - estimate||_2 <= this (sketch.py), the sketch as stored: rounded once more after the
                # division by the count (a rounding's change counts three times once the diagonal is raised to the
                # exact one; a part's weight has norm <= 1 and its estimate is scaled by n / c)
                info["error_bound"][part] = bound / c + 3.0 * stored_rounding * (n / c)
                plan += [(f"{g}.{part}_mean", "F32", (sk.dim,), lambda sk=sk, p=part: sk.sums[p] / sk.counts[p]),
                         (f"{g}.{part}_diag", "F32", (sk.dim,), lambda sk=sk, p=part: sk.sqs[p] / sk.counts[p])]
                if sk.exact:
                    plan.append((f"{g}.{part}_gram", "F32", (sk.dim, sk.dim),
                                 lambda sk=sk, p=part: sk.grams[p] / sk.counts[p]))
            if sk.exact:
                continue
            if kind == "eval":
                plan.append((f"{g}.eval_sketch", "BF16", tuple(sk.b.shape),
                             lambda sk=sk: _scaled(sk).to(STORE_DTYPE)))
                continue
            plan.append((f"{g}.basis", "BF16", tuple(sk.b.shape), lambda sk=sk: _scaled(sk).to(STORE_DTYPE)))
            if len(live) > 1:
                plan.append((f"{g}.fit_weight", _DTYPE_NAME[WEIGHT_DTYPE], tuple(sk.k.shape[1:]),
                             lambda sk=sk: sk.weight("fit")))
        for info in groups.values():
            info["count"] = info["fit_count"] + info["rest_count"]
        groups = {g: info for g, info in groups.items() if info["count"] > 0}
        plan = [p for p in plan if p[0].rsplit(".", 1)[0] in groups]
        layers = {k: v for k, v in self.layers.items() if v["group"] in groups}
        meta = {"version": FORMAT_VERSION, "layers": layers, "groups": groups, "source": source or {},
                "statistics": {"rows_requested": self.requested_rows, "rows": min(self.rows, 1 << 31),
                               "budget_bytes": self.budget_bytes, "notes": self.notes}}
        with StreamingWriter(path, [(k, d, s) for k, d, s, _ in plan], {FORMAT_KEY: json.dumps(meta)},
                             overwrite=True) as out:
            for key, dtype, _, make in plan:
                t = make()
                out.write(key, t.to(_DTYPES[dtype]).cpu().contiguous())
            out.commit()
