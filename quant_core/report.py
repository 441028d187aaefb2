"""The conversion report: totals across tensors, the worst tensors, and per-tensor figures.

Overall errors are energy-weighted: rel_error = sqrt(sum ||Q-W||^2) / sqrt(sum ||W||^2) over quantized weights,
beside the same figure for plain round-to-nearest (RTN).
"""

from __future__ import annotations

import json
import math
import os

WORST_N = 5
_INTERNAL = ("err_sq", "rtn_err_sq", "w_sq", "sq_exp")


class Summary:
    def __init__(self, source: str, output: str, settings: dict, bytes_in: int):
        self.source, self.output, self.settings, self.bytes_in = source, output, settings, bytes_in
        self.counts = {"quantized": 0, "kept": 0, "removed": 0}
        self.tensors: list[dict] = []
        self._e = self._r = self._w = 0.0
        self._x: int | None = None  # unit of the squared sums above: 2^_x (0 unless a tensor needed float64 range)
        self.lossy: list[dict] = []  # tensors whose stored values are materially wrong (flushed, saturated)
        self._bf16_exact = self._bf16_n = 0.0
        self._changed = self._n = 0.0
        self.biases_corrected = 0
        self._topk: list[float] = []           # top-k error ratio of tensors the default mode worked on
        self._out: list[float] = []            # output error ratio (calibrated mode)
        self._out_bias: list[float] = []       # the same with the corrected bias
        self._out_eval: list[float] = []       # the same on the file's eval-text statistics
        self._out_on: set[str] = set()         # which inputs the calibrated figures are measured on
        self._fallbacks = 0                    # calibrated layers kept as without calibration (no held-out gain)
        self._rand: list[float] = []           # out(randn) ratio on synthetic rows (tensors the rounding changed)
        self._rand_skipped = 0

    def add(self, event: dict) -> None:
        self.counts[event["action"]] += 1
        m = event["metrics"]
        if m.get("bias_corrected"):
            self.biases_corrected += 1
        if event["action"] != "quantized":
            return
        self._add_sums(m["err_sq"], m["rtn_err_sq"], m["w_sq"], m.get("sq_exp", 0))
        if m.get("lossy"):
            self.lossy.append({"key": event["key"], "rel_error": m["rel_error"],
                               "flushed_to_zero": m["flushed_to_zero"], "reason": m["lossy"]})
        self._changed += m["changed_vs_rtn"] * m["numel"]
        self._n += m["numel"]
        if m.get("method") == "topk" and m.get("iterations", 0) > 0:
            self._topk.append(m["topk_ratio"])
        if "output_error_ratio" in m:
            self._out.append(m["output_error_ratio"])
            self._out_on.add(m.get("output_error_on", "calibration"))
        if "eval_output_error_ratio" in m:
            self._out_eval.append(m["eval_output_error_ratio"])
        if m.get("calibrated_fallback"):
            self._fallbacks += 1
        if "output_error_ratio_bias_corrected" in m:
            self._out_bias.append(m["output_error_ratio_bias_corrected"])
        if "out_randn_ratio" in m:
            self._rand.append(m["out_randn_ratio"])
        if m.get("out_randn_skipped"):
            self._rand_skipped += 1
        if event["dtype"] == "bfloat16":
            self._bf16_exact += m["bit_exact_fraction"] * m["numel"]
            self._bf16_n += m["numel"]
        row = {"key": event["key"], "shape": event["shape"], "dtype": event["dtype"]}
        row.update({k: v for k, v in m.items() if k not in _INTERNAL})
        self.tensors.append(row)

    def _add_sums(self, e: float, r: float, w: float, x: int) -> None:
        if self._x is None:
            self._x = x
        if x > self._x:  # rescale the totals to the larger unit (tiny totals may underflow: they do not matter)
            self._e, self._r, self._w = (math.ldexp(v, self._x - x) for v in (self._e, self._r, self._w))
            self._x = x
        elif x < self._x:
            e, r, w = (math.ldexp(v, x - self._x) for v in (e, r, w))
        self._e += e
        self._r += r
        self._w += w

    def _bias_correction(self) -> str:
        if self.biases_corrected:
            return f"calibration means ({self.biases_corrected} biases)"
        if not self.settings.get("calibration"):
            return "none: no calibration file (zero-mean synthetic rows would only add noise)"
        if not self.settings.get("bias_correction"):
            return "none: off by default (it did not help on held-out text; bias_correction turns it on)"
        return "none: no bias matched a calibrated layer"

    def finish(self, bytes_out: int, seconds: float) -> dict:
        rel = (self._e / self._w) ** 0.5 if self._w > 0 else 0.0
        rtn = (self._r / self._w) ** 0.5 if self._w > 0 else 0.0
        worst = sorted(self.tensors, key=lambda t: t["rel_error"], reverse=True)[:WORST_N]
        return {
            "format": "scaled_fp16",
            "source": os.path.basename(self.source),
            "output": os.path.basename(self.output),
            "settings": self.settings,
            "counts": dict(self.counts),
            "bytes_in": self.bytes_in,
            "bytes_out": bytes_out,
            "rel_error": rel,
            "rtn_rel_error": rtn,
            "error_ratio": rel / rtn if rtn > 0 else 1.0,
            "changed_vs_rtn": self._changed / self._n if self._n else 0.0,
            "bit_exact_fraction_bf16": self._bf16_exact / self._bf16_n if self._bf16_n else None,
            "biases_corrected": self.biases_corrected,
            "bias_correction": self._bias_correction(),
            "learned": {
                "topk_tensors": len(self._topk),
                "topk_ratio_mean": _mean(self._topk),
                "calibrated_tensors": len(self._out),
                "output_error_ratio_mean": _mean(self._out),
                "output_error_ratio_bias_corrected_mean": _mean(self._out_bias),
                "output_error_on": ", ".join(sorted(self._out_on)) or None,
                "eval_output_error_ratio_mean": _mean(self._out_eval),
                "calibrated_fallbacks": self._fallbacks,
                # synthetic rows (calib_samples): report only, in expectation the relF ratio
                "out_randn_tensors": len(self._rand),
                "out_randn_ratio_mean": _mean(self._rand),
                "out_randn_skipped": self._rand_skipped,
                "out_randn_samples": self.settings.get("calib_samples"),
            },
            "worst": [{k: t[k] for k in ("key", "rel_error", "rtn_rel_error", "error_ratio")} for t in worst],
            "lossy": list(self.lossy),
            "seconds": seconds,
            "tensors": self.tensors,
        }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def compact(report: dict) -> dict:
    """The report without the per-tensor list, plus the per-tensor error ratios (for UIs and charts): relF ratios
    and top-k ratios."""
    out = {k: v for k, v in report.items() if k != "tensors"}
    out["ratios"] = [t["error_ratio"] for t in report["tensors"]]
    # per tensor, the top-k error ratio where the default mode worked on the tensor (None elsewhere)
    out["topk_ratios"] = [t.get("topk_ratio") if t.get("method") == "topk" and t.get("iterations", 0) > 0 else None
                          for t in report["tensors"]]
    return out


