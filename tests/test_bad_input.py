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
    err = assert_refused(src, tmp_path, expect="bad.safetensors")
    assert "JSON" in err


def test_header_offsets_disagree_with_shape(tmp_path):
    src = tmp_path / "bad.safetensors"
    blob = json.dumps({"a.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 16]}}).encode()
    src.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(16))
    assert_refused(src, tmp_path, expect="'a.weight'")


def test_absurdly_large_header(tmp_path):
    src = tmp_path / "huge.safetensors"
    src.write_bytes(struct.pack("<Q", 10 ** 12) + b"{}" + bytes(64))
    assert_refused(src, tmp_path, expect="huge.safetensors")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weight_names_the_tensor(tmp_path, bad):
    w = torch.randn(16, 16)
    w[3, 5] = bad
    src = tmp_path / "nan.safetensors"
    save_file({"good.weight": torch.randn(8, 8), "blocks.0.broken.weight": w}, str(src))
    err = assert_refused(src, tmp_path, expect="blocks.0.broken.weight")
    assert "NaN or infinite" in err


def test_output_equal_to_input(tmp_path, flux_bf16):
    h = digest(flux_bf16)
    for extra in ([], ["--overwrite"]):
        p = run_cli("--input", flux_bf16, "--output", flux_bf16, "--num_iter", "0", *extra)
        assert p.returncode == 2 and os.path.basename(flux_bf16) in p.stderr and "input" in p.stderr, p.stderr
        assert digest(flux_bf16) == h and os.listdir(tmp_path) == [os.path.basename(flux_bf16)]


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
    assert p.returncode == 2 and "out.safetensors" in p.stderr and "does not exist" in p.stderr
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


# --- the report path obeys the output's rules --------------------------------------------------------------------

def _message_lines(stderr):
    """stderr without the progress bar's lines"""
    return [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.strip() and not ln.startswith("converting")]


def _listing(folder):
    return sorted(os.listdir(folder))


def test_report_never_replaces_the_input_or_the_output(tmp_path, flux_bf16):
    out = tmp_path / "out.safetensors"
    h = digest(flux_bf16)
    p = run_cli("--input", flux_bf16, "--output", str(out), "--num_iter", "0", "--report", flux_bf16, "--overwrite")
    assert p.returncode == 2 and "would replace the input" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert digest(flux_bf16) == h and not out.exists()
    p = run_cli("--input", flux_bf16, "--output", str(out), "--num_iter", "0", "--report", str(out))
    assert p.returncode == 2 and "would replace the output" in p.stderr and not out.exists(), p.stderr
    assert _listing(tmp_path) == [os.path.basename(flux_bf16)]


def test_existing_report_needs_overwrite(tmp_path, flux_bf16):
    report = tmp_path / "r.json"
    report.write_text("precious")
    err = assert_refused(flux_bf16, tmp_path, "--report", str(report), expect="already exists")
    assert "r.json" in err and report.read_text() == "precious"
    run_cli("--input", flux_bf16, "--output", str(tmp_path / "out.safetensors"), "--num_iter", "0", "--quiet",
            "--report", str(report), "--overwrite", check=True)
    assert json.loads(report.read_text())["counts"]["quantized"] > 0


@pytest.mark.parametrize("where", ["missing folder", "a folder", "unwritable"])
def test_bad_report_location_is_refused_before_any_work(tmp_path, flux_bf16, where):
    target = {"missing folder": str(tmp_path / "no" / "r.json"), "a folder": str(tmp_path),
              "unwritable": "/proc/r.json"}[where]
    err = assert_refused(flux_bf16, tmp_path, "--report", target, expect=target)
    assert err.count("\n") == 1  # one line


def test_report_write_failure_leaves_neither_model_nor_report(tmp_path):
    """The report is written (to its temporary file) before the model is put in place: a report that cannot be
    written (here a real EFBIG from a file-size limit: the report of many small tensors is larger than the model)
    leaves nothing."""
    src = tmp_path / "many.safetensors"
    save_file({f"layer{i}.weight": torch.randn(2, 2) for i in range(400)}, str(src))

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (120_000, 120_000))
    out, report = tmp_path / "out.safetensors", tmp_path / "r.json"
    ok = run_cli("--input", str(src), "--output", str(tmp_path / "probe.safetensors"), "--num_iter", "0", "--quiet")
    assert ok.returncode == 0 and os.path.getsize(tmp_path / "probe.safetensors") < 120_000  # the model fits
    os.unlink(tmp_path / "probe.safetensors")
    before = _listing(tmp_path)
    p = run_cli("--input", str(src), "--output", str(out), "--num_iter", "0", "--report", str(report),
                preexec_fn=limit)
    assert p.returncode == 2 and "r.json" in p.stderr and "write failed" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and _listing(tmp_path) == before


