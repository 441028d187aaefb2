"""Learned rounding on the fp16 grid: which of its two neighbouring fp16 values each element of a scaled weight
stores.

Every element of the scaled weight ``ws`` (float32, already divided by its power-of-two scale) has two neighbouring
fp16 values: the round-to-nearest one (RTN) and the next one on the other side of ``ws`` (grid.py). Every objective
is evaluated on those stored values, never on a continuous copy. Elements that fp16 represents exactly (every BF16
value inside fp16's normal range) have one neighbour only and never move.

Two modes (docs/rounding.md has the method and the measured figures):

- default (no activations): top-k search (topk_search.py) over the principal directions of W (topk_basis.py);
  on a GPU its fixed-shape parts run as CUDA graphs (graphs.py).
- calibrated (a `LayerCalibration` with the layer's input statistics): GPTQ on the fp16 grid (gptq.py).

This module only dispatches between them. Determinism: no random state outside fixed seeds, no floating-point
atomics (histograms are integer sums), and the decisions are made in float64, so a CPU and a GPU run store the same
bytes unless some element's score falls within ~1e-15 of a decision boundary (floating-point non-associativity of
the two devices' sums).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from ..options import MAX_PASSES, REFINE_SWEEPS
from . import gptq
from .gptq import HELD_OUT_CHECK, SHRINK
from .graphs import device_graphs, release_all
from .grid import NEGLIGIBLE_REL, neighbours
from .topk_basis import EXACT_BASIS_DIM, principal_basis
from .topk_search import nothing_to_move, topk

if TYPE_CHECKING:
    from ..calibration import LayerCalibration

USE_CUDA_GRAPHS = os.environ.get("QUANT_CORE_CUDA_GRAPHS", "1") != "0"  # see graphs.py
# SHRINK and HELD_OUT_CHECK (calibrated mode) are read here at each call: a benchmark may set them on this module

CancelHook = Callable[[], object]


@dataclass
class RoundingResult:
    """`q`: float16, the shape and device of the input. `info`: JSON-serialisable method metrics."""

    q: torch.Tensor
    info: dict = field(default_factory=dict)


def round_to_fp16(ws: torch.Tensor, *, top_k: int, num_iter: int,
                  calibration: "LayerCalibration | None" = None,
                  cancel: CancelHook | None = None) -> RoundingResult:
    """Round the scaled weight `ws` (float32, shape [out, ...]) to float16, choosing per element between its two
    neighbouring fp16 values. ``num_iter == 0`` is exactly RTN; exactly representable elements never move.

    With `calibration` (the layer's input statistics) the calibrated mode runs, otherwise the top-k mode.
    `cancel()` is called between passes and raises (or returns True) to abort.
    """
    if ws.dtype != torch.float32:
        raise TypeError(f"round_to_fp16 expects float32, got {ws.dtype}")
    shape = ws.shape
    rtn_info = {"method": "rtn", "iterations": 0}
    if num_iter <= 0 or ws.numel() == 0:
        return RoundingResult(ws.to(torch.float16), rtn_info)
    w2 = ws.reshape(shape[0], -1) if ws.dim() >= 2 else ws.reshape(1, -1)
    if calibration is not None:
        if calibration.in_features != w2.shape[1]:
            raise ValueError(f"calibration has {calibration.in_features} input features, weight has {w2.shape[1]}")
        q, info = gptq.calibrated(w2, calibration, num_iter, cancel, SHRINK, HELD_OUT_CHECK)
        if q is None:  # no gain on held-out rows: the layer is rounded as without calibration
            fallback = info
            if top_k > 0:
                q, info = _topk(w2, top_k, num_iter, cancel)
            else:
                q, info = w2.to(torch.float16), dict(rtn_info)
            info = {**info, **fallback}
    elif top_k <= 0:
        return RoundingResult(ws.to(torch.float16), rtn_info)
    else:
        q, info = _topk(w2, top_k, num_iter, cancel)
    return RoundingResult(q.view(shape), info)


def _topk(w2: torch.Tensor, top_k: int, num_iter: int, cancel: CancelHook | None) -> tuple[torch.Tensor, dict]:
    with torch.cuda.device(w2.device) if w2.is_cuda else contextlib.nullcontext():  # graphs, streams: its GPU
        return topk(w2, min(top_k, min(w2.shape)), min(num_iter, MAX_PASSES), cancel, USE_CUDA_GRAPHS)


def rtn_is_final(shape: tuple[int, ...], rtn_rel_error: float, *, top_k: int, num_iter: int,
                 calibration: "LayerCalibration | None" = None) -> dict | None:
    """For a caller that has already measured RTN's relative error: the info `round_to_fp16` would report when it
    would return RTN unchanged in top-k mode because that error is negligible (e.g. BF16 weights at scale 1, where
    only fp16 subnormals round), else None. Lets the converter skip the float32 copy and the pass over the tensor."""
    if calibration is not None or top_k <= 0 or num_iter <= 0 or rtn_rel_error > NEGLIGIBLE_REL:
        return None
    rows, cols = (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (1, math.prod(shape))
    return nothing_to_move(min(top_k, rows, cols))


def release_device_memory() -> None:
    """Drop the captured graphs and their buffers (the converter calls this when a conversion ends)."""
    release_all()


__all__ = ["EXACT_BASIS_DIM", "HELD_OUT_CHECK", "MAX_PASSES", "REFINE_SWEEPS", "RoundingResult", "SHRINK",
           "USE_CUDA_GRAPHS", "device_graphs", "neighbours", "principal_basis", "release_device_memory",
           "round_to_fp16", "rtn_is_final"]