def strict(obj, where: str = "", reasons: dict | None = None):
    """`obj` with every NaN/Infinity replaced by None (JSON has neither); `reasons` collects where and what."""
    if isinstance(obj, float) and not math.isfinite(obj):
        if reasons is not None:
            reasons[where] = "NaN" if obj != obj else ("Infinity" if obj > 0 else "-Infinity")
        return None
    if isinstance(obj, dict):
        return {k: strict(v, f"{where}.{k}" if where else str(k), reasons) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v, f"{where}[{i}]", reasons) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (str, int, bool, float)):
        return obj
    return strict(float(obj), where, reasons)  # e.g. a 0-d tensor


def report_json(report: dict) -> str:
    """The report as strict JSON: a figure that is not a finite number is null, and `null_reasons` says which
    and what it was."""
    reasons: dict[str, str] = {}
    clean = strict(report, "", reasons)
    if reasons:
        clean["null_reasons"] = reasons
    return json.dumps(clean, indent=1, allow_nan=False)


def write_json(report: dict, path: str, overwrite: bool = True) -> None:
    """Write the report as strict JSON, atomically (complete or not at all)."""
    from .safetensors_io import AtomicFile

    with AtomicFile(path, overwrite) as f:
        f.write(report_json(report).encode("utf-8"))
        f.commit()


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _calibrated_line(learned: dict) -> str:
    """What the calibrated layers' figures say, and what they predict (held-out rows) or cannot (in-sample)."""
    n, fb = learned["calibrated_tensors"], learned.get("calibrated_fallbacks", 0)
    on = learned.get("output_error_on") or "calibration"
    where = {"held-out half": "the held-out half of the calibration text"}.get(on, on)
    line = "calibrated rounding:"
    if n:
        line += f" output error {learned['output_error_ratio_mean']:.3f}x RTN's (mean over {n} tensors, on {where}"
        if learned.get("eval_output_error_ratio_mean") is not None and on != "eval text":
            line += f"; {learned['eval_output_error_ratio_mean']:.3f}x on the eval text"
        line += ")"
        if learned.get("output_error_ratio_bias_corrected_mean") is not None:
            line += f", {learned['output_error_ratio_bias_corrected_mean']:.3f}x with corrected biases"
    if fb:
        line += f"{';' if n else ''} {fb} layer(s) rounded as without calibration (no gain on held-out rows)"
    if "in-sample" in on:
        line += ("; measured on the calibration tokens themselves (no held-out half): this does not predict the "
                 "effect on other text")
    elif on == "eval text":
        line += "; expect it for text like the eval text"
    else:
        line += "; expect it for text like the calibration text, less for other text"
    return line