def test_report_is_strict_json(tmp_path):
    """A tensor mixing 1e30, 1e-30 and 0.02: almost every value flushes (one scale cannot cover that range); the
    summary and the report give finite figures, name the tensor as lossy, and the report parses as strict JSON."""
    w = torch.randn(64, 64) * 0.02
    w[0] = 1e30
    w[1] = 1e-30
    src = tmp_path / "mix.safetensors"
    save_file({"mixed.weight": w, "fine.weight": torch.randn(32, 32) * 0.02}, str(src))
    report = tmp_path / "r.json"
    p = run_cli("--input", str(src), "--output", str(tmp_path / "o.safetensors"), "--report", str(report),
                "--num_iter", "0", check=True)
    assert "nan" not in p.stdout.lower() and "inf" not in p.stdout.lower().replace("info", "")
    warnings = [ln for ln in p.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "'mixed.weight'" in warnings[0] and "stored as 0" in warnings[0], p.stderr

    def refuse(c):
        raise ValueError(f"not strict JSON: {c}")
    r = json.loads(report.read_text(), parse_constant=refuse)
    assert [t["key"] for t in r["lossy"]] == ["mixed.weight"]
    assert r["lossy"][0]["flushed_to_zero"] >= 62 * 64


def test_strict_json_writes_null_with_a_reason():
    from quant_core.report import report_json
    text = report_json({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}})
    r = json.loads(text, parse_constant=lambda c: pytest.fail(c))
    assert r["a"] is None and r["b"] == [1.0, None] and r["c"]["d"] is None
    assert r["null_reasons"] == {"a": "NaN", "b[1]": "Infinity", "c.d": "-Infinity"}


# --- power-of-two scales inside float32's range, range-safe metrics -----------------------------------------------

def _true_rel_error(src, out, key):
    """relF measured independently of the converter: the file as a loader dequantizes it (fp16 times the float32
    scale, in float32) against the source, in float64 after normalising by the largest magnitude."""
    from safetensors import safe_open
    with safe_open(str(src), "pt") as f:
        w = f.get_tensor(key).double()
    with safe_open(str(out), "pt") as f:
        q = f.get_tensor(key)
        s = f.get_tensor(key[: -len(".weight")] + ".scale_weight")
    deq = q.float() * s.float()
    assert torch.isfinite(deq).all() and torch.isfinite(q.float()).all()
    norm = float(w.abs().max())
    return float((deq.double() / norm - w / norm).norm() / (w / norm).norm()), deq


@pytest.mark.parametrize("case", ["fp32 max", "fp64 1e300", "fp32 1e-25", "fp32 1e-20", "fp32 denormal 1e-40",
                                  "bf16 1e-38", "fp64 1e-300", "mixed 1e30/1e-30/0.02"])
@pytest.mark.parametrize("scale", ["auto", "pow2"])
def test_extreme_magnitudes_are_finite_and_measured(tmp_path, case, scale):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(64, 64, generator=g, dtype=torch.float64)
    w = {"fp32 max": lambda: (base.clamp(-3, 3) * 1.1e38).float().index_fill_(1, torch.tensor([7]), 3.4028234e38),
         "fp64 1e300": lambda: base * 1e300,
         "fp32 1e-25": lambda: (base * 1e-25).float(),
         "fp32 1e-20": lambda: (base * 1e-20).float(),
         "fp32 denormal 1e-40": lambda: (base * 1e-40).float(),
         "bf16 1e-38": lambda: (base * 1e-38).bfloat16(),
         "fp64 1e-300": lambda: base * 1e-300,
         "mixed 1e30/1e-30/0.02": lambda: torch.cat([base[:1] * 0 + 1e30, base[1:2] * 1e-30,
                                                     base[2:] * 0.02]).float()}[case]()
    w[0, 0] = -w[0, 0]  # both signs at the extremes
    src, out = tmp_path / "w.safetensors", tmp_path / "o.safetensors"
    save_file({"x.weight": w}, str(src))
    r = convert_file(str(src), str(out), ConvertOptions(num_iter=0, scale=scale))
    t = r["tensors"][0]
    true_rel, deq = _true_rel_error(src, out, "x.weight")
    assert t["rel_error"] == pytest.approx(true_rel, rel=1e-6, abs=1e-12), (t, true_rel)
    assert t["nonfinite"] == 0 and 0 < t["scale"] < float("inf")
    lossy = true_rel > 1e-2 or t["flushed_to_zero"] > 0.01 * w.numel()
    assert bool(t.get("lossy")) == lossy and [x["key"] for x in r["lossy"]] == (["x.weight"] if lossy else [])
    expect_lossy = case in ("fp64 1e300", "fp64 1e-300", "mixed 1e30/1e-30/0.02")
    assert lossy == expect_lossy, (case, t)
    if not lossy:
        assert true_rel < 1e-3  # the scale put the tensor where fp16 has its precision
    assert r["rel_error"] == pytest.approx(true_rel, rel=1e-6, abs=1e-12)  # the file's total is that tensor's
    json.loads(__import__("quant_core.report", fromlist=["x"]).report_json(r),
               parse_constant=lambda c: pytest.fail(c))


