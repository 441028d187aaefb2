"""The streaming conversion pipeline: one safetensors file in, one scaled-FP16 safetensors file out.

Tensors are read one at a time by a prefetch thread, scaled, rounded and measured on the compute device, and handed
to a writer thread; at most a couple of tensors are in flight, so memory does not grow with model size. Progress
and metrics leave through `on_event` (see docs/ARCHITECTURE.md for the event fields).
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from typing import Callable

import torch

from ._version import __version__
from . import format as fmt
from .errors import Cancelled, ConversionError
from .metrics import fp16_limit, in_safe_range, measure
from .options import ConvertOptions
from .report import Summary, report_json
from .safetensors_io import AtomicFile, SafetensorsReader, StreamingWriter, check_input_path, clean_stale_temps
from .scaling import candidate_scale, worth_scaling
from .sources import TensorSource

EventCallback = Callable[[dict], None]
CancelHook = Callable[[], object]
# a quantized tensor whose stored values are this far from the weights (relative Frobenius error) is named as lossy
# in the report and by the command line: fp16 rounding itself costs ~3e-4; this much means values were flushed to
# zero or saturated (one power-of-two scale cannot cover the tensor's range)
LOSSY_REL_ERROR = 1e-2
# ... or when this share of its values is stored as 0 although the weight is not (a real model's tiniest values
# flush at a rate of ~1e-5 at most)
LOSSY_FLUSHED = 1e-2


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


def _check_cancel(cancel: CancelHook | None, index: int, total: int) -> None:
    if cancel is not None and cancel() is True:
        raise Cancelled(f"cancelled at tensor {index}/{total}, no file written", index, total)


class _BufferPool:
    """A few reusable host buffers for tensor bytes in flight (read, converted, being written).

    On the GPU path they are page-locked: host<->GPU copies from pinned memory run ~7x faster than from pageable
    memory, and pinning per tensor would cost more than the copy. On the CPU path they are plain memory reused from
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


class _Prefetcher:
    """Reads planned tensors in order on a background thread, at most `depth` ahead.

    Each item is (key, tensor, pool buffer or None). With a pool, tensors are read straight into the pool's buffers,
    which the consumer must hand back (`pool.release`) once it no longer needs the bytes.
    """

    def __init__(self, source: TensorSource, keys: list[str], depth: int = 2, pool: _BufferPool | None = None):
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


class _WriterThread:
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


