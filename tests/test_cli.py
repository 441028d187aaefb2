"""The command line as users run it: reference flags, defaults, naming, report, progress, demo."""

import json
import os
import re
import statistics

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import run_cli
from quant_core import ConvertOptions, convert_file


def test_reference_flags_and_default_naming(tmp_path, flux_bf16):
    p = run_cli("--input", flux_bf16, "--num_iter", "0", "--top_k", "2", "--calib_samples", "64", check=True)
    out = str(tmp_path / "flux-small_float16_scaled_learned_svd.safetensors")
    assert os.path.isfile(out), os.listdir(tmp_path)
    assert out in p.stdout  # it says where the file went
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
    # a progress bar that reaches the end, naming the tensor count (its units depend on machine speed: any)
    n = r["counts"]["quantized"] + r["counts"]["kept"]
    assert "100%" in p.stderr and f"{n}/{n} " in p.stderr, p.stderr
    # the summary on stdout leads with the report's headline; the per-tensor figures one tensor cannot dominate
    assert r["headline"] and r["headline"] in p.stdout.splitlines()
    per = r["rel_error_per_tensor"]
    rels = sorted(t["rel_error"] for t in r["tensors"])
    assert per["worst"] == rels[-1] and per["worst_key"] in {t["key"] for t in r["tensors"]}
    assert rels[0] <= per["median"] <= rels[-1]
    assert r["learned"]["passes_used_max"] == 0  # num_iter 0: no search pass


def _exact_top1_ratio(w, q):
    """Error along W's top singular pair (exact float64 SVD), stored Q against the plain fp16 cast."""
    u, _, vh = torch.linalg.svd(w.double(), full_matrices=False)
    u1, v1 = u[:, 0], vh[0]
    return abs(float(u1 @ (q.double() - w.double()) @ v1)) / abs(float(u1 @ (w.half().double() - w.double()) @ v1))


def test_demo_runs_without_input(tmp_path):
    p = run_cli("--demo", cwd=str(tmp_path), check=True)
    folder = tmp_path / "scaled-fp16-demo"
    names = sorted(os.listdir(folder))
    assert names == ["demo-flux-small-f32.safetensors", "demo-flux-small-f32_float16_scaled_learned_svd.safetensors",
                     "demo-flux-small.safetensors", "demo-flux-small_float16_scaled_learned_svd.safetensors"], names
    assert os.listdir(tmp_path) == ["scaled-fp16-demo"]  # everything stays in the named folder
    for name in (names[1], names[3]):
        assert str(folder / name) in p.stdout  # it tells where the converted files are
    # BF16 (as FLUX ships): every weight stored as its own fp16 cast; FP32: the learned rounding cuts the error
    # along each weight's top singular direction, checked here with an exact SVD of the weight
    ratios = []
    for src_name, out_name in ((names[2], names[3]), (names[0], names[1])):
        with safe_open(str(folder / src_name), "pt") as fs, safe_open(str(folder / out_name), "pt") as fo:
            assert tuple(fo.get_tensor("scaled_fp16").shape) == (2,)
            quantized = [k for k in fo.keys() if fo.get_tensor(k).dtype == torch.float16 and k != "scaled_fp16"]
            assert len(quantized) == 36
            for k in quantized:
                w, q = fs.get_tensor(k), fo.get_tensor(k)
                assert float(fo.get_tensor(k[:-7] + ".scale_weight")) == 1.0
                if w.dtype == torch.bfloat16:
                    assert torch.equal(q.view(torch.int16), w.half().view(torch.int16)), k
                else:
                    ratios.append(_exact_top1_ratio(w, q))
    assert len(ratios) == 36 and statistics.median(ratios) < 0.5, sorted(ratios)


def test_num_iter_help_says_where_it_stops_mattering(tmp_path, t5_fp32):
    """The help names the pass count from which num_iter changes nothing; converting with that count and with the
    default gives the same tensors, and the report's passes never exceed it."""
    from quant_core.cli import build_parser
    help_text = " ".join(build_parser().format_help().split())
    m = re.search(r"any value from (\d+) on gives the same file", help_text)
    assert m and "passes_used" in help_text, help_text
    limit = int(m.group(1))
    files, reports = [], []
    for n in (limit, 256):
        out = str(tmp_path / f"n{n}.safetensors")
        reports.append(convert_file(t5_fp32, out, ConvertOptions(t5xxl=True, num_iter=n)))
        files.append(load_file(out))
    assert files[0].keys() == files[1].keys()
    assert all(torch.equal(files[0][k].view(torch.uint8), files[1][k].view(torch.uint8)) for k in files[0])
    assert 1 <= reports[1]["learned"]["passes_used_max"] <= limit


def test_usage_error_without_input():
    p = run_cli()
    assert p.returncode == 2 and "--input" in p.stderr
