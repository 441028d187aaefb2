"""The per-tensor event stream that the CLI, the ComfyUI nodes and the web UI consume (docs/ARCHITECTURE.md)."""

import json
import statistics

import pytest

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from quant_core import ConvertOptions, convert_file
from quant_core.report import compact, format_summary

METRIC_FIELDS = {"max_abs", "scale", "nonfinite", "flushed_to_zero", "subnormal", "rel_error", "rtn_rel_error",
                 "error_ratio", "max_rel_error", "bit_exact_fraction", "changed_vs_rtn", "seconds", "method"}


def test_event_stream(flux_bf16, tmp_path):
    events = []
    out = str(tmp_path / "o.safetensors")
    report = convert_file(flux_bf16, out, ConvertOptions(num_iter=0), on_event=events.append)
    json.dumps(events)  # everything is JSON-serialisable, as the nodes forward it to the browser
    start, tensors, done = events[0], events[1:-1], events[-1]
    assert start["type"] == "start" and start["total"] == len(tensors) and start["output"] == out
    assert done["type"] == "done" and done["report"] == report
    assert [e["index"] for e in tensors] == list(range(1, len(tensors) + 1))
    assert all(e["total"] == len(tensors) for e in tensors)
    done_bytes = [e["bytes_done"] for e in tensors]
    assert done_bytes == sorted(done_bytes) and done_bytes[-1] == start["bytes_total"] == tensors[0]["bytes_total"]
    assert tensors[-1]["eta_s"] == 0.0 and all(e["rate_bytes_s"] > 0 for e in tensors)
    assert all(e["elapsed_s"] >= 0 and (e["eta_s"] is None or e["eta_s"] >= 0) for e in tensors)
    quantized = [e for e in tensors if e["action"] == "quantized"]
    kept = [e for e in tensors if e["action"] == "kept"]
    assert len(quantized) == report["counts"]["quantized"] and len(kept) == report["counts"]["kept"]
    with safe_open(flux_bf16, "pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    assert all(e["shape"] == shapes[e["key"]] for e in tensors)  # every event names its tensor's own shape
    for e in quantized:
        assert METRIC_FIELDS <= set(e["metrics"]), set(e["metrics"]) ^ METRIC_FIELDS
        assert e["dtype"] == "bfloat16" and e["scale"] == 1.0 and e["metrics"]["nonfinite"] == 0
        assert len(e["shape"]) == 2
    assert all(e["scale"] is None and e["metrics"] == {} for e in kept)
    # the overall figure is an energy-weighted mean of the per-tensor ones, so it lies between them
    rels = [t["rel_error"] for t in report["tensors"]]
    assert min(rels) <= report["rel_error"] <= max(rels) and report["rel_error"] > 0
    c = compact(report)
    assert "tensors" not in c and len(c["ratios"]) == len(quantized)


def test_events_for_removed_and_unscaled(t5_fp32, tmp_path):
    events = []
    convert_file(t5_fp32, str(tmp_path / "o.safetensors"), ConvertOptions(t5xxl=True, num_iter=0),
                 on_event=events.append)
    removed = [e for e in events if e.get("action") == "removed"]
    assert removed and all("decoder" in e["key"] or "lm_head" in e["key"] for e in removed)
    q = [e for e in events if e.get("action") == "quantized"]
    assert all(e["dtype"] == "float32" and e["metrics"]["error_ratio"] == 1.0 for e in q)
    # fp32 sources: RTN error is real and reported beside the stored error
    assert all(0 < e["metrics"]["rel_error"] < 1e-3 for e in q)


def test_state_dict_source_streams_lazily(flux_bf16, tmp_path):
    """Tensors held or computed in memory (a ComfyUI model with a LoRA applied) convert like the same file."""
    from quant_core import StateDictSource, convert

    with safe_open(flux_bf16, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    asked = []

    def getter(key):
        asked.append(key)
        return tensors[key]

    specs = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    convert(StateDictSource("flux-small.safetensors", specs, getter), a, ConvertOptions(num_iter=0))
    convert_file(flux_bf16, b, ConvertOptions(num_iter=0))
    assert sorted(asked) == sorted(tensors) and len(asked) == len(set(asked))  # each produced once, on demand
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        assert set(fa.keys()) == set(fb.keys())
        for k in fa.keys():
            assert torch.equal(fa.get_tensor(k), fb.get_tensor(k)), k


def test_state_dict_source_rejects_mismatch(tmp_path):
    from quant_core import ConversionError, StateDictSource, convert

    src = StateDictSource("model", {"a.weight": (torch.float32, (4, 4))}, lambda k: torch.zeros(3, 3))
    with pytest.raises(ConversionError, match="'a.weight'"):
        convert(src, str(tmp_path / "o.safetensors"), ConvertOptions(num_iter=0))
    assert list(tmp_path.iterdir()) == []


def test_report_says_what_the_learned_step_did(flux_bf16, t5_fp32, tmp_path):
    """FP32 weights: the report's learned figures are the per-tensor top-k ratios, averaged; BF16 weights (exact in
    fp16): it says there was nothing to improve. Without a calibration file no bias changes, and the report says why."""
    fp32 = convert_file(t5_fp32, str(tmp_path / "t5.safetensors"), ConvertOptions(t5xxl=True))
    worked = [t["topk_ratio"] for t in fp32["tensors"]
              if t.get("method") == "topk" and t.get("iterations", 0) > 0 and t["topk_ratio"] is not None]
    learned = fp32["learned"]
    assert learned["topk_tensors"] == len(worked) > 0
    assert abs(learned["topk_ratio_mean"] - sum(worked) / len(worked)) < 1e-12 and learned["topk_ratio_mean"] < 0.5
    assert abs(learned["topk_ratio_median"] - statistics.median(worked)) < 1e-12
    assert learned["topk_ratio_worst"] == max(worked)
    assert learned["calibrated_tensors"] == 0 and learned["output_error_ratio_mean"] is None
    # per tensor: how the figure was checked, the gap it relied on, the passes used; the most passes in the block
    searched = [t for t in fp32["tensors"] if t.get("method") == "topk" and t.get("iterations", 0) > 0]
    assert all(t["topk_check"] == "exact_svd" and t["spectral_gap"] > 1 for t in searched)
    assert learned["passes_used_max"] == max(t["passes_used"] for t in fp32["tensors"]) >= 1
    text = format_summary(fp32)  # the terminal shows these figures, as the report has them
    assert text.splitlines()[0] == fp32["headline"]
    for figure in (learned["topk_ratio_median"], learned["topk_ratio_mean"], learned["topk_ratio_worst"]):
        assert f"{figure:.3g}x" in text, figure
    assert fp32["biases_corrected"] == 0 and fp32["bias_correction"]  # none changed, and the report says why
    assert all(not t.get("bias_corrected") for t in fp32["tensors"])
    ui = compact(fp32)  # what the node sends to the web panel: per-tensor top-k ratios for its chart
    assert [r for r in ui["topk_ratios"] if r is not None] == worked and len(ui["topk_ratios"]) == len(ui["ratios"])
    assert ui["headline"] == fp32["headline"] and ui["rel_error_per_tensor"] == fp32["rel_error_per_tensor"]
    assert ui["learned"]["passes_used_max"] == learned["passes_used_max"]
    assert ui["topk_checks"] == [t.get("topk_check") for t in fp32["tensors"]]
    assert ui["spectral_gaps"] == [t.get("spectral_gap") for t in fp32["tensors"]]
    assert ui["passes_used"] == [t.get("passes_used") for t in fp32["tensors"]]
    assert len(ui["topk_checks"]) == len(ui["spectral_gaps"]) == len(ui["passes_used"]) == len(ui["ratios"])
    per = fp32["rel_error_per_tensor"]
    worst = max(fp32["tensors"], key=lambda t: t["rel_error"])
    assert (per["worst"], per["worst_key"]) == (worst["rel_error"], worst["key"])
    bf16 = convert_file(flux_bf16, str(tmp_path / "flux.safetensors"), ConvertOptions())
    assert bf16["learned"]["topk_tensors"] == 0 and bf16["learned"]["topk_withheld"] == 0
    assert bf16["learned"]["passes_used_max"] == 0 and bf16["changed_vs_rtn"] == 0.0


def test_bf16_default_mode_stores_the_plain_cast(flux_bf16, t5_fp32, tmp_path):
    """BF16 weights at scale 1 are fp16 values already (but for a few subnormals): the default mode stores exactly
    torch's fp16 cast, byte for byte the same tensors as --num_iter 0, and the report says no element moved and no
    search pass ran. FP32 weights, in contrast, are searched: elements move off the plain cast, and the report
    counts them."""
    default, rtn = str(tmp_path / "b.safetensors"), str(tmp_path / "r.safetensors")
    report = convert_file(flux_bf16, default, ConvertOptions())
    convert_file(flux_bf16, rtn, ConvertOptions(num_iter=0))
    with safe_open(flux_bf16, "pt") as fs, safe_open(default, "pt") as fd, safe_open(rtn, "pt") as fr:
        assert set(fd.keys()) == set(fr.keys())
        for k in fd.keys():
            assert torch.equal(fd.get_tensor(k).view(torch.uint8), fr.get_tensor(k).view(torch.uint8)), k
        quantized = {t["key"] for t in report["tensors"]}
        for k in quantized:
            assert torch.equal(fd.get_tensor(k).view(torch.int16), fs.get_tensor(k).half().view(torch.int16)), k
            assert float(fd.get_tensor(k[:-7] + ".scale_weight")) == 1.0
    assert quantized and report["changed_vs_rtn"] == 0.0 and report["error_ratio"] == 1.0
    assert all(t["changed_vs_rtn"] == 0.0 and t.get("passes_used", 0) == 0 for t in report["tensors"])
    fp32 = convert_file(t5_fp32, str(tmp_path / "t.safetensors"), ConvertOptions(t5xxl=True))
    searched = [t for t in fp32["tensors"] if t.get("passes_used", 0) > 0]
    assert searched and all(t["changed_vs_rtn"] > 0 for t in searched) and fp32["changed_vs_rtn"] > 0


def test_calib_samples_sets_the_synthetic_rows_of_the_out_randn_figure(t5_fp32, tmp_path):
    """Without a calibration file, `calib_samples` is the number of synthetic rows of the out(randn) figure, measured
    for every tensor the learned rounding changed: it changes the report, never the stored bytes."""
    reports, files = [], []
    for samples in (3072, 256):
        out = str(tmp_path / f"t5-{samples}.safetensors")
        reports.append(convert_file(t5_fp32, out, ConvertOptions(t5xxl=True, calib_samples=samples)))
        files.append(load_file(out))
    # the same tensors, bit for bit (the header's metadata records the settings, calib_samples among them)
    assert files[0].keys() == files[1].keys()
    assert all(torch.equal(files[0][k].view(torch.uint8), files[1][k].view(torch.uint8)) for k in files[0])
    for rep, samples in zip(reports, (3072, 256)):
        changed = [t for t in rep["tensors"] if t.get("changed_vs_rtn", 0) > 0]
        assert changed and all(t["out_randn_samples"] == samples for t in changed)
        assert all("out_randn" not in t for t in rep["tensors"] if t.get("changed_vs_rtn", 0) == 0)
        learned = rep["learned"]
        assert learned["out_randn_tensors"] == len(changed) and learned["out_randn_samples"] == samples
        ratios = [t["out_randn_ratio"] for t in changed]
        assert abs(learned["out_randn_ratio_mean"] - sum(ratios) / len(ratios)) < 1e-12
        # random rows carry no information about a layer: the ratio follows the relF ratio (same rows for both)
        for t in changed:
            assert abs(t["out_randn_ratio"] - t["error_ratio"]) < 0.02, t
    # other rows, other figures (the rows are what calib_samples sets)
    assert [t.get("out_randn") for t in reports[0]["tensors"]] != [t.get("out_randn") for t in reports[1]["tensors"]]
    # calib_samples 0: no figure
    none = convert_file(t5_fp32, str(tmp_path / "none.safetensors"), ConvertOptions(t5xxl=True, calib_samples=0))
    assert none["learned"]["out_randn_tensors"] == 0
    assert all("out_randn" not in t for t in none["tensors"])


def test_out_randn_above_the_cpu_cost_limit_is_skipped_and_counted(tmp_path):
    """On the CPU the figure is left out where it would cost more than the limit (OUT_RANDN_CPU_FLOP): here 32768
    rows through a 256 x 1024 weight, 5.2e10 multiply-adds x 2, 2.6 times the limit. The report counts it as
    skipped; with 256 rows the same tensor gets its figure."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(256, 1024, generator=g) * 0.02
    w += 2.0 * torch.nn.functional.normalize(torch.randn(256, 1, generator=g), dim=0) @ \
        torch.nn.functional.normalize(torch.randn(1, 1024, generator=g), dim=1)  # a spectral gap: rounding works
    src = str(tmp_path / "w.safetensors")
    save_file({"lin.weight": w}, src)
    small = convert_file(src, str(tmp_path / "a.safetensors"), ConvertOptions(calib_samples=256, device="cpu"))
    big = convert_file(src, str(tmp_path / "b.safetensors"), ConvertOptions(calib_samples=32768, device="cpu"))
    assert small["tensors"][0]["changed_vs_rtn"] > 0 and big["tensors"][0]["changed_vs_rtn"] > 0
    assert small["learned"]["out_randn_tensors"] == 1 and "out_randn" in small["tensors"][0]
    assert small["learned"]["out_randn_skipped"] == 0
    assert big["learned"]["out_randn_tensors"] == 0 and "out_randn" not in big["tensors"][0]
    assert big["learned"]["out_randn_skipped"] == 1


def test_out_randn_figure_is_the_output_error_on_random_rows(t5_fp32, tmp_path):
    """out(randn) = ||X (Q - W)^T|| / ||X W^T|| over standard-normal rows X: for any fixed E, E||x E^T||^2 =
    ||E||_F^2, so on 3072 rows it estimates the relF of what is stored (and of RTN) measured from the files, to
    within its sampling error (under 0.5 % for these shapes). The same file gives the same figures on
    every run, and with another thread count the same to float rounding."""
    def run(name):
        out = str(tmp_path / name)
        return out, convert_file(t5_fp32, out, ConvertOptions(t5xxl=True))

    out, report = run("a.safetensors")
    _, again = run("b.safetensors")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, single = run("c.safetensors")
    finally:
        torch.set_num_threads(threads)
    figures = ("out_randn", "rtn_out_randn", "out_randn_ratio")
    rows = [[t.get(f) for f in figures] for t in report["tensors"]]
    assert rows == [[t.get(f) for f in figures] for t in again["tensors"]]  # the same rows each run
    for a, b in zip(rows, [[t.get(f) for f in figures] for t in single["tensors"]]):  # sums in another order
        assert a == b or a == pytest.approx(b, rel=1e-9), (a, b)
    checked = [t for t in report["tensors"] if "out_randn" in t]
    assert len(checked) >= 3
    with safe_open(t5_fp32, "pt") as fs, safe_open(out, "pt") as fo:
        for t in checked:
            w = fs.get_tensor(t["key"]).double()
            s = fo.get_tensor(t["key"][:-7] + ".scale_weight").double()
            rel = float((fo.get_tensor(t["key"]).double() * s - w).norm() / w.norm())
            rtn = float(((w.float() / s.float()).half().double() * s - w).norm() / w.norm())
            assert t["out_randn"] == pytest.approx(rel, rel=0.015), (t["key"], t["out_randn"], rel)
            assert t["rtn_out_randn"] == pytest.approx(rtn, rel=0.015), (t["key"], t["rtn_out_randn"], rtn)
            assert t["out_randn_ratio"] == pytest.approx(t["out_randn"] / t["rtn_out_randn"], rel=1e-9)
            assert t["out_randn_samples"] == 3072


def _synthetic_output_error():
    """The out(randn) function, from the module that holds the report's metrics (or, before they moved there, the
    rounding module)."""
    from quant_core import metrics, rounding
    return getattr(metrics, "synthetic_output_error", None) or rounding.synthetic_output_error


def test_out_randn_measures_the_given_weights_on_shared_rows():
    """With Q = W + E and an RTN of W + 2E, the same rows give exactly half the error: the figure measures what it
    is given, on the same rows for both; Q = W gives 0; on many rows it approaches ||E|| / ||W||; the rows are
    seeded."""
    f = _synthetic_output_error()
    g = torch.Generator().manual_seed(3)
    w = 0.02 * torch.randn(48, 80, generator=g)
    e = 1e-4 * torch.randn(48, 80, generator=g)
    got = f(w, w + e, samples=3000, seed=5, rtn_deq=w + 2 * e)
    assert got["out_randn_ratio"] == pytest.approx(0.5, rel=1e-5)
    assert got["rtn_out_randn"] == pytest.approx(2 * got["out_randn"], rel=1e-5)
    assert got["out_randn"] == pytest.approx(float(e.norm() / w.norm()), rel=0.03)
    assert got["out_randn_samples"] == 3000
    assert f(w, w.clone(), samples=300, seed=5, rtn_deq=w + e)["out_randn"] == 0.0
    assert f(w, w + e, samples=300, seed=5, rtn_deq=w + 2 * e) == f(w, w + e, samples=300, seed=5, rtn_deq=w + 2 * e)
    assert f(w, w + e, samples=300, seed=6)["out_randn"] != f(w, w + e, samples=300, seed=5)["out_randn"]