# --- headers that used to end in a traceback ----------------------------------------------------------------------

def _raw_file(path, header: bytes, data: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return str(path)


HOSTILE_HEADERS = {
    "nested 200k deep": b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
    "dtype is a list": b'{"a.weight": {"dtype": ["F32"], "shape": [1, 1], "data_offsets": [0, 4]}}',
    "dtype is an object": b'{"a.weight": {"dtype": {"F32": 1}, "shape": [1, 1], "data_offsets": [0, 4]}}',
    "shape 2^63 x 0": b'{"a.weight": {"dtype": "F32", "shape": [9223372036854775808, 0], "data_offsets": [0, 0]}}',
    "shape 2^64-1 x 0":
        b'{"a.weight": {"dtype": "F32", "shape": [18446744073709551615, 0], "data_offsets": [0, 0]}}',
    "shape 2^62 x 2^62 x 0":
        b'{"a.weight": {"dtype": "F32", "shape": [4611686018427387904, 4611686018427387904, 0], '
        b'"data_offsets": [0, 0]}}',
    "5000-digit integer": b'{"a.weight": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}',
    "shape true": b'{"a.weight": {"dtype": "F32", "shape": [true, 1], "data_offsets": [0, 4]}}',
    "entry is a list": b'{"a.weight": ["F32", [1], [0, 4]]}',
}


@pytest.mark.parametrize("name", list(HOSTILE_HEADERS))
def test_hostile_headers_are_refused_in_one_line(tmp_path, name):
    from quant_core import load_dequantized_state_dict
    src = _raw_file(tmp_path / "h.safetensors", HOSTILE_HEADERS[name])  # empty data section: sizes agree
    with pytest.raises(ConversionError, match="h.safetensors") as exc:
        convert_file(src, str(tmp_path / "o.safetensors"), ConvertOptions(num_iter=0))
    assert "\n" not in str(exc.value)
    with pytest.raises(ConversionError, match="h.safetensors"):  # the loaders' path
        load_dequantized_state_dict(src)
    assert os.listdir(tmp_path) == ["h.safetensors"]


@pytest.mark.parametrize("name", ["nested 200k deep", "shape 2^64-1 x 0", "5000-digit integer", "dtype is a list"])
def test_hostile_headers_on_the_command_line(tmp_path, name):
    src = _raw_file(tmp_path / "h.safetensors", HOSTILE_HEADERS[name])
    assert_refused(src, tmp_path, expect="h.safetensors")


@pytest.mark.parametrize("device", ["meta", "mps", "vulkan", "cuda:99", "nonsense"])
def test_unusable_devices_are_refused(tmp_path, flux_bf16, device):
    with pytest.raises(ConversionError, match="device"):
        convert_file(flux_bf16, str(tmp_path / "o.safetensors"), ConvertOptions(num_iter=0, device=device))
    assert os.listdir(tmp_path) == [os.path.basename(flux_bf16)]


def test_device_meta_on_the_command_line(tmp_path, flux_bf16):
    err = assert_refused(flux_bf16, tmp_path, "--device", "meta", expect="device 'meta'")
    assert err.count("\n") == 1


# --- the loader refuses a broken scale_weight ---------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 0.0, -0.5])
def test_loader_refuses_broken_scale(tmp_path, bad):
    from safetensors import safe_open
    from quant_core import load_dequantized_state_dict
    src, good = tmp_path / "w.safetensors", tmp_path / "good.safetensors"
    save_file({"blk.lin.weight": torch.randn(16, 16) * 1e-6, "other.weight": torch.randn(8, 8)}, str(src))
    convert_file(str(src), str(good), ConvertOptions(num_iter=0, scale="pow2"))
    with safe_open(str(good), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    tensors["blk.lin.scale_weight"] = torch.tensor([bad], dtype=torch.float32)
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken), metadata=meta)
    with pytest.raises(ConversionError) as exc:
        load_dequantized_state_dict(str(broken))
    msg = str(exc.value)
    assert "broken.safetensors" in msg and "blk.lin.scale_weight" in msg and "finite and > 0" in msg
    assert load_dequantized_state_dict(str(good))["blk.lin.weight"].abs().max() > 0  # the intact file loads


