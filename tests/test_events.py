"""The per-tensor event stream that the CLI, the ComfyUI nodes and the web UI consume (docs/ARCHITECTURE.md)."""

import statistics
import json

import torch
from safetensors.torch import load_file

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
    for e in quantized:
        assert METRIC_FIELDS <= set(e["metrics"]), set(e["metrics"]) ^ METRIC_FIELDS
        assert e["dtype"] == "bfloat16" and e["scale"] == 1.0 and e["metrics"]["nonfinite"] == 0
        assert isinstance(e["shape"], list) and len(e["shape"]) == 2
    assert all(e["scale"] is None and e["metrics"] == {} for e in kept)
    # the overall figure is an energy-weighted mean of the per-tensor ones, so it lies between them
    rels = [t["rel_error"] for t in report["tensors"]]
    assert min(rels) <= report["rel_error"] <= max(rels) and report["rel_error"] > 0
    c = compact(report)
    assert "tensors" not in c and len(c["ratios"]) == len(quantized)
    text = format_summary(report)
    assert f"{len(quantized)} quantized" in text and "round-to-nearest" in text


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
    from safetensors import safe_open
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
    import pytest
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
    text = format_summary(fp32)
    assert text.splitlines()[0] == fp32["headline"]
    assert f"{learned['topk_ratio_median']:.3g}x RTN's (median; mean {learned['topk_ratio_mean']:.3g}x" in text
    assert f"over {len(worked)} tensors, each checked in a basis the search did not use" in text
    assert fp32["biases_corrected"] == 0 and fp32["bias_correction"].startswith("none: no calibration file")
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
    assert bf16["learned"]["topk_tensors"] == 0
    assert "learned rounding: nothing to improve" in format_summary(bf16)
    assert "nothing to improve" not in format_summary(
        convert_file(flux_bf16, str(tmp_path / "rtn.safetensors"), ConvertOptions(num_iter=0)))


def test_bf16_default_mode_skips_the_rounding_pass(flux_bf16, t5_fp32, tmp_path, monkeypatch):
    """BF16 at scale 1: RTN's error is negligible, so the converter neither copies the tensor to float32 nor searches
    (the search would return RTN: same bytes; the report marks the tensors top-k with 0 iterations). FP32 weights
    are searched."""
    from quant_core import rounding

    calls = []
    real = rounding.round_to_fp16
    monkeypatch.setattr(rounding, "round_to_fp16", lambda *a, **k: calls.append(1) or real(*a, **k))
    report = convert_file(flux_bf16, str(tmp_path / "b.safetensors"), ConvertOptions())
    assert calls == []
    assert report["tensors"] and all(t["method"] in ("nothing_to_move", "exact") for t in report["tensors"])
    assert all(t["iterations"] == 0 and t["topk_ratio"] == 1.0 for t in report["tensors"]
               if t["method"] == "nothing_to_move")
    fp32 = convert_file(t5_fp32, str(tmp_path / "t.safetensors"), ConvertOptions(t5xxl=True))
    assert len(calls) == fp32["counts"]["quantized"] > 0


def test_calib_samples_sets_the_synthetic_rows_of_the_out_randn_figure(t5_fp32, tmp_path, monkeypatch):
    """Without a calibration file, `calib_samples` is the number of synthetic rows of the out(randn) figure, measured
    for every tensor the learned rounding changed: it changes the report, never the stored bytes."""
    from quant_core import metrics

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
        assert f"out(randn) on {samples} synthetic rows" in format_summary(rep)
    # other rows, other figures (the rows are what calib_samples sets)
    assert [t.get("out_randn") for t in reports[0]["tensors"]] != [t.get("out_randn") for t in reports[1]["tensors"]]
    # calib_samples 0: no figure; on the CPU a tensor above the cost limit is skipped and counted
    none = convert_file(t5_fp32, str(tmp_path / "none.safetensors"), ConvertOptions(t5xxl=True, calib_samples=0))
    assert none["learned"]["out_randn_tensors"] == 0 and "out(randn)" not in format_summary(none)
    monkeypatch.setattr(metrics, "OUT_RANDN_CPU_FLOP", 0.0)
    skipped = convert_file(t5_fp32, str(tmp_path / "skip.safetensors"), ConvertOptions(t5xxl=True))
    assert skipped["learned"]["out_randn_tensors"] == 0
    assert skipped["learned"]["out_randn_skipped"] == reports[0]["learned"]["out_randn_tensors"]
    assert "skipped on" in format_summary(skipped)


def test_synthetic_output_error_is_the_output_error_on_the_drawn_rows():
    """out(randn) against a direct computation with the same seeded rows."""
    from quant_core.metrics import synthetic_output_error

    g = torch.Generator().manual_seed(3)
    w = 0.02 * torch.randn(48, 80, generator=g)
    q = (w + 1e-4 * torch.randn(48, 80, generator=g)).half().float()
    rtn = w.half().float()
    got = synthetic_output_error(w, q, samples=300, seed=5, rows_per_step=128, rtn_deq=rtn)
    rows = torch.Generator().manual_seed(5)
    x = torch.cat([torch.randn(r, 80, generator=rows) for r in (128, 128, 44)]).double()
    wd = w.double()
    err, ref, base = ((x @ (q.double() - wd).T).norm(), (x @ wd.T).norm(), (x @ (rtn.double() - wd).T).norm())
    assert abs(got["out_randn"] - float(err / ref)) < 1e-6 * float(err / ref)
    assert abs(got["rtn_out_randn"] - float(base / ref)) < 1e-6 * float(base / ref)
    assert abs(got["out_randn_ratio"] - float(err / base)) < 1e-6 and got["out_randn_samples"] == 300