def format_summary(report: dict) -> str:
    """A few lines for the terminal."""
    c = report["counts"]
    lines = [
        f"tensors: {c['quantized']} quantized, {c['kept']} kept, {c['removed']} removed",
        f"size: {_mb(report['bytes_in'])} -> {_mb(report['bytes_out'])} in {report['seconds']:.1f} s",
        f"error: relF {report['rel_error']:.3e} vs round-to-nearest {report['rtn_rel_error']:.3e} "
        f"(ratio {report['error_ratio']:.4f}); {report['changed_vs_rtn'] * 100:.2f}% of elements differ from RTN",
    ]
    if report["bit_exact_fraction_bf16"] is not None:
        lines.append(f"bf16 sources: {report['bit_exact_fraction_bf16'] * 100:.4f}% of elements bit-exact")
    learned = report["learned"]
    if learned["topk_tensors"]:
        k = report["settings"].get("top_k", 1)
        lines.append(f"learned rounding: error along the top-{k} principal directions "
                     f"{learned['topk_ratio_mean']:.3g}x RTN's (mean over {learned['topk_tensors']} tensors)")
    elif not learned["calibrated_tensors"] and report["settings"].get("num_iter", 0) > 0:
        lines.append("learned rounding: nothing to improve (every weight is exact in fp16 or its round-to-nearest "
                     "error is negligible, as for BF16 weights)")
    if learned["calibrated_tensors"] or learned.get("calibrated_fallbacks"):
        lines.append(_calibrated_line(learned))
    if learned.get("out_randn_tensors") or learned.get("out_randn_skipped"):
        line = "out(randn)"
        if learned.get("out_randn_tensors"):
            line += (f" on {learned['out_randn_samples']} synthetic rows: {learned['out_randn_ratio_mean']:.4f}x RTN's "
                     f"output error (mean over {learned['out_randn_tensors']} changed tensors; random rows say nothing "
                     "about a layer: this follows the relF ratio)")
        if learned.get("out_randn_skipped"):
            line += (f"{';' if learned.get('out_randn_tensors') else ':'} skipped on {learned['out_randn_skipped']} "
                     "large tensors (too costly on the CPU; measured on a GPU)")
        lines.append(line)
    lines.append(f"bias correction: {report['bias_correction']}")
    if report["worst"]:
        lines.append("worst tensors (relF, ratio vs RTN):")
        lines += [f"  {w['key']}: {w['rel_error']:.3e} ({w['error_ratio']:.3f})" for w in report["worst"]]
    return "\n".join(lines)
