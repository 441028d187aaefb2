"""The streaming conversion pipeline: one tensor source in, one scaled-FP16 safetensors file out.

`convert_file` / `convert` check their arguments once, then `_Conversion` runs the plan (format.plan) top to
bottom: a prefetch thread reads tensors in order (workers.py), each weight is quantized on the compute device
(quantize.py), everything else is copied, and a writer thread streams the results into a temporary file that
replaces the output only when all of it (and the report) is written. Progress and metrics leave through `on_event`
(docs/ARCHITECTURE.md, "Events" and "Report schema").
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable

import torch

from . import format as fmt
from ._version import __version__
from .errors import Cancelled, ConversionError
from .options import ConvertOptions
from .quantize import loaded_rounding, quantize
from .report import Summary, report_json
from .safetensors_io import AtomicFile, SafetensorsReader, StreamingWriter, check_input_path, clean_stale_temps
from .sources import TensorSource
from .workers import BufferPool, Prefetcher, WriterThread

EventCallback = Callable[[dict], None]
CancelHook = Callable[[], object]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConversionError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConversionError(f"device '{name}' is not supported; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConversionError(f"device '{name}' requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConversionError(f"device '{name}' requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


def check_output_path(src: str | None, dst: str, overwrite: bool, calibration: str | None = None) -> None:
    if src is not None and os.path.realpath(src) == os.path.realpath(dst):
        raise ConversionError(f"{dst}: output is the input file; choose another output name")
    if calibration and os.path.realpath(calibration) == os.path.realpath(dst):
        raise ConversionError(f"{dst}: output is the calibration file; choose another output name")
    if os.path.isdir(dst):
        raise ConversionError(f"{dst}: is a folder; give an output file name")
    if os.path.exists(dst) and not overwrite:
        raise ConversionError(f"{dst}: already exists (use --overwrite to replace it)")
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        raise ConversionError(f"{dst}: output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ConversionError(f"{dst}: output folder {folder} is not writable")


def check_report_path(report: str, src: str | None, dst: str, overwrite: bool, calibration: str | None = None) -> None:
    """The JSON report's path obeys the output's rules (never an input, never the output, an existing file only with
    overwrite, a writable folder); checked before any work."""
    real = os.path.realpath(report)
    for what, other in (("input", src), ("calibration file", calibration), ("output", dst)):
        if other and real == os.path.realpath(other):
            raise ConversionError(f"{report}: the report would replace the {what}; choose another report name")
    check_output_path(None, report, overwrite)


def convert_file(src: str, dst: str | None = None, options: ConvertOptions | None = None,
                 on_event: EventCallback | None = None, cancel: CancelHook | None = None,
                 report_path: str | None = None) -> dict:
    """Convert safetensors file `src` to a scaled-FP16 file `dst` and return the report (see report.py).

    `dst` defaults to the reference script's naming beside the input. `on_event` receives start/tensor/done events.
    `cancel` is called between tensors and inside long loops; it cancels by raising or by returning True. On any
    failure no output or temporary file is left and the input is never modified.

    `report_path`: also write the report there as strict JSON. It is checked with the output before any work
    (never an input or the output; an existing file only with `overwrite`) and written before the model is put in
    place, so that either both appear or neither does.
    """
    options = options or ConvertOptions()
    options.validate()
    check_input_path(src)
    dst = dst or fmt.default_output_path(src, options.keep_distillation)
    device = _check(src, dst, options, report_path)
    with SafetensorsReader(src) as reader:
        return _run(reader, dst, options, device, on_event, cancel, report_path)


def convert(source: TensorSource, dst: str, options: ConvertOptions | None = None,
            on_event: EventCallback | None = None, cancel: CancelHook | None = None,
            report_path: str | None = None) -> dict:
    """Convert any tensor source (a `SafetensorsReader`, or a `sources.StateDictSource` for tensors in memory) to
    the scaled-FP16 file `dst`. Same events, cancel, report and no-partial-file guarantees as `convert_file`."""
    options = options or ConvertOptions()
    options.validate()
    src = source.path if isinstance(source, SafetensorsReader) else None  # a file: never overwrite it
    device = _check(src, dst, options, report_path)
    return _run(source, dst, options, device, on_event, cancel, report_path)


def _check(src: str | None, dst: str, options: ConvertOptions, report_path: str | None) -> torch.device:
    """Every check of the output, the report path and the device, before anything is opened or written."""
    check_output_path(src, dst, options.overwrite, options.calibration)
    if report_path:
        check_report_path(report_path, src, dst, options.overwrite, options.calibration)
    return resolve_device(options.device)  # a bad device is a usage error


def _run(source: TensorSource, dst: str, options: ConvertOptions, device: torch.device,
         on_event: EventCallback | None, cancel: CancelHook | None, report_path: str | None) -> dict:
    """Whatever the conversion held on a GPU (the rounding's captured graphs, their buffers, torch's cache of the
    tensors it used) is given back when it ends, however it ends."""
    try:
        started = time.time()
        for folder in {os.path.dirname(os.path.abspath(p)) for p in (dst, report_path) if p}:
            clean_stale_temps(folder, started)  # left by a conversion that was killed (no handler saw it)
        return _Conversion(source, dst, options, device, on_event, cancel).run(report_path)
    finally:
        _release_device_memory()


class _Conversion:
    """One conversion's plan, buffers and threads; `run` streams the plan through them."""

    def __init__(self, source: TensorSource, dst: str, options: ConvertOptions, device: torch.device,
                 on_event: EventCallback | None, cancel: CancelHook | None):
        self.source, self.dst, self.options, self.device = source, dst, options, device
        self.emit = on_event or (lambda e: None)
        self.cancel = cancel
        self.rules = fmt.Rules(options.t5xxl, options.keep_distillation)
        self.calibration = None
        if options.calibration:
            from .calibration import load_calibration
            self.calibration = load_calibration(options.calibration, device=device)  # v3 matrices built there
        self.items = fmt.plan(source.header, self.rules)
        self.total = len(self.items)
        self.bytes_total = sum(i.nbytes for i in self.items)
        self.cuda = device.type == "cuda"
        self.bias_deltas: dict[str, torch.Tensor] = {}

    def run(self, report_path: str | None) -> dict:
        src, options = self.source.path, self.options
        t_start = time.perf_counter()
        meta = fmt.metadata(self.source.header.metadata, src, options.settings(), __version__)
        summary = Summary(src, self.dst, options.settings(), self.source.header.file_size)
        with StreamingWriter(self.dst, fmt.output_entries(self.items, self.rules), meta, options.overwrite) as writer, \
                (AtomicFile(report_path, options.overwrite) if report_path else _NoFile()) as report_file:
            self.emit({"type": "start", "source": src, "output": self.dst, "total": self.total,
                       "bytes_total": self.bytes_total, "settings": options.settings(), "device": str(self.device)})
            self._pools()
            self.prefetch = Prefetcher(self.source, [i.key for i in self.items if i.action != fmt.REMOVE],
                                       pool=self.in_pool)
            self.out = WriterThread(writer)
            try:
                bytes_done = 0
                for index, item in enumerate(self.items, 1):
                    _check_cancel(self.cancel, index, self.total)
                    scale, m = self._convert_item(index, item)
                    bytes_done += item.nbytes
                    event = self._tensor_event(index, item, scale, m, bytes_done, time.perf_counter() - t_start)
                    summary.add(event)
                    self.emit(event)
                for key, marker in fmt.markers(self.rules).items():
                    self.out.put(key, marker)
                self.out.finish()
            except BaseException:
                self.prefetch.close()
                try:
                    self.out.finish()
                except BaseException:
                    pass
                raise
            self.prefetch.close()
            writer.sync()
            report = summary.finish(writer.total_bytes, time.perf_counter() - t_start)
            if report_path:
                report_file.write(report_json(report).encode("utf-8"))
                report_file.sync()
            _check_cancel(self.cancel, self.total, self.total)  # the last moment a cancel leaves nothing behind
            writer.commit()
            if report_path:
                try:
                    report_file.commit()
                except BaseException:
                    os.unlink(writer.path)  # both or neither
                    raise
        self.emit({"type": "done", "report": report})
        return report

    def _pools(self) -> None:
        """Reusable host buffers: results for any source; reads only where the source reads into buffers.
        CPU: one buffer per tensor in flight (prefetch queue + the one in use; written-out ones come back)."""
        count = 2 if self.cuda else 3
        biggest_q = max((2 * math.prod(i.shape) for i in self.items if i.action == fmt.QUANTIZE), default=0)
        self.out_pool = BufferPool(biggest_q, count, pin=self.cuda) if biggest_q else None
        self.in_pool = None
        if self.source.reads_into_buffers:
            self.in_pool = BufferPool(max((i.nbytes for i in self.items), default=1), count, pin=self.cuda)

    def _convert_item(self, index: int, item: fmt.PlanItem) -> tuple[float | None, dict]:
        """Read, convert and hand one planned tensor to the writer; returns (scale or None, its figures)."""
        if item.action == fmt.REMOVE:
            return None, {}
        key, t, buf = self.prefetch.get()
        assert key == item.key
        if item.action == fmt.QUANTIZE:
            return self._quantize_item(index, item, t, buf)
        if item.action == fmt.KEEP_UNSCALED:
            self.out.put(item.key, t, self._releaser(self.in_pool, buf))
            self.out.put(item.outputs[1][0], torch.ones(1, dtype=torch.float32))
            return 1.0, {}
        m: dict = {}
        delta = self.bias_deltas.pop(item.key, None)  # KEEP: a bias whose weight's rounding asked to correct it
        if delta is not None:
            t, m = _apply_bias_delta(t, delta)
        self.out.put(item.key, t, self._releaser(self.in_pool, buf))
        return None, m

    def _quantize_item(self, index: int, item: fmt.PlanItem, t: torch.Tensor, buf: torch.Tensor | None
                       ) -> tuple[float, dict]:
        layer_cal = self.calibration.get(item.key) if self.calibration is not None else None
        cancel_fn = (lambda: _check_cancel(self.cancel, index, self.total)) if self.cancel else None
        obuf = self.out_pool.acquire() if self.out_pool is not None and not self.cuda else None
        try:
            r = quantize(item.key, t, self.options, self.device, layer_cal, cancel_fn, self.source.path, out=obuf)
        except BaseException:
            if obuf is not None:
                self.out_pool.release(obuf)
            raise
        if buf is not None:  # done with the input (on a GPU: quantize synced on its figures)
            self.in_pool.release(buf)
        self._put_fp16(item.key, r.q, obuf)
        scale_t = r.scale_tensor()
        self.out.put(item.outputs[1][0], scale_t)
        if self.rules.t5xxl:
            self.out.put(item.outputs[2][0], scale_t.clone())
        if r.bias_delta is not None:
            self.bias_deltas[fmt.layer_of(item.key) + ".bias"] = r.bias_delta
        return float(scale_t[0]), r.figures

    def _put_fp16(self, key: str, q: torch.Tensor, obuf: torch.Tensor | None) -> None:
        """Hand the stored fp16 tensor to the writer from host memory the pool recycles where it can."""
        if obuf is not None:  # CPU: the result sits in the pooled buffer unless rounding replaced it
            if q.untyped_storage().data_ptr() == obuf.data_ptr():
                self.out.put(key, q, lambda: self.out_pool.release(obuf))
            else:
                self.out_pool.release(obuf)
                self.out.put(key, q)
        elif self.cuda and self.out_pool is not None:
            obuf = self.out_pool.acquire()
            host = obuf[: 2 * q.numel()].view(torch.float16).view(q.shape)
            host.copy_(q, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
            self.out.put(key, host, lambda: self.out_pool.release(obuf))
        else:
            self.out.put(key, q.cpu())

    def _tensor_event(self, index: int, item: fmt.PlanItem, scale: float | None, m: dict, bytes_done: int,
                      elapsed: float) -> dict:
        rate = bytes_done / elapsed if elapsed > 0 else None
        return {
            "type": "tensor", "key": item.key, "index": index, "total": self.total,
            "shape": list(item.shape), "dtype": fmt.dtype_name(item.dtype),
            "action": fmt.ACTION_NAMES[item.action], "scale": scale,
            "bytes_done": bytes_done, "bytes_total": self.bytes_total, "elapsed_s": elapsed,
            "eta_s": (self.bytes_total - bytes_done) / rate if rate else None,
            "rate_bytes_s": rate, "metrics": m,
        }

    @staticmethod
    def _releaser(pool: BufferPool | None, buf: torch.Tensor | None) -> Callable[[], None] | None:
        return (lambda: pool.release(buf)) if pool is not None and buf is not None else None


def _check_cancel(cancel: CancelHook | None, index: int, total: int) -> None:
    if cancel is not None and cancel() is True:
        raise Cancelled(f"cancelled at tensor {index}/{total}, no file written", index, total)


class _NoFile:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _release_device_memory() -> None:
    """Give back what a conversion held on the GPU: the rounding's captured graphs and buffers (through the package
    object quantize.py imported, so it works under any package name, e.g. the folder path ComfyUI imports a pack
    under), then torch's cached blocks, so that whatever runs next in the process (in ComfyUI: sampling) finds them
    free."""
    rounding = loaded_rounding()
    if rounding is not None:
        rounding.release_device_memory()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        # cuBLAS keeps a workspace for every stream that ran a matrix product, the rounding's capture streams
        # included, allocated through torch's allocator and never freed by empty_cache() (measured:
        # benchmarks/gpu_memory_after_conversion.py). torch's own (underscored) hook drops them; the next product
        # anywhere allocates its workspace again.
        clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear_workspaces is not None:
            clear_workspaces()
        torch.cuda.empty_cache()


def _apply_bias_delta(bias: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, dict]:
    b = bias.float()
    new = (b + delta.to(b.device, torch.float32)).to(bias.dtype)
    bn = float(b.norm())
    change = float((new.float() - b).norm())
    return new, {"bias_corrected": True, "bias_change": change / bn if bn > 0 else change}


__all__ = ["ConvertOptions", "convert", "convert_file", "resolve_device"]