# --- files get the mode a plain open() gives ----------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_output_mode_follows_umask(tmp_path, flux_bf16, umask):
    old = os.umask(umask)
    try:
        convert_file(flux_bf16, str(tmp_path / "o.safetensors"), ConvertOptions(num_iter=0),
                     report_path=str(tmp_path / "r.json"))
    finally:
        os.umask(old)
    for name in ("o.safetensors", "r.json"):
        assert (os.stat(tmp_path / name).st_mode & 0o777) == 0o666 & ~umask, name


def test_overwrite_keeps_the_replaced_files_mode(tmp_path, flux_bf16):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"old")
    os.chmod(out, 0o644)
    convert_file(flux_bf16, str(out), ConvertOptions(num_iter=0, overwrite=True))
    assert (os.stat(out).st_mode & 0o777) == 0o644
    os.chmod(out, 0o640)
    convert_file(flux_bf16, str(out), ConvertOptions(num_iter=0, overwrite=True))
    assert (os.stat(out).st_mode & 0o777) == 0o640


# --- names from a file or a user cannot drive the terminal --------------------------------------------------------

EVIL = "\x1b]0;owned\x07\x1b[2J\u202eevil"


def _assert_clean(text):
    for bad in ("\x1b]", "\x07", "\x1b[2J", "\u202e"):
        assert bad not in text, repr(text)


def test_tensor_names_are_escaped_in_errors_progress_and_summary(tmp_path):
    good = tmp_path / "names.safetensors"
    save_file({f"blocks.{EVIL}.weight": torch.randn(16, 16), "b.weight": torch.randn(8, 8)}, str(good))
    p = run_cli("--input", str(good), "--output", str(tmp_path / "o.safetensors"), "--num_iter", "0", check=True)
    _assert_clean(p.stdout + p.stderr)
    assert "\\x1b]0;owned\\x07" in p.stderr and "\\u202e" in p.stdout  # the progress bar and the summary
    w = torch.randn(16, 16)
    w[0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file({f"blocks.{EVIL}.weight": w}, str(bad))
    err = assert_refused(bad, tmp_path, expect="NaN or infinite", out_name="o2.safetensors")
    _assert_clean(err)
    assert len(_message_lines(err)) == 1 and "\\u202e" in err


def test_file_names_are_escaped(tmp_path):
    err = assert_refused(tmp_path / f"{EVIL}.safetensors", tmp_path, expect="no such file")
    _assert_clean(err)
    assert "\\x1b[2J" in err


# --- long names ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [239, 243, 255])
def test_long_valid_output_names_work(tmp_path, flux_bf16, length):
    name = "m" * (length - len(".safetensors")) + ".safetensors"
    convert_file(flux_bf16, str(tmp_path / name), ConvertOptions(num_iter=0), report_path=str(tmp_path / "r.json"))
    from safetensors import safe_open
    with safe_open(str(tmp_path / name), "pt") as f:  # complete and readable under its long name
        assert "scaled_fp16" in f.keys() and f.metadata()["scaled_fp16.format"] == "scaled_fp16"
    assert _listing(tmp_path) == sorted([name, os.path.basename(flux_bf16), "r.json"])


def test_temp_names_stay_within_the_final_names_budget(tmp_path):
    from quant_core.safetensors_io import temp_name
    for length in range(1, 256):
        for ch in ("a", "\u00e9", "\u6f22"):  # 1, 2 and 3 bytes in UTF-8
            name = ch * length
            if len(os.fsencode(name)) > 255:
                continue
            tmp = os.path.basename(temp_name(str(tmp_path / name), "0123abcd"))
            assert len(os.fsencode(tmp)) <= 255 and tmp.startswith(".") and tmp.endswith(".sf16-partial")
