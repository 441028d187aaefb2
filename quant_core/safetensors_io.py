"""Streaming safetensors I/O: a validating header parser, a random-access reader and a streaming writer.

The safetensors library reads lazily (``safe_open``) but has no streaming writer, so `StreamingWriter` writes the
header from the planned dtypes/shapes first and then the tensor bytes one at a time into a temporary file beside
the destination; `commit()` fsyncs and renames it into place. Any failure before `commit()` removes the temporary
file, so a crash, a cancel or a full disk never leaves a partial output behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import secrets
import stat
import struct
from dataclasses import dataclass
from typing import Iterable

import torch
from safetensors import safe_open

from .errors import ConversionError

# safetensors' own reader refuses headers above 100 MB; a real FLUX header is ~100 kB.
MAX_HEADER_BYTES = 100 * 1024 * 1024
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")

DTYPES: dict[str, tuple[torch.dtype | None, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
    "U16": (getattr(torch, "uint16", None), 2), "U32": (getattr(torch, "uint32", None), 4),
    "U64": (getattr(torch, "uint64", None), 8),
    "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 1), "F8_E5M2": (getattr(torch, "float8_e5m2", None), 1),
}
TORCH_TO_ST = {dt: name for name, (dt, _) in DTYPES.items() if dt is not None}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
INT64_MAX = 2 ** 63 - 1

try:  # advisory locks mark a temporary file as in use (POSIX); without them stale files are not cleaned up
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

# Temporary files of this converter: ".<final name, shortened if needed>.<8 hex>.sf16-partial" in the output folder.
TEMP_SUFFIX = ".sf16-partial"
_TEMP_RE = re.compile(r"^\..*\.[0-9a-f]{8}" + re.escape(TEMP_SUFFIX) + r"$", re.DOTALL)


@dataclass(frozen=True)
class TensorInfo:
    """One header entry. `begin`/`end` are byte offsets into the data section."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


@dataclass(frozen=True)
class Header:
    path: str
    tensors: dict[str, TensorInfo]  # in data-offset order
    metadata: dict[str, str]
    data_start: int  # byte offset of the data section in the file
    file_size: int


def check_input_path(path: str) -> None:
    """Refuse inputs we must not or cannot read, before touching them. Pickle files are never opened."""
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise ConversionError(
            f"{path}: pickle-based checkpoints ({', '.join(PICKLE_SUFFIXES)}) are refused because loading them can run "
            "arbitrary code; convert it to .safetensors with a tool you trust first")
    if not os.path.exists(path):
        raise ConversionError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: not a regular file")


def read_header(path: str) -> Header:
    """Parse and validate a safetensors header without reading tensor data.

    Raises `ConversionError` naming the file (and tensor) for anything that is not a complete, well-formed
    safetensors file: wrong magic/size, malformed or oversized JSON, unknown dtypes, offsets outside the file.
    """
    check_input_path(path)
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ConversionError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise ConversionError(
                    f"{path}: not a safetensors file or corrupt: header claims {n} bytes (limit {MAX_HEADER_BYTES})")
            if 8 + n > size:
                raise ConversionError(f"{path}: truncated or not a safetensors file: header of {n} bytes "
                                      f"does not fit in a {size}-byte file")
            raw = f.read(n)
    except PermissionError as e:
        raise ConversionError(f"{path}: cannot read ({e.strerror})") from None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:  # ValueError: bad JSON, or an integer with too many digits
        raise ConversionError(f"{path}: not a safetensors file (header is not valid JSON: {e})") from None
    except RecursionError:
        raise ConversionError(f"{path}: not a safetensors file (header JSON is nested too deeply)") from None
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: not a safetensors file (header is not a JSON object)")
    meta = obj.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ConversionError(f"{path}: malformed __metadata__ (must map strings to strings)")
    data_len = size - 8 - n
    tensors = []
    for key, e in obj.items():
        try:
            if not isinstance(e, dict) or not isinstance(e["shape"], list) or not isinstance(e["data_offsets"], list):
                raise TypeError
            dtype, shape, (begin, end) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
            if not all(_is_count(d) for d in shape) or not _is_count(begin) or not _is_count(end):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{path}: malformed header entry for tensor '{key}'") from None
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ConversionError(f"{path}: tensor '{key}' has unsupported dtype {str(dtype)[:40]}")
        nonzero = 1
        for d in shape:
            nonzero *= d or 1
        if nonzero > INT64_MAX or len(shape) > 64:
            raise ConversionError(f"{path}: tensor '{key}' has an impossible shape (beyond 64-bit sizes or 64 "
                                  "dimensions)")
        info = TensorInfo(key, dtype, shape, begin, end)
        if end < begin or info.nbytes != info.numel * DTYPES[dtype][1]:
            raise ConversionError(f"{path}: tensor '{key}' has data offsets {begin}..{end} that do not match "
                                  f"its shape {list(shape)} and dtype {dtype}")
        if end > data_len:
            raise ConversionError(f"{path}: truncated: tensor '{key}' needs bytes up to {end} "
                                  f"but the data section has only {data_len}")
        tensors.append(info)
    tensors.sort(key=lambda t: (t.begin, t.end))
    return Header(path, {t.key: t for t in tensors}, dict(meta), 8 + n, size)