def _quantize(key: str, w: torch.Tensor, options: ConvertOptions, device: torch.device, layer_cal, cancel_fn,
              path: str, out: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, dict, torch.Tensor | None]:
    """Scale, round and measure one weight. Returns (fp16 on `device`, scale tensor, metrics, bias delta or None).
    `out` (CPU, optional): a reusable buffer for the round-to-nearest result, returned as a view when it stays."""
    t0 = time.perf_counter()
    w = w.to(device, non_blocking=True)
    if w.numel():
        lo, hi = torch.aminmax(w)
        max_abs = max(-float(lo), float(hi))
    else:
        max_abs = 0.0
    if not math.isfinite(max_abs):
        raise ConversionError(f"{path}: tensor '{key}' contains NaN or infinite values; refusing to convert it")
    scale, alt = candidate_scale(max_abs, options.scale)
    q_rtn, m = measure(w, scale, out=out, max_abs=max_abs)  # round-to-nearest, measured in the same pass
    if alt is not None and worth_scaling(w, alt, math.ldexp(m["rtn_err_sq"], m.get("sq_exp", 0)),
                                         math.ldexp(m["w_sq"], m.get("sq_exp", 0)), m["tiny_err_sq"]):
        scale = alt
        q_rtn, m = measure(w, scale, out=out, max_abs=max_abs)
    q, info = q_rtn, {"method": "rtn"}
    if not in_safe_range(max_abs):
        pass  # magnitudes no real weight has (beyond 2^+-40): round to nearest, measured in float64
    elif options.num_iter > 0 and m["err_sq"] == 0.0:
        info = {"method": "exact"}  # every element is representable: there is nothing to round
    elif options.num_iter > 0 and (final := _rounding().rtn_is_final(
            tuple(w.shape), m["rel_error"], top_k=options.top_k, num_iter=options.num_iter,
            calibration=layer_cal)) is not None:
        info = final  # RTN's error is negligible (BF16 at scale 1): nothing to learn, no pass over the tensor
    elif options.num_iter > 0:
        rounding = _rounding()
        ws = w.float()
        if scale != 1.0:
            ws = ws * (1.0 / scale)  # exact: power of two
        try:
            res = rounding.round_to_fp16(ws, top_k=options.top_k, num_iter=options.num_iter,
                                         calibration=layer_cal, cancel=cancel_fn)
        except ValueError as e:  # e.g. calibration statistics of another width than this weight
            raise ConversionError(f"{path}: tensor '{key}': {e}") from None
        q, info = res.q, dict(res.info)
        if not torch.equal(q, q_rtn):
            _, m = measure(w, scale, q, max_abs=max_abs)
            if options.calib_samples > 0 and layer_cal is None:  # calibrated layers report real output errors
                m.update(_out_randn(w, q, q_rtn, scale, options.calib_samples, device))
    m["max_abs"] = max_abs
    if m["nonfinite"]:  # cannot happen with the clamped scales; a guard against writing a broken file
        raise ConversionError(f"{path}: tensor '{key}' produced {m['nonfinite']} non-finite fp16 values")
    if m["rel_error"] > LOSSY_REL_ERROR or m["flushed_to_zero"] > LOSSY_FLUSHED * m["numel"]:
        m["lossy"] = _lossy_reason(m)
    delta = None
    if layer_cal is not None and options.bias_correction and layer_cal.has_bias:
        from .calibration import bias_correction_figures
        deq = q.float() * scale if scale != 1.0 else q.float()
        delta, figures = bias_correction_figures(deq, w.float(), layer_cal, q_rtn.float() * scale)
        info = {**info, **figures}
    m.update(info)
    m["seconds"] = time.perf_counter() - t0
    return q, torch.tensor([scale], dtype=torch.float32), m, delta


def _lossy_reason(m: dict) -> str:
    parts = [f"relF {m['rel_error']:.3g}"]
    if m["flushed_to_zero"]:
        parts.append(f"{m['flushed_to_zero']} of {m['numel']} values stored as 0")
    if m["max_abs"] > fp16_limit(m["scale"]) * m["scale"]:
        parts.append("values beyond float32's range saturated")
    return "; ".join(parts)


def _out_randn(w: torch.Tensor, q: torch.Tensor, q_rtn: torch.Tensor, scale: float, samples: int,
               device: torch.device) -> dict:
    """The out(randn) figure (report only) for a weight the learned rounding changed, measured on `samples`
    synthetic rows (`calib_samples`); on the CPU only where it is cheap enough (see rounding.OUT_RANDN_CPU_FLOP)."""
    rounding = _rounding()
    if device.type == "cpu" and rounding.out_randn_flop(tuple(w.shape), samples) > rounding.OUT_RANDN_CPU_FLOP:
        return {"out_randn_skipped": "cost on the CPU"}
    return rounding.synthetic_output_error(w, q.float() * scale, samples, rtn_deq=q_rtn.float() * scale)


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
    check_output_path(src, dst, options.overwrite, options.calibration)
    if report_path:
        check_report_path(report_path, src, dst, options.overwrite, options.calibration)
    resolve_device(options.device)  # before opening anything: a bad device is a usage error
    with SafetensorsReader(src) as reader:
        return convert(reader, dst, options, on_event, cancel, report_path)


def convert(source, dst: str, options: ConvertOptions | None = None, on_event: EventCallback | None = None,
            cancel: CancelHook | None = None, report_path: str | None = None) -> dict:
    """Convert any tensor source (a `SafetensorsReader`, or a `sources.StateDictSource` for tensors in memory) to
    the scaled-FP16 file `dst`. Same events, cancel, report and no-partial-file guarantees as `convert_file`.

    Whatever the conversion held on a GPU (the rounding's captured graphs, their buffers, torch's cache of the
    tensors it used) is given back when it ends, however it ends."""
    try:
        return _convert(source, dst, options, on_event, cancel, report_path)
    finally:
        _release_device_memory()


