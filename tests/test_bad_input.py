"""Bad input gets a clear error naming the file/tensor, exit status 2, no output or temp file, input untouched."""

import hashlib
import json
import os
import pickle
import resource
import signal
import struct

import pytest
import torch
from safetensors.torch import save_file

from conftest import run_cli
from quant_core import Cancelled, ConversionError, ConvertOptions, convert_file


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def assert_refused(src, tmp_path, *extra, expect, out_name="out.safetensors"):
    before = sorted(os.listdir(tmp_path))
    h = digest(src) if os.path.isfile(src) else None
    p = run_cli("--input", str(src), "--output", str(tmp_path / out_name), "--num_iter", "0", *extra)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert expect in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert sorted(os.listdir(tmp_path)) == before  # no output, no temp file
    if h is not None:
        assert digest(src) == h  # input never touched
    return p.stderr


def test_missing_file(tmp_path):
    err = assert_refused(tmp_path / "nope.safetensors", tmp_path, expect="no such file")
    assert "nope.safetensors" in err


def test_not_a_safetensors_file(tmp_path):
    src = tmp_path / "text.safetensors"
    src.write_text("hello, this is not a model at all\n" * 10)
    assert_refused(src, tmp_path, expect="text.safetensors")


def test_truncated_file(tmp_path, flux_bf16):
    src = tmp_path / "cut.safetensors"
    data = open(flux_bf16, "rb").read()
    src.write_bytes(data[: len(data) - 1000])
    err = assert_refused(src, tmp_path, expect="truncated")
    assert "cut.safetensors" in err


def test_malformed_header(tmp_path):
    src = tmp_path / "bad.safetensors"
    blob = b'{"a.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]'  # no closing brace
    src.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(16))
    assert_refused(src, tmp_path, expect="not valid JSON")


def test_header_offsets_disagree_with_shape(tmp_path):
    src = tmp_path / "bad.safetensors"
    blob = json.dumps({"a.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 16]}}).encode()
    src.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(16))
    assert_refused(src, tmp_path, expect="'a.weight'")


def test_absurdly_large_header(tmp_path):
    src = tmp_path / "huge.safetensors"
    src.write_bytes(struct.pack("<Q", 10 ** 12) + b"{}" + bytes(64))
    assert_refused(src, tmp_path, expect="header claims")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weight_names_the_tensor(tmp_path, bad):
    w = torch.randn(16, 16)
    w[3, 5] = bad
    src = tmp_path / "nan.safetensors"
    save_file({"good.weight": torch.randn(8, 8), "blocks.0.broken.weight": w}, str(src))
    err = assert_refused(src, tmp_path, expect="blocks.0.broken.weight")
    assert "NaN or infinite" in err


def test_output_equal_to_input(tmp_path, flux_bf16):
    p = run_cli("--input", flux_bf16, "--output", flux_bf16, "--num_iter", "0")
    assert p.returncode == 2 and "output is the input" in p.stderr
    p = run_cli("--input", flux_bf16, "--output", flux_bf16, "--num_iter", "0", "--overwrite")
    assert p.returncode == 2 and "output is the input" in p.stderr


def test_existing_output_needs_overwrite(tmp_path, flux_bf16):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    err = assert_refused(flux_bf16, tmp_path, expect="already exists")
    assert "--overwrite" in err
    assert out.read_bytes() == b"precious"
    p = run_cli("--input", flux_bf16, "--output", str(out), "--num_iter", "0", "--overwrite", "--quiet")
    assert p.returncode == 0 and out.read_bytes() != b"precious"


def test_unwritable_or_missing_folder(tmp_path, flux_bf16):
    p = run_cli("--input", flux_bf16, "--output", str(tmp_path / "no" / "such" / "out.safetensors"), "--num_iter", "0")
    assert p.returncode == 2 and "does not exist" in p.stderr
    # /proc refuses new files even for root
    p = run_cli("--input", flux_bf16, "--output", "/proc/out.safetensors", "--num_iter", "0")
    assert p.returncode == 2 and "/proc" in p.stderr and "Traceback" not in p.stderr


def test_disk_full(tmp_path, flux_bf16):
    """A real write failure part-way (file size limit: EFBIG, as on a full disk) leaves nothing behind."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    before = sorted(os.listdir(tmp_path))
    h = digest(flux_bf16)
    p = run_cli("--input", flux_bf16, "--output", str(tmp_path / "out.safetensors"), "--num_iter", "0",
                preexec_fn=limit)
    assert os.path.getsize(flux_bf16) > 400_000  # the limit is hit mid-file
    assert p.returncode == 2, p.stderr
    assert "write failed" in p.stderr and "out.safetensors" in p.stderr
    assert sorted(os.listdir(tmp_path)) == before and digest(flux_bf16) == h


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_inputs_are_refused_never_unpickled(tmp_path, suffix):
    marker = tmp_path / "UNPICKLED"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # creates a file if anyone ever unpickles this

    src = tmp_path / ("model" + suffix)
    src.write_bytes(pickle.dumps({"state_dict": Payload()}))
    assert_refused(src, tmp_path, expect="pickle")
    assert not marker.exists()


def test_already_scaled_input_is_refused(tmp_path, flux_bf16):
    out = str(tmp_path / "once.safetensors")
    convert_file(flux_bf16, out, ConvertOptions(num_iter=0))
    err = assert_refused(out, tmp_path, expect="already a scaled file", out_name="twice.safetensors")
    assert "once.safetensors" in err


@pytest.mark.parametrize("at", [1, 7, 30])
def test_cancel_at_tensor_n_leaves_no_file(tmp_path, flux_bf16, at):
    seen = []
    before = sorted(os.listdir(tmp_path))
    h = digest(flux_bf16)
    with pytest.raises(Cancelled) as exc:
        convert_file(flux_bf16, str(tmp_path / "out.safetensors"), ConvertOptions(num_iter=0),
                     on_event=lambda e: e["type"] == "tensor" and seen.append(e),
                     cancel=lambda: len(seen) == at - 1)
    assert exc.value.index == at and f"cancelled at tensor {at}/" in str(exc.value)
    assert len(seen) == at - 1
    assert sorted(os.listdir(tmp_path)) == before and digest(flux_bf16) == h


def test_cancel_by_raising_hook(tmp_path, flux_bf16):
    class Interrupted(Exception):
        pass

    n = {"i": 0}

    def hook():
        n["i"] += 1
        if n["i"] > 5:
            raise Interrupted()

    before = sorted(os.listdir(tmp_path))
    with pytest.raises(Interrupted):
        convert_file(flux_bf16, str(tmp_path / "out.safetensors"), ConvertOptions(num_iter=0), cancel=hook)
    assert sorted(os.listdir(tmp_path)) == before


def test_bad_option_values(tmp_path, flux_bf16):
    with pytest.raises(ConversionError, match="num_iter"):
        convert_file(flux_bf16, str(tmp_path / "o.safetensors"), ConvertOptions(num_iter=-1))
    with pytest.raises(ConversionError, match="scale policy"):
        convert_file(flux_bf16, str(tmp_path / "o.safetensors"), ConvertOptions(scale="linear"))
    assert os.listdir(tmp_path) == [os.path.basename(flux_bf16)]