def _is_count(x) -> bool:
    """A non-negative integer that fits a 64-bit signed size (JSON true/false are not integers here)."""
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= INT64_MAX


@contextlib.contextmanager
def open_checked(path: str):
    """The safetensors library's own reader of `path` (memory-mapped, CPU), whose opening validates the file
    (offsets, overlaps, holes); its failures become one `ConversionError` naming the file."""
    try:
        f = safe_open(path, framework="pt", device="cpu")
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # a Rust panic is a BaseException
        raise ConversionError(f"{path}: not a valid safetensors file ({str(e)[:200]})") from None
    with f:
        yield f


class SafetensorsReader:
    """Random-access tensor reader. The safetensors library's own reader validates the file when it is opened
    (offsets, overlaps, holes); tensor bytes are then read with pread, one tensor at a time."""

    reads_into_buffers = True  # `read` wants a buffer (see sources.TensorSource)

    def __init__(self, path: str):
        self.header = read_header(path)
        self.path = path
        self._fd: int | None = None
        with open_checked(path):
            pass

    def read(self, key: str, buf: torch.Tensor | None) -> torch.Tensor:
        """`read_into` a buffer (fresh memory when `buf` is None)."""
        if buf is None:
            buf = torch.empty(self.header.tensors[key].nbytes, dtype=torch.uint8)
        return self.read_into(key, buf)

    def read_into(self, key: str, buf: torch.Tensor) -> torch.Tensor:
        """Read one tensor's bytes straight into `buf` (uint8, e.g. pinned memory for fast GPU copies) and return
        a view of it with the tensor's dtype and shape. Offsets come from the validated header.

        The bytes are read with pread rather than through the library's memory map: pages of a memory map stay
        mapped, and counted in the process's RSS, until the file is closed, which for a large model looks like a
        process of the model's size (docs/ARCHITECTURE.md, "Reading tensors")."""
        info = self.header.tensors[key]
        dtype = DTYPES[info.dtype][0]
        view = buf[: info.nbytes]
        if DTYPES[info.dtype][0] is None:
            raise ConversionError(f"{self.path}: tensor '{key}' has dtype {info.dtype}, unsupported by this torch")
        if info.nbytes:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            mv = byte_view(view)
            offset, done = self.header.data_start + info.begin, 0
            while done < info.nbytes:
                try:
                    n = os.preadv(self._fd, [mv[done:]], offset + done)
                except OSError as e:
                    raise ConversionError(f"{self.path}: cannot read tensor '{key}' ({e.strerror})") from None
                if n <= 0:
                    raise ConversionError(f"{self.path}: truncated while reading tensor '{key}'")
                done += n
        return view.view(dtype).view(info.shape)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable memoryview of the bytes of a contiguous CPU tensor (no copy, and no numpy: torch may come
    without it). The view keeps `t` alive."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray(0))
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("byte_view needs a contiguous CPU tensor")
    arr = (ctypes.c_char * n).from_address(t.data_ptr())
    arr._tensor = t  # the memory belongs to the tensor: keep it alive as long as the view
    return memoryview(arr).cast("B")


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    t = t.detach().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return byte_view(t)


def temp_name(final_path: str, token: str) -> str:
    """The temporary file's path for `final_path`: ".<name>.<token>.sf16-partial" beside it, with <name> shortened
    so that the temporary name is never longer than the budget the final name had (the folder's NAME_MAX, and
    PATH_MAX for the whole path): every valid output name has a valid temporary name."""
    folder, name = os.path.split(os.path.abspath(final_path))
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = 255
    budget = min(name_max, max(len(os.fsencode(name)), 4095 - len(os.fsencode(folder)) - 1))
    fixed = 2 + len(token) + len(TEMP_SUFFIX)
    stem = name
    while stem and len(os.fsencode(stem)) + fixed > budget:
        stem = stem[:-1]
    return os.path.join(folder, f".{stem}.{token}{TEMP_SUFFIX}")