def _convert(source, dst: str, options: ConvertOptions | None, on_event: EventCallback | None,
             cancel: CancelHook | None, report_path: str | None) -> dict:
    options = options or ConvertOptions()
    options.validate()
    check_output_path(source.path if isinstance(source, SafetensorsReader) else None, dst, options.overwrite,
                      options.calibration)
    if report_path:
        check_report_path(report_path, source.path if isinstance(source, SafetensorsReader) else None, dst,
                          options.overwrite, options.calibration)
    device = resolve_device(options.device)
    started = time.time()
    for folder in {os.path.dirname(os.path.abspath(p)) for p in (dst, report_path) if p}:
        clean_stale_temps(folder, started)  # left by a conversion that was killed (no handler saw it)
    emit = on_event or (lambda e: None)
    rules = fmt.Rules(options.t5xxl, options.keep_distillation)
    src = source.path

    calibration = None
    if options.calibration:
        from .calibration import load_calibration
        calibration = load_calibration(options.calibration)

    t_start = time.perf_counter()
    header = source.header
    items = fmt.plan(header, rules)
    total = len(items)
    bytes_total = sum(i.nbytes for i in items)
    meta = fmt.metadata(header.metadata, src, options.settings(), __version__)
    summary = Summary(src, dst, options.settings(), header.file_size)
    with StreamingWriter(dst, fmt.output_entries(items, rules), meta, options.overwrite) as writer, \
            (AtomicFile(report_path, options.overwrite) if report_path else _NoFile()) as report_file:
        emit({"type": "start", "source": src, "output": dst, "total": total, "bytes_total": bytes_total,
              "settings": options.settings(), "device": str(device)})
        keys = [i.key for i in items if i.action != fmt.REMOVE]
        cuda = device.type == "cuda"
        # reusable host buffers: results for any source; reads only where the source can read into a buffer.
        # CPU: one buffer per tensor in flight (prefetch queue + the one in use; written-out ones come back)
        count = 2 if cuda else 3
        biggest_q = max((2 * math.prod(i.shape) for i in items if i.action == fmt.QUANTIZE), default=0)
        out_pool = _BufferPool(biggest_q, count, pin=cuda) if biggest_q else None
        in_pool = None
        if source.reads_into_buffers:
            in_pool = _BufferPool(max((i.nbytes for i in items), default=1), count, pin=cuda)
        prefetch = _Prefetcher(source, keys, pool=in_pool)
        out = _WriterThread(writer)
        bias_deltas: dict[str, torch.Tensor] = {}
        bytes_done = 0
        try:
            for index, item in enumerate(items, 1):
                _check_cancel(cancel, index, total)
                cancel_fn = (lambda i=index: _check_cancel(cancel, i, total)) if cancel else None
                scale = None
                m: dict = {}
                buf = None
                if item.action != fmt.REMOVE:
                    key, t, buf = prefetch.get()
                    assert key == item.key
                if item.action == fmt.QUANTIZE:
                    layer_cal = calibration.get(item.key) if calibration is not None else None
                    obuf = out_pool.acquire() if out_pool is not None and not cuda else None
                    try:
                        q, scale_t, m, delta = _quantize(item.key, t, options, device, layer_cal, cancel_fn, src,
                                                         out=obuf)
                    except BaseException:
                        if obuf is not None:
                            out_pool.release(obuf)
                        raise
                    scale = float(scale_t[0])
                    if buf is not None:  # done with the input (on a GPU: _quantize synced on its metrics)
                        in_pool.release(buf)
                    if obuf is not None:  # CPU: the result sits in the pooled buffer unless rounding replaced it
                        if q.untyped_storage().data_ptr() == obuf.data_ptr():
                            out.put(item.key, q, lambda b=obuf: out_pool.release(b))
                        else:
                            out_pool.release(obuf)
                            out.put(item.key, q)
                    elif cuda and out_pool is not None:
                        obuf = out_pool.acquire()
                        host = obuf[: 2 * q.numel()].view(torch.float16).view(q.shape)
                        host.copy_(q, non_blocking=True)
                        torch.cuda.current_stream(device).synchronize()
                        out.put(item.key, host, lambda b=obuf: out_pool.release(b))
                    else:
                        out.put(item.key, q.cpu())
                    out.put(item.outputs[1][0], scale_t)
                    if rules.t5xxl:
                        out.put(item.outputs[2][0], scale_t.clone())
                    if delta is not None:
                        bias_deltas[fmt.layer_of(item.key) + ".bias"] = delta
                elif item.action == fmt.KEEP_UNSCALED:
                    scale = 1.0
                    out.put(item.key, t, _releaser(in_pool, buf))
                    out.put(item.outputs[1][0], torch.ones(1, dtype=torch.float32))
                elif item.action == fmt.KEEP:
                    delta = bias_deltas.pop(item.key, None)
                    if delta is not None:
                        t, m = _apply_bias_delta(t, delta)
                    out.put(item.key, t, _releaser(in_pool, buf))
                bytes_done += item.nbytes
                elapsed = time.perf_counter() - t_start
                rate = bytes_done / elapsed if elapsed > 0 else None
                event = {
                    "type": "tensor", "key": item.key, "index": index, "total": total,
                    "shape": list(item.shape), "dtype": fmt.dtype_name(item.dtype),
                    "action": fmt.ACTION_NAMES[item.action], "scale": scale,
                    "bytes_done": bytes_done, "bytes_total": bytes_total, "elapsed_s": elapsed,
                    "eta_s": (bytes_total - bytes_done) / rate if rate else None,
                    "rate_bytes_s": rate, "metrics": m,
                }
                summary.add(event)
                emit(event)
            for key, marker in fmt.markers(rules).items():
                out.put(key, marker)
            out.finish()
        except BaseException:
            prefetch.close()
            try:
                out.finish()
            except BaseException:
                pass
            raise
        prefetch.close()
        writer.sync()
        report = summary.finish(writer.total_bytes, time.perf_counter() - t_start)
        if report_path:
            report_file.write(report_json(report).encode("utf-8"))
            report_file.sync()
        _check_cancel(cancel, total, total)  # the last moment a cancel leaves nothing behind
        writer.commit()
        if report_path:
            try:
                report_file.commit()
            except BaseException:
                os.unlink(writer.path)  # both or neither
                raise
    emit({"type": "done", "report": report})
    return report


