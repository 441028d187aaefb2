"""The converter's background threads: a prefetching reader, a writer, and the reusable host buffers between them.

At most a couple of tensors are in flight, so memory does not grow with model size; the reader and the writer
overlap disk I/O with the computation on the main thread.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

import torch

from .safetensors_io import StreamingWriter
from .sources import TensorSource


class BufferPool:
    """A few reusable host buffers for tensor bytes in flight (read, converted, being written).

    On the GPU path they are page-locked: host<->GPU copies from pinned memory run several times faster than from
    pageable memory, and pinning per tensor would cost more than the copy. On the CPU path they are plain memory reused from
    tensor to tensor: a fresh buffer per tensor is page-faulted (and zeroed by the kernel) on first touch, which for
    BF16 input cost about as much as the conversion arithmetic itself. Memory stays bounded at `count` buffers.
    """

    def __init__(self, nbytes: int, count: int, pin: bool):
        self._free: queue.Queue = queue.Queue()
        for _ in range(count):
            self._free.put(torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin))

    def acquire(self, stop: threading.Event | None = None) -> torch.Tensor | None:
        while True:
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                if stop is not None and stop.is_set():
                    return None

    def release(self, buf: torch.Tensor) -> None:
        self._free.put(buf)


class Prefetcher:
    """Reads planned tensors in order on a background thread, at most `depth` ahead.

    Each item is (key, tensor, pool buffer or None). With a pool, tensors are read straight into the pool's buffers,
    which the consumer must hand back (`pool.release`) once it no longer needs the bytes.
    """

    def __init__(self, source: TensorSource, keys: list[str], depth: int = 2, pool: BufferPool | None = None):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._pool = pool
        self._thread = threading.Thread(target=self._run, args=(source, keys), daemon=True, name="fp16lr-read")
        self._thread.start()

    def _run(self, source: TensorSource, keys: list[str]) -> None:
        for key in keys:
            if self._stop.is_set():
                return
            try:
                buf = None
                if self._pool is not None:
                    buf = self._pool.acquire(self._stop)
                    if buf is None:
                        return
                item = (key, source.read(key, buf), buf, None)
            except BaseException as e:  # handed to the consumer, which raises it
                item = (key, None, None, e)
            while not self._stop.is_set():
                try:
                    self._q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[3] is not None:
                return

    def get(self) -> tuple[str, torch.Tensor, torch.Tensor | None]:
        key, t, buf, err = self._q.get()
        if err is not None:
            raise err
        return key, t, buf

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a pending put
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        self._thread.join()


class WriterThread:
    """Writes tensors to a StreamingWriter on a background thread so disk writes overlap compute.
    `release`, if given, is called once a tensor's bytes are written (to recycle its pinned buffer)."""

    def __init__(self, writer: StreamingWriter, depth: int = 2):
        self._w = writer
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="fp16lr-write")
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            key, t, release = item
            if self.error is None:
                try:
                    self._w.write(key, t)
                except BaseException as e:
                    self.error = e
            if release is not None:
                release()

    def put(self, key: str, t: torch.Tensor, release: Callable[[], None] | None = None) -> None:
        if self.error is not None:
            raise self.error
        self._q.put((key, t, release))

    def finish(self) -> None:
        self._q.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error