def clean_stale_temps(folder: str, older_than: float) -> list[str]:
    """Remove temporary files this converter left in `folder` when it was killed (SIGKILL, power loss): files named
    like ours, older than `older_than` (a time.time()), which start like a safetensors or JSON file and which no
    live process holds (a writer holds an advisory lock on its temporary file until it is done). Returns the
    removed paths. Without advisory locks (not POSIX) nothing is removed."""
    removed: list[str] = []
    if fcntl is None:
        return removed
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not _TEMP_RE.match(name):
            continue
        path = os.path.join(folder, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_mtime >= older_than:
                continue
            head = os.pread(fd, 9, 0)
            if not head and st.st_mtime >= older_than - 60:
                continue  # empty: possibly created a moment ago by a writer that has not taken its lock yet
            if head and not (head[:1] == b"{" or head[8:9] == b"{"):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live conversion is writing it
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


class AtomicFile:
    """A file that appears at `path` complete or not at all.

    Bytes go to a temporary file beside `path` (see `temp_name`), created with the mode a plain open() would give
    under the user's umask and locked (advisory) so that `clean_stale_temps` never takes it from a live writer.
    `commit()` fsyncs it, gives it the mode of the file it replaces (if any) and renames it into place; `abort()`
    (also on leaving a `with` block without commit) removes it.
    """

    def __init__(self, path: str, overwrite: bool = False):
        self.path = os.path.abspath(path)
        self.overwrite = overwrite
        self.tmp_path: str | None = None
        self._fd: int | None = None
        folder = os.path.dirname(self.path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        for _ in range(100):
            tmp = temp_name(self.path, secrets.token_hex(4))
            try:
                fd = os.open(tmp, flags, 0o666)
            except FileExistsError:
                continue
            except OSError as e:
                raise ConversionError(f"{self.path}: cannot write to folder {folder} ({e.strerror})") from None
            break
        else:  # pragma: no cover
            raise ConversionError(f"{self.path}: cannot create a temporary file in {folder}")
        self._fd, self.tmp_path = fd, tmp
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pass  # a file system without locks: the file is still ours, only stale-file cleanup cannot see that

    def write(self, data) -> None:
        try:
            view = memoryview(data).cast("B")
            while view.nbytes:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as e:
            raise ConversionError(f"{self.path}: write failed ({e.strerror or e}); no output was written") from None

    def sync(self) -> None:
        """Make the bytes durable (before the rename that publishes them)."""
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise ConversionError(f"{self.path}: write failed ({e.strerror or e}); no output was written") from None

    def commit(self) -> None:
        try:
            if not self.overwrite and os.path.exists(self.path):
                raise ConversionError(f"{self.path}: already exists (use overwrite)")
            try:
                os.fchmod(self._fd, stat.S_IMODE(os.stat(self.path).st_mode))  # replacing: keep that file's mode
            except FileNotFoundError:
                pass
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            os.replace(self.tmp_path, self.path)
        except OSError as e:
            self.abort()
            raise ConversionError(f"{self.path}: cannot finish writing ({e.strerror or e})") from None
        except BaseException:
            self.abort()
            raise
        self.tmp_path = None
        try:  # make the rename itself durable
            dfd = os.open(os.path.dirname(self.path), os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass

    def abort(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        if self.tmp_path:
            try:
                os.unlink(self.tmp_path)
            except FileNotFoundError:
                pass
        self.tmp_path = None

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp_path is not None:
            self.abort()


class StreamingWriter:
    """Write a safetensors file tensor by tensor in a planned order.

    `entries` is the complete, ordered list of (key, dtype name, shape). Tensors must then be written in exactly that
    order with exactly those dtypes and shapes. Use as a context manager: leaving the block with an exception (or
    without `commit()`) deletes the temporary file; the destination is only replaced by `commit()`.
    """

    def __init__(self, path: str, entries: Iterable[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None, overwrite: bool = False):
        self.path = os.path.abspath(path)
        self.overwrite = overwrite
        self._entries = list(entries)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        offset = 0
        for key, dtype, shape in self._entries:
            n = DTYPES[dtype][1]
            for d in shape:
                n *= d
            header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)  # data section starts 8-byte aligned
        self.total_bytes = 8 + len(blob) + offset
        self._next = 0
        self._file = AtomicFile(self.path, overwrite)
        try:
            self._file.write(struct.pack("<Q", len(blob)) + blob)
        except BaseException:
            self.abort()
            raise

    @property
    def tmp_path(self) -> str | None:
        return self._file.tmp_path

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._entries):
            raise ValueError(f"unexpected tensor '{key}': all planned tensors are written")
        want_key, want_dtype, want_shape = self._entries[self._next]
        got_dtype = TORCH_TO_ST.get(tensor.dtype)
        if key != want_key or got_dtype != want_dtype or tuple(tensor.shape) != tuple(want_shape):
            raise ValueError(f"tensor '{key}' {got_dtype}{list(tensor.shape)} does not match the plan: "
                             f"'{want_key}' {want_dtype}{list(want_shape)}")
        self._file.write(tensor_bytes(tensor.cpu()))
        self._next += 1

    def sync(self) -> None:
        """Check that everything planned was written and make it durable; `commit()` then only renames."""
        if self._next != len(self._entries):
            raise ValueError(f"only {self._next} of {len(self._entries)} planned tensors were written")
        self._file.sync()

    def commit(self) -> None:
        if self._next != len(self._entries):
            raise ValueError(f"only {self._next} of {len(self._entries)} planned tensors were written")
        self._file.commit()

    def abort(self) -> None:
        self._file.abort()

    def __enter__(self) -> "StreamingWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._file.tmp_path is not None:
            self.abort()
