"""CUDA graphs: fixed-shape work captured once per shape and replayed (device-side infrastructure, generic).

The rounding of one tensor is a few hundred small kernels; launched one by one from Python, the host's launch
overhead (not the GPU) sets the time. Work that depends on shapes only (the top-k mode's Krylov basis, shape
[m, n], and its flip search, shape: the candidate pool padded to a `bucket`) is captured as a CUDA graph the second
time a shape comes up and replayed for every later tensor of that shape: a FLUX or T5 file repeats each layer
shape dozens of times. Inputs and state live in per-device buffers shared by all graphs (graphs run one after
the other on one stream); when a buffer has to grow, every graph is dropped and captured again.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch

GRAPH_BUCKETS_PER_OCTAVE = 8  # padded sizes (e.g. of a candidate pool) come in this many steps per octave


def bucket(count: int) -> int:
    """The padded pool size for `count` candidates: the next of 8 sizes per octave, a multiple of 1024."""
    if count <= 1024:
        return 1024
    size = 2.0 ** (math.ceil(math.log2(count) * GRAPH_BUCKETS_PER_OCTAVE) / GRAPH_BUCKETS_PER_OCTAVE)
    return max(count, -(-int(math.ceil(size)) // 1024) * 1024)


class DeviceGraphs:
    """One CUDA device's captured graphs, the shared buffers they read and write, and constants kept there."""

    def __init__(self, device: torch.device):
        self.device = device
        self._buffers: dict[str, torch.Tensor] = {}
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._seen: dict[tuple, int] = {}
        self._constants: dict[tuple, torch.Tensor] = {}
        self._pool = torch.cuda.graph_pool_handle()
        self._stream = torch.cuda.Stream(device)
        self.captures = 0
        self.disabled = False

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A view of the shared buffer `name` (grown by a quarter beyond need when too small; growing drops
        every graph, since they hold the old addresses)."""
        nbytes = max(1, math.prod(shape)) * dtype.itemsize
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < nbytes:
            self._drop_graphs()
            grown = nbytes if buf is None else max(nbytes, buf.numel() + buf.numel() // 4)
            del buf
            self._buffers.pop(name, None)
            buf = self._buffers[name] = torch.empty(grown, dtype=torch.uint8, device=self.device)
        return buf[:nbytes].view(dtype)[: math.prod(shape)].view(shape)

    def constant(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A tensor made once per key on the CPU and kept on the device."""
        t = self._constants.get(key)
        if t is None:
            t = self._constants[key] = make().to(self.device)
        return t

    def worth_capturing(self, key: tuple) -> bool:
        """Capture on a key's second use: a shape that comes up once runs eagerly (capturing costs a few runs)."""
        if key in self._graphs:
            return True
        if self.disabled:
            return False
        self._seen[key] = self._seen.get(key, 0) + 1
        return self._seen[key] >= 2

    def ensure(self, key: tuple, fn: Callable[[], None]) -> bool:
        """Capture `fn` under `key` unless captured; True when a graph is ready to replay. A capture runs `fn` once
        for warm-up (lazy library set-up stays out of the graph), so `fn`'s effects must be made good by the
        caller. If capturing fails (a PyTorch or driver without support for some operation), graphs are switched
        off for this device with a warning and the caller runs `fn` eagerly: same results, more launches."""
        if key in self._graphs:
            return True
        if self.disabled:
            return False
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(self._stream):
                fn()
                # thread-local: the converter's reader thread may use the device meanwhile
                graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    fn()
                finally:
                    graph.capture_end()
        except Exception as exc:  # noqa: BLE001 - any capture failure means: run eagerly
            current.wait_stream(self._stream)
            self.disabled = True
            self._drop_graphs()
            warnings.warn(f"quant_core: CUDA graph capture failed on {self.device} ({exc}); the learned rounding "
                          "runs without graphs (same results, slower)", RuntimeWarning, stacklevel=2)
            return False
        current.wait_stream(self._stream)
        self._graphs[key] = graph
        self.captures += 1
        return True

    def replay(self, key: tuple) -> None:
        self._graphs[key].replay()

    def _drop_graphs(self) -> None:
        if self._graphs:
            torch.cuda.current_stream(self.device).synchronize()
            self._graphs.clear()
            self._pool = torch.cuda.graph_pool_handle()

    def release(self) -> None:
        self._drop_graphs()
        self._buffers.clear()
        self._seen.clear()
        self._constants.clear()


_GRAPHS: dict[torch.device, DeviceGraphs] = {}


def device_graphs(dev: torch.device) -> DeviceGraphs | None:
    """The graph cache of CUDA device `dev` (its current device when it has no index); None off CUDA."""
    if dev.type != "cuda":
        return None
    dev = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
    graphs = _GRAPHS.get(dev)
    if graphs is None:
        graphs = _GRAPHS[dev] = DeviceGraphs(dev)
    return graphs


def release_all() -> None:
    """Drop every device's captured graphs and their buffers."""
    for graphs in _GRAPHS.values():
        graphs.release()
    _GRAPHS.clear()
