"""The command line as users run it: reference flags, defaults, naming, report, demo (issue 2, criterion 1)."""

import json
import re
import os
import shutil

import torch
from safetensors import safe_open

from conftest import run_cli


def test_reference_flags_and_default_naming(tmp_path, flux_bf16):
    p = run_cli("--input", flux_bf16, "--num_iter", "0", "--top_k", "2", "--calib_samples", "64", check=True)
    out = str(tmp_path / "flux-small_float16_scaled_learned_svd.safetensors")
    assert os.path.isfile(out), os.listdir(tmp_path)
    assert "quantized" in p.stdout and "worst tensors" in p.stdout
    with safe_open(out, "pt") as f:
        settings = json.loads(f.metadata()["scaled_fp16.settings"])
    assert (settings["num_iter"], settings["top_k"], settings["calib_samples"]) == (0, 2, 64)
    assert settings["t5xxl"] is False and settings["keep_distillation"] is False


def test_keep_distillation_naming(tmp_path, flux_bf16):
    run_cli("--input", flux_bf16, "--keep_distillation", "--num_iter", "0", "--quiet", check=True)
    out = tmp_path / "flux-small_float16_scaled_learned_nodistill_svd.safetensors"
    with safe_open(str(out), "pt") as f:
        assert f.get_tensor("img_in.weight").dtype == torch.bfloat16
        assert f.get_tensor("double_blocks.0.img_mlp.0.weight").dtype == torch.float16


def test_t5xxl_flag(tmp_path, t5_fp32):
    run_cli("--input", t5_fp32, "--t5xxl", "--num_iter", "0", "--quiet", check=True)
    out = tmp_path / "t5-small_float16_scaled_learned_svd.safetensors"
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        assert tuple(f.get_tensor("scaled_fp16").shape) == (0,)
    assert "lm_head.weight" not in keys and not any("decoder" in k for k in keys)
    assert "encoder.block.0.layer.0.SelfAttention.q.scale_input" in keys


def test_defaults_match_reference(tmp_path, flux_bf16):
    from quant_core.cli import build_parser
    a = build_parser().parse_args(["--input", "x.safetensors"])
    assert (a.num_iter, a.top_k, a.calib_samples, a.t5xxl, a.keep_distillation, a.output) == \
        (256, 1, 3072, False, False, None)


def test_report_json_and_progress(tmp_path, flux_bf16):
    report = tmp_path / "report.json"
    p = run_cli("--input", flux_bf16, "--output", str(tmp_path / "o.safetensors"), "--report", str(report),
                "--num_iter", "0", "--scale", "pow2", "--device", "cpu", check=True)
    r = json.loads(report.read_text())
    assert r["counts"]["quantized"] == len(r["tensors"]) > 0
    assert r["bit_exact_fraction_bf16"] == 1.0
    assert all(t["scale"] != 1.0 and t["nonfinite"] == 0 for t in r["tensors"])
    # tqdm bar by bytes with "i/N action key" in its postfix (its rate unit depends on machine speed: any)
    n = r["counts"]["quantized"] + r["counts"]["kept"]
    assert re.search(rf"converting: 100%.*B/s, {n}/{n} (kept|quantized) \S+", p.stderr), p.stderr
    # the report's plain-words line and the per-tensor figures one tensor cannot dominate
    assert r["headline"].startswith("stored as fp16 with per-tensor power-of-two scales; error vs plain fp16 cast: ")
    per = r["rel_error_per_tensor"]
    rels = sorted(t["rel_error"] for t in r["tensors"])
    assert per["worst"] == rels[-1] and per["worst_key"] in {t["key"] for t in r["tensors"]}
    assert rels[0] <= per["median"] <= rels[-1]
    assert r["learned"]["passes_used_max"] == 0  # num_iter 0: no search pass


def test_demo_runs_without_input(tmp_path):
    p = run_cli("--demo", cwd=str(tmp_path), check=True)
    folder = tmp_path / "scaled-fp16-demo"
    assert f"demo: working in {folder}" in p.stdout
    assert "demo: built a small FLUX-shaped model (BF16, as FLUX ships)" in p.stdout
    assert "demo: built a small FLUX-shaped model (FP32, as a training checkpoint would be)" in p.stdout
    assert p.stdout.count("tensors: 36 quantized") == 2
    # BF16 is exact in fp16; FP32 gives the learned rounding work, and the summary says what it achieved
    bf16, fp32 = p.stdout.split("(FP32, as a training checkpoint would be)")
    headline = "stored as fp16 with per-tensor power-of-two scales; error vs plain fp16 cast: "
    assert headline + "same (nothing for the learned rounding to improve)" in bf16
    assert "learned rounding: nothing to improve" in bf16
    m = re.search(r"along each weight's top-1 principal direction: (more than 99.5|\d+) % lower \(median of (\d+) "
                  r"checked", fp32)
    assert m and float(m.group(1).split()[-1]) >= 50 and int(m.group(2)) > 0, fp32
    m = re.search(r"learned rounding: error along the top-1 principal direction ([\d.e+-]+)x RTN's \(median", fp32)
    assert m and float(m.group(1)) < 0.5, fp32
    assert "both figures hold together" in fp32 and "search passes used: at most " in fp32
    assert re.search(r"error per tensor \(relF\): median \S+, worst \S+ \(\S+\.weight\)", fp32), fp32
    # the files stay in the named folder, and the last lines say what to do next
    names = sorted(os.listdir(folder))
    assert names == ["demo-flux-small-f32.safetensors", "demo-flux-small-f32_float16_scaled_learned_svd.safetensors",
                     "demo-flux-small.safetensors", "demo-flux-small_float16_scaled_learned_svd.safetensors"], names
    nxt = [line for line in p.stdout.splitlines() if line.startswith("next: ")]
    assert len(nxt) >= 3 and str(folder / names[3]) in nxt[0] and "Load Diffusion Model (Scaled FP16)" in p.stdout
    assert os.listdir(tmp_path) == ["scaled-fp16-demo"]


def test_num_iter_help_says_where_it_stops_mattering():
    from quant_core import report, rounding
    from quant_core.cli import build_parser
    assert report.MAX_PASSES == rounding.MAX_PASSES
    help_text = " ".join(build_parser().format_help().split())
    assert f"any value from {rounding.MAX_PASSES} on gives the same file" in help_text
    assert "passes_used" in help_text


def test_usage_error_without_input():
    p = run_cli()
    assert p.returncode == 2 and "--input is required" in p.stderr
