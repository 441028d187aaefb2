"""The streaming safetensors reader and writer, against the safetensors library itself.

Files written by `StreamingWriter` must read back with `safetensors.safe_open` bit for bit (every dtype the
converter copies, empty tensors, metadata); files written by the library must read back through
`SafetensorsReader`. Header validation names the file (and the tensor), in one line. `AtomicFile` and the writer
leave either the complete file or nothing.
"""

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quant_core import ConversionError
from quant_core.safetensors_io import (AtomicFile, SafetensorsReader, StreamingWriter, TORCH_TO_ST,
                                       check_input_path, read_header)


def _tensors():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 7, generator=g)
    return {
        "a.bf16": (x * 0.02).bfloat16(),
        "b.fp16": (x * 3).half(),
        "c.fp32": x,
        "d.fp64": x.double() * 1e-200,  # beyond float32's range: copied, not cast
        "e.i64": torch.tensor([-(2 ** 63), 2 ** 63 - 1, 0, 12345678901234], dtype=torch.int64),
        "f.i32": torch.arange(-6, 6, dtype=torch.int32).reshape(3, 4),
        "g.i16": torch.tensor([-32768, 32767, 1], dtype=torch.int16),
        "h.i8": torch.tensor([[-128, 127], [0, 5]], dtype=torch.int8),
        "i.u8": torch.arange(256, dtype=torch.uint8),
        "j.bool": torch.tensor([True, False, True]),
        "k.empty": torch.zeros(0, dtype=torch.float32),
        "l.empty2d": torch.zeros(3, 0, dtype=torch.bfloat16),
        "m.scalar": torch.tensor(2.5, dtype=torch.float32),
        "n.nonfinite": torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0], dtype=torch.float32),
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bytes (NaN-safe, -0.0-aware comparison)."""
    return t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else torch.zeros(0, dtype=torch.uint8)


def _write(path, tensors, metadata=None):
    entries = [(k, TORCH_TO_ST[t.dtype], tuple(t.shape)) for k, t in tensors.items()]
    with StreamingWriter(str(path), entries, metadata) as w:
        for k, t in tensors.items():
            w.write(k, t)
        w.commit()


def test_writer_output_reads_back_with_the_library(tmp_path):
    tensors = _tensors()
    meta = {"note": "ünïcode \u6f22", "json": json.dumps({"x": [1, 2]}), "empty": ""}
    path = tmp_path / "w.safetensors"
    _write(path, tensors, meta)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == meta
        assert list(f.keys()) == sorted(tensors)  # the library lists keys sorted
        for k, t in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == t.dtype and tuple(got.shape) == tuple(t.shape), k
            assert torch.equal(_bits(got), _bits(t)), k
    # our own header parser agrees with what was planned, in the planned (data) order
    header = read_header(str(path))
    assert list(header.tensors) == list(tensors) and header.metadata == meta
    assert header.file_size == os.path.getsize(path) and header.data_start % 8 == 0  # data section 8-byte aligned
    assert [header.tensors[k].shape for k in tensors] == [tuple(t.shape) for t in tensors.values()]


def test_reader_reads_library_written_files(tmp_path):
    tensors = _tensors()
    path = tmp_path / "lib.safetensors"
    save_file(tensors, str(path), metadata={"k": "v"})
    with SafetensorsReader(str(path)) as r:
        assert r.header.metadata == {"k": "v"} and set(r.header.tensors) == set(tensors)
        buf = torch.empty(max(t.numel() * t.element_size() for t in tensors.values()), dtype=torch.uint8)
        for k, t in tensors.items():
            got = r.read_into(k, buf).clone()
            assert got.dtype == t.dtype and tuple(got.shape) == tuple(t.shape), k
            assert torch.equal(_bits(got), _bits(t)), k
    assert os.listdir(tmp_path) == ["lib.safetensors"]


@pytest.mark.parametrize("wrong", ["key", "dtype", "shape", "extra"])
def test_writer_refuses_what_the_plan_did_not_announce(tmp_path, wrong):
    path = tmp_path / "o.safetensors"
    entries = [("a", "F32", (2, 3)), ("b", "BF16", (4,))]
    with pytest.raises(ValueError, match="'b'|'x'|unexpected"):
        with StreamingWriter(str(path), entries) as w:
            w.write("a", torch.zeros(2, 3))
            second = {"key": ("x", torch.zeros(4, dtype=torch.bfloat16)),
                      "dtype": ("b", torch.zeros(4, dtype=torch.float16)),
                      "shape": ("b", torch.zeros(5, dtype=torch.bfloat16)),
                      "extra": ("b", torch.zeros(4, dtype=torch.bfloat16))}[wrong]
            w.write(*second)
            if wrong == "extra":
                w.write("c", torch.zeros(1))
            w.commit()
    assert os.listdir(tmp_path) == []  # nothing published, no temporary file


def test_writer_commit_before_everything_is_written_leaves_nothing(tmp_path):
    path = tmp_path / "o.safetensors"
    with pytest.raises(ValueError, match="1 of 2"):
        with StreamingWriter(str(path), [("a", "F32", (1,)), ("b", "F32", (1,))]) as w:
            w.write("a", torch.ones(1))
            w.commit()
    assert os.listdir(tmp_path) == []


def _raw(path, header_bytes: bytes, data: bytes = b"", n=None):
    path.write_bytes(struct.pack("<Q", len(header_bytes) if n is None else n) + header_bytes + data)
    return str(path)


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize("case,tensor", [
    ("short file", None),
    ("header longer than the file", None),
    ("header over the limit", None),
    ("not JSON", None),
    ("not an object", None),
    ("metadata not strings", None),
    ("unknown dtype", "w.weight"),
    ("offsets do not match the shape", "w.weight"),
    ("data beyond the end", "w.weight"),
    ("negative dimension", "w.weight"),
])
def test_header_errors_name_the_file_and_tensor(tmp_path, case, tensor):
    p = tmp_path / "model-x.safetensors"
    good = json.dumps({"w.weight": _entry()}).encode()
    if case == "short file":
        p.write_bytes(b"\x01\x02")
    elif case == "header longer than the file":
        _raw(p, good, bytes(8), n=len(good) + 100)
    elif case == "header over the limit":
        _raw(p, b"{}", bytes(8), n=2 ** 40)
    elif case == "not JSON":
        _raw(p, b"{\"w.weight\": ", bytes(8))
    elif case == "not an object":
        _raw(p, b"[1, 2]", bytes(8))
    elif case == "metadata not strings":
        _raw(p, json.dumps({"__metadata__": {"a": 1}, "w.weight": _entry()}).encode(), bytes(8))
    elif case == "unknown dtype":
        _raw(p, json.dumps({"w.weight": _entry(dtype="F17")}).encode(), bytes(8))
    elif case == "offsets do not match the shape":
        _raw(p, json.dumps({"w.weight": _entry(shape=(3,))}).encode(), bytes(8))
    elif case == "data beyond the end":
        _raw(p, good, bytes(4))
    elif case == "negative dimension":
        _raw(p, json.dumps({"w.weight": _entry(shape=(-2,))}).encode(), bytes(8))
    before = p.read_bytes()
    for parse in (read_header, SafetensorsReader):
        with pytest.raises(ConversionError) as exc:
            parse(str(p))
        msg = str(exc.value)
        assert "model-x.safetensors" in msg and "\n" not in msg, msg
        if tensor:
            assert f"'{tensor}'" in msg, msg
    assert p.read_bytes() == before


def test_valid_minimal_header_is_accepted(tmp_path):
    """The counterpart of the refusals above: the same layout, well formed, parses."""
    p = tmp_path / "ok.safetensors"
    _raw(p, json.dumps({"w.weight": _entry()}).encode(), struct.pack("<2f", 1.5, -2.0))
    with SafetensorsReader(str(p)) as r:
        assert r.read_into("w.weight", torch.empty(8, dtype=torch.uint8)).tolist() == [1.5, -2.0]


def test_library_validation_is_applied_too(tmp_path):
    """Overlapping tensors pass our own per-entry checks; the library's validation (run when the reader opens the
    file) refuses them, and the message still names the file."""
    p = tmp_path / "overlap.safetensors"
    _raw(p, json.dumps({"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(4, 12))}).encode(), bytes(12))
    read_header(str(p))  # each entry on its own is plausible
    with pytest.raises(ConversionError, match="overlap.safetensors"):
        SafetensorsReader(str(p))


def test_check_input_path(tmp_path):
    for name in ("m.ckpt", "m.PT", "m.pth", "m.bin", "m.pkl"):
        (tmp_path / name).write_bytes(b"\x80\x04not read")
        with pytest.raises(ConversionError, match="pickle") as exc:
            check_input_path(str(tmp_path / name))
        assert name in str(exc.value)
    with pytest.raises(ConversionError, match="no such file") as exc:
        check_input_path(str(tmp_path / "gone.safetensors"))
    assert "gone.safetensors" in str(exc.value)
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(ConversionError, match="not a regular file"):
        check_input_path(str(tmp_path / "dir.safetensors"))
    (tmp_path / "fine.safetensors").write_bytes(b"")
    check_input_path(str(tmp_path / "fine.safetensors"))  # exists and is a file: the header is checked later


def test_atomic_file_publishes_complete_or_nothing(tmp_path):
    path = tmp_path / "r.json"
    with pytest.raises(RuntimeError):
        with AtomicFile(str(path)) as f:
            f.write(b"half of it")
            assert os.path.exists(f.tmp_path) and not path.exists()  # bytes go to a temporary file
            raise RuntimeError("failed in the middle")
    assert os.listdir(tmp_path) == []
    with AtomicFile(str(path)) as f:  # leaving the block without commit: nothing either
        f.write(b"never committed")
    assert os.listdir(tmp_path) == []
    with AtomicFile(str(path)) as f:
        f.write(b"complete")
        f.write(memoryview(b" file"))
        f.commit()
    assert path.read_bytes() == b"complete file" and os.listdir(tmp_path) == ["r.json"]


def test_atomic_file_respects_overwrite(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"precious")
    with AtomicFile(str(path)) as f:
        f.write(b"new")
        with pytest.raises(ConversionError, match="out.bin.*already exists"):
            f.commit()
    assert path.read_bytes() == b"precious" and os.listdir(tmp_path) == ["out.bin"]
    with AtomicFile(str(path), overwrite=True) as f:
        f.write(b"new")
        f.commit()
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.bin"]


def test_atomic_file_in_a_missing_folder_names_it(tmp_path):
    with pytest.raises(ConversionError, match="nowhere"):
        AtomicFile(str(tmp_path / "nowhere" / "x.bin"))
    assert os.listdir(tmp_path) == []
