"""Unusable calibration files and capture inputs: one line naming the file (and tensor), exit 2, no output, no
traceback, and never an unpickle. Every input is made here."""

import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import minilm_dir, run_cli
from quant_core.calibration import FORMAT_KEY, CalibrationWriter, load_calibration

LAYER = "encoder.block.0.layer.0.SelfAttention.q.weight"  # a [64, 64] weight of the small T5 fixture


class _Payload:
    """Unpickling this creates `marker`: proof that something was unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_pickle(path, marker):
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Payload(str(marker))}, f)


def good_calibration(path, width=64, rows=200, sketch_rows=3072):
    """A version 4 file; exact statistics (the default rows exceed the width) unless `sketch_rows` < width (then a
    basis shared by the halves, `g0.basis`, and the fit half's weight, `g0.fit_weight`)."""
    w = CalibrationWriter(rows=sketch_rows)
    w.add_layer(LAYER, "g0", has_bias=False)
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(0))
    w.add("g0", x[::2], fit=True)
    w.add("g0", x[1::2])
    w.save(str(path), {"model": "test"})
    return str(path)


def rewrite(path, tensors=None, meta=None):
    """Copy of a calibration file with tensors and/or metadata replaced."""
    with safe_open(path, "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        m = dict(f.metadata())
    if tensors is not None:
        t = tensors(t)
    if meta is not None:
        m[FORMAT_KEY] = meta(m[FORMAT_KEY])
    save_file(t, path, metadata=m)


def expect_refused(t5_fp32, tmp_path, calib, *needles):
    out = tmp_path / "out.safetensors"
    before = sorted(os.listdir(tmp_path))
    p = run_cli("--input", t5_fp32, "--output", str(out), "--calibration", str(calib), "--quiet")
    err = p.stderr.strip()
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr and len(err.splitlines()) == 1, p.stderr
    assert str(calib) in err, err
    for n in needles:
        assert n in err, err
    assert not out.exists() and sorted(os.listdir(tmp_path)) == before  # no output, no temp file
    return err


def test_good_file_converts(t5_fp32, tmp_path):
    """The control: the same small model and a well-formed file convert, and the layer is calibrated."""
    calib = good_calibration(tmp_path / "c.safetensors")
    out = tmp_path / "out.safetensors"
    p = run_cli("--input", t5_fp32, "--output", str(out), "--calibration", calib, "--report",
                str(tmp_path / "r.json"), "--quiet")
    assert p.returncode == 0, p.stderr
    rows = {t["key"]: t for t in json.load(open(tmp_path / "r.json"))["tensors"]}
    assert rows[LAYER].get("method") == "gptq" or rows[LAYER].get("calibrated_fallback"), rows[LAYER]


def test_missing_file(t5_fp32, tmp_path):
    expect_refused(t5_fp32, tmp_path, tmp_path / "nope.safetensors", "not found")


def test_empty_file(t5_fp32, tmp_path):
    calib = tmp_path / "empty.safetensors"
    calib.write_bytes(b"")
    expect_refused(t5_fp32, tmp_path, calib, "empty")


def test_pickle_is_never_unpickled(t5_fp32, tmp_path):
    marker = tmp_path / "unpickled"
    calib = tmp_path / "calib.pt"
    write_pickle(calib, marker)
    expect_refused(t5_fp32, tmp_path, calib, "not a safetensors calibration file")
    assert not marker.exists()


def test_plain_model_file(t5_fp32, tmp_path):
    calib = tmp_path / "model.safetensors"
    shutil.copy(t5_fp32, calib)
    expect_refused(t5_fp32, tmp_path, calib, "not a calibration file")


@pytest.mark.parametrize("meta, needle", [
    ("{not json", "not valid JSON"),
    ('{"version": 1, "layers": [], "groups": 3}', "no 'layers'/'groups'"),
    ('{"version": 99, "layers": {}, "groups": {}}', "version 99 is not supported"),
    ('{"version": [1], "layers": {}, "groups": {}}', "is not supported"),
    ('[1, 2]', "not a JSON object"),
    ("[" * 100000 + "]" * 100000, "calibration"),
])
def test_bad_metadata(t5_fp32, tmp_path, meta, needle):
    calib = good_calibration(tmp_path / "c.safetensors")
    rewrite(calib, meta=lambda m: meta)
    expect_refused(t5_fp32, tmp_path, calib, needle)


@pytest.mark.parametrize("sketch_rows, name", [(3072, "g0.rest_gram"), (3072, "g0.fit_diag"), (16, "g0.basis"),
                                               (16, "g0.fit_weight"), (16, "g0.rest_mean")])
def test_missing_tensor(t5_fp32, tmp_path, sketch_rows, name):
    calib = good_calibration(tmp_path / "c.safetensors", sketch_rows=sketch_rows)
    rewrite(calib, tensors=lambda t: {k: v for k, v in t.items() if k != name})
    expect_refused(t5_fp32, tmp_path, calib, f"'{name}'", "missing")


@pytest.mark.parametrize("sketch_rows, name, bad, needle", [
    (3072, "g0.fit_gram", torch.zeros(3, 3), "expected float [64, 64]"),
    (16, "g0.basis", torch.zeros(65, 64), "expected float ['rows', 64]"),
    (16, "g0.basis", torch.zeros(16, 63), "expected float ['rows', 64]"),
    (16, "g0.fit_weight", torch.zeros(16, 15), "expected float [16, 16]"),
    (16, "g0.rest_diag", torch.zeros(64, 1), "expected float [64]"),
])
def test_misshapen_tensor(t5_fp32, tmp_path, sketch_rows, name, bad, needle):
    calib = good_calibration(tmp_path / "c.safetensors", sketch_rows=sketch_rows)
    rewrite(calib, tensors=lambda t: {**t, name: bad})
    expect_refused(t5_fp32, tmp_path, calib, f"'{name}'", needle)


def test_counts_that_do_not_add_up(t5_fp32, tmp_path):
    calib = good_calibration(tmp_path / "c.safetensors", sketch_rows=16)

    def meta(m):
        info = json.loads(m)
        info["groups"]["g0"]["rest_count"] += 1
        return json.dumps(info)

    rewrite(calib, meta=meta)
    expect_refused(t5_fp32, tmp_path, calib, "bad 'rest_count'", "'g0'")


@pytest.mark.parametrize("sketch_rows, name", [(3072, "g0.rest_gram"), (3072, "g0.fit_mean"), (3072, "g0.fit_gram"),
                                               (16, "g0.basis"), (16, "g0.fit_weight"), (16, "g0.rest_diag")])
def test_nan_statistics(t5_fp32, tmp_path, sketch_rows, name):
    calib = good_calibration(tmp_path / "c.safetensors", sketch_rows=sketch_rows)

    def poison(t):
        v = t[name].clone()
        v.view(-1)[0] = float("nan")
        return {**t, name: v}

    rewrite(calib, tensors=poison)
    expect_refused(t5_fp32, tmp_path, calib, f"'{name}'", "NaN")


def test_version_1_files_still_work(tmp_path):
    """A file of the first format (whole-set statistics only, no fit half) opens; its layers have no held-out
    split."""
    x = torch.randn(200, 64, generator=torch.Generator().manual_seed(0))
    meta = {"version": 1, "layers": {LAYER: {"group": "g0", "has_bias": False}},
            "groups": {"g0": {"in_features": 64, "count": 200}}, "source": {}}
    calib = str(tmp_path / "c.safetensors")
    save_file({"g0.mean": x.mean(0), "g0.gram": x.T @ x / 200}, calib, metadata={FORMAT_KEY: json.dumps(meta)})
    cal = load_calibration(calib).get(LAYER)
    assert cal is not None and not cal.has_split and cal.count == 200 and torch.equal(cal.gram, x.T @ x / 200)


# capture: safetensors weights only

def model_folder_without_safetensors(tmp_path, marker):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in os.listdir(minilm_dir()):
        if not name.endswith(".safetensors") and os.path.isfile(os.path.join(minilm_dir(), name)):
            shutil.copy(os.path.join(minilm_dir(), name), folder / name)
    write_pickle(folder / "pytorch_model.bin", marker)
    return folder


def test_capture_refuses_a_folder_without_safetensors(tmp_path):
    marker = tmp_path / "unpickled"
    folder = model_folder_without_safetensors(tmp_path, marker)
    text = tmp_path / "t.txt"
    text.write_text("A line of calibration text.\n")
    out = tmp_path / "c.safetensors"
    p = run_cli("capture", "--model", str(folder), "--text", str(text), "--output", str(out))
    err = p.stderr.strip()
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and len(err.splitlines()) == 1, p.stderr
    assert str(folder) in err and "no safetensors weights" in err and "pytorch_model.bin" in err, err
    assert not out.exists() and not marker.exists()


def test_capture_loads_safetensors_beside_a_pickle(tmp_path):
    """With both present, the safetensors weights are loaded and the pickle is never touched."""
    marker = tmp_path / "unpickled"
    folder = model_folder_without_safetensors(tmp_path, marker)
    shutil.copy(os.path.join(minilm_dir(), "model.safetensors"), folder / "model.safetensors")
    text = tmp_path / "t.txt"
    text.write_text("A line of calibration text.\nAnother line, for the second half.\n")
    out = tmp_path / "c.safetensors"
    p = run_cli("capture", "--model", str(folder), "--text", str(text), "--output", str(out))
    assert p.returncode == 0, p.stderr
    assert not marker.exists()
    cal = load_calibration(str(out)).get("encoder.layer.0.output.dense.weight")
    assert cal.has_split and 0 < cal.fit_count < cal.count


def test_capture_refuses_a_missing_folder(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("A line.\n")
    p = run_cli("capture", "--model", str(tmp_path / "none"), "--text", str(text), "--output",
                str(tmp_path / "c.safetensors"))
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
