"""`report.Summary`: the report is the events of a real conversion, summed; and its figures hold when measured
from the files themselves (source and output, read with the safetensors library), not from the converter's own
sums."""

import math
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quant_core import ConvertOptions, convert_file
from quant_core.report import Summary, compact, format_summary


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """FP32 weights (the learned rounding changes them), one FP32 tensor that needs a scale, BF16 weights with
    some fp16-subnormal values (not all bit-exact at scale 1), biases and an integer buffer; converted with the
    default settings."""
    d = tmp_path_factory.mktemp("mixed")
    g = torch.Generator().manual_seed(21)
    tensors = {f"blocks.{i}.lin.weight": torch.randn(48 + 16 * i, 64, generator=g) * 0.02 for i in range(4)}
    tensors.update({f"blocks.{i}.lin.bias": torch.randn(48 + 16 * i, generator=g) * 0.01 for i in range(4)})
    tensors["tiny.weight"] = torch.randn(32, 32, generator=g) * 3e-5
    bf = torch.randn(40, 24, generator=g) * 0.02
    bf[::5] *= 1e-3
    tensors["bf.a.weight"] = bf.bfloat16()
    tensors["bf.b.weight"] = (torch.randn(16, 40, generator=g) * 0.05).bfloat16()
    tensors["pos_ids"] = torch.arange(10, dtype=torch.int64)
    src, out = str(d / "mixed.safetensors"), str(d / "out.safetensors")
    save_file(tensors, src)
    events = []
    report = convert_file(src, out, ConvertOptions(), on_event=events.append)
    return src, out, report, events


def test_summary_of_the_events_is_the_report(mixed):
    src, out, report, events = mixed
    start, tensor_events = events[0], [e for e in events if e["type"] == "tensor"]
    summary = Summary(src, out, start["settings"], os.path.getsize(src))
    for e in tensor_events:
        summary.add(e)
    again = summary.finish(report["bytes_out"], report["seconds"])
    assert again == report
    assert report["bytes_in"] == os.path.getsize(src) and report["bytes_out"] == os.path.getsize(out)


def _measured(src, out):
    """Per quantized tensor, from the files: squared errors of what is stored and of round-to-nearest at the
    stored scale, the weight's squared norm, elements that differ from RTN, bit-exact elements."""
    rows = {}
    with safe_open(src, "pt") as fs, safe_open(out, "pt") as fo:
        for key in fo.keys():
            if not key.endswith(".weight") or fo.get_tensor(key).dtype != torch.float16:
                continue
            w = fs.get_tensor(key)
            q, s = fo.get_tensor(key), fo.get_tensor(key[:-7] + ".scale_weight")
            w64 = w.double()
            rtn = (w.float() / s).half()
            deq, rtn_deq = (q.float() * s).double(), (rtn.float() * s).double()
            rows[key] = {"err_sq": float(((deq - w64) ** 2).sum()), "rtn_sq": float(((rtn_deq - w64) ** 2).sum()),
                         "w_sq": float((w64 ** 2).sum()), "changed": int((q != rtn).sum()), "numel": w.numel(),
                         "exact": int(((q.float() * s) == w.float()).sum()), "bf16": w.dtype == torch.bfloat16}
    return rows


def test_report_figures_hold_against_the_files(mixed):
    src, out, report, _ = mixed
    rows = _measured(src, out)
    with safe_open(src, "pt") as f:
        n_in = len(list(f.keys()))
    assert report["counts"] == {"quantized": len(rows), "kept": n_in - len(rows), "removed": 0}
    e, r, w = (sum(x[k] for x in rows.values()) for k in ("err_sq", "rtn_sq", "w_sq"))
    assert report["rel_error"] == pytest.approx(math.sqrt(e / w), rel=1e-5)
    assert report["rtn_rel_error"] == pytest.approx(math.sqrt(r / w), rel=1e-5)
    assert report["error_ratio"] == pytest.approx(math.sqrt(e / r), rel=1e-5)
    changed = sum(x["changed"] for x in rows.values())
    assert changed > 0  # the learned rounding did change elements here
    assert report["changed_vs_rtn"] == pytest.approx(changed / sum(x["numel"] for x in rows.values()), rel=1e-9)
    bf = [x for x in rows.values() if x["bf16"]]
    exact_bf16 = sum(x["exact"] for x in bf) / sum(x["numel"] for x in bf)
    assert 0.5 < exact_bf16 < 1.0 and report["bit_exact_fraction_bf16"] == pytest.approx(exact_bf16, rel=1e-9)
    per = {k: math.sqrt(x["err_sq"] / x["w_sq"]) for k, x in rows.items()}
    got = {t["key"]: t["rel_error"] for t in report["tensors"]}
    assert got.keys() == per.keys() and all(got[k] == pytest.approx(per[k], rel=1e-5) for k in per)
    ordered = sorted(per, key=per.get, reverse=True)
    assert [t["key"] for t in report["worst"]] == ordered[:5]
    assert report["rel_error_per_tensor"]["worst_key"] == ordered[0]
    assert report["rel_error_per_tensor"]["median"] == pytest.approx(sorted(per.values())[len(per) // 2], rel=1e-5)
    scales = {t["key"]: t["scale"] for t in report["tensors"]}
    assert scales["tiny.weight"] < 1.0 and all(s == 1.0 for k, s in scales.items() if k != "tiny.weight")


def test_summary_text_shows_the_reports_figures(mixed):
    """Every figure the terminal summary prints for the run comes from the report: the counts, the error
    figures and the worst tensor's key."""
    _, _, report, _ = mixed
    text = format_summary(report)
    c = report["counts"]
    for figure in (str(c["quantized"]), str(c["kept"]), f"{report['rel_error']:.3e}", f"{report['rtn_rel_error']:.3e}",
                   f"{report['error_ratio']:.4f}", report["rel_error_per_tensor"]["worst_key"]):
        assert figure in text, figure
    assert text.splitlines()[0] == report["headline"]
    ui = compact(report)
    assert "tensors" not in ui and ui["ratios"] == [t["error_ratio"] for t in report["tensors"]]


def test_empty_summary():
    """A file without a weight to quantize: zero counts, zero error, no per-tensor figures (not a division by 0)."""
    s = Summary("a.safetensors", "b.safetensors", {"num_iter": 0, "top_k": 1}, 100)
    s.add({"type": "tensor", "key": "x", "action": "kept", "metrics": {}, "dtype": "float32", "shape": [3]})
    r = s.finish(120, 0.0)
    assert r["counts"] == {"quantized": 0, "kept": 1, "removed": 0}
    assert (r["rel_error"], r["rtn_rel_error"], r["error_ratio"]) == (0.0, 0.0, 1.0)
    assert r["rel_error_per_tensor"] == {"median": None, "worst": None, "worst_key": None}
    assert r["bit_exact_fraction_bf16"] is None and r["worst"] == [] and r["tensors"] == []
    assert (r["source"], r["output"], r["bytes_in"], r["bytes_out"]) == ("a.safetensors", "b.safetensors", 100, 120)