class _NoFile:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


_ROUNDING = None  # the rounding module once a conversion needed it (whatever name the package was imported under)


def _rounding():
    global _ROUNDING
    if _ROUNDING is None:
        from . import rounding  # imported on first use: a plain --num_iter 0 conversion never needs it
        _ROUNDING = rounding
    return _ROUNDING


def _release_device_memory() -> None:
    """Give back what a conversion held on the GPU: the rounding's captured graphs and buffers (through the module
    object imported above, so it works under any package name, e.g. the folder path ComfyUI imports a pack under),
    then torch's cached blocks, so that whatever runs next in the process (in ComfyUI: sampling) finds them free."""
    if _ROUNDING is not None:
        _ROUNDING.release_device_memory()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        # cuBLAS keeps a workspace (32 MiB on Hopper) for every stream that ran a matrix product, the rounding's
        # capture streams included, allocated through torch's allocator and never freed by empty_cache(): two
        # conversions left 96 MiB allocated on an H200. torch's own (underscored) hook drops them; the next
        # product anywhere allocates its workspace again.
        clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear_workspaces is not None:
            clear_workspaces()
        torch.cuda.empty_cache()


def _releaser(pool: _BufferPool | None, buf: torch.Tensor | None) -> Callable[[], None] | None:
    return (lambda: pool.release(buf)) if pool is not None and buf is not None else None


def _apply_bias_delta(bias: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, dict]:
    b = bias.float()
    new = (b + delta.to(b.device, torch.float32)).to(bias.dtype)
    bn = float(b.norm())
    change = float((new.float() - b).norm())
    return new, {"bias_corrected": True, "bias_change": change / bn if bn > 0 else change}


__all__ = ["ConvertOptions", "convert", "convert_file", "resolve_device"]
