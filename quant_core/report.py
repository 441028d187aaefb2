"""The conversion report: totals across tensors, the worst tensors, and per-tensor figures.

Overall errors are energy-weighted: rel_error = sqrt(sum ||Q-W||^2) / sqrt(sum ||W||^2) over quantized weights,
beside the same figure for plain round-to-nearest (RTN). One large tensor can dominate that total, so the median and
the worst per-tensor figure stand beside it (`rel_error_per_tensor`). `headline` says the result in words.
"""

from __future__ import annotations

import json
import math
import os

from .options import MAX_PASSES

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
        self._topk: list[float] = []           # top-k error ratio (checked basis) of tensors the default mode changed
        self._topk_withheld: list[str] = []    # why the default mode left a tensor at RTN (no figure it can stand by)
        self._passes_max = 0                   # most search passes any tensor used
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
        if m.get("method") == "topk" and m.get("iterations", 0) > 0 and m.get("topk_ratio") is not None:
            self._topk.append(m["topk_ratio"])
        if str(m.get("topk_check", "")).startswith("withheld"):
            self._topk_withheld.append(m["topk_check"])
        self._passes_max = max(self._passes_max, int(m.get("passes_used", 0)))
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
        per_tensor = sorted(t["rel_error"] for t in self.tensors)
        topk_sorted = sorted(self._topk)
        report = {
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
            "rel_error_per_tensor": {
                "median": _median(per_tensor),
                "worst": worst[0]["rel_error"] if worst else None,
                "worst_key": worst[0]["key"] if worst else None,
            },
            "changed_vs_rtn": self._changed / self._n if self._n else 0.0,
            "bit_exact_fraction_bf16": self._bf16_exact / self._bf16_n if self._bf16_n else None,
            "biases_corrected": self.biases_corrected,
            "bias_correction": self._bias_correction(),
            "learned": {
                "topk_tensors": len(self._topk),
                "topk_ratio_mean": _mean(self._topk),
                "topk_ratio_median": _median(topk_sorted),
                "topk_ratio_worst": topk_sorted[-1] if topk_sorted else None,
                # left at RTN: no usable spectral gap, or the checked figure did not improve (reasons per tensor)
                "topk_withheld": len(self._topk_withheld),
                "topk_withheld_example": self._topk_withheld[0] if self._topk_withheld else None,
                "passes_used_max": self._passes_max,
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
        report["headline"] = headline(report)
        return report


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _median(ordered: list[float]) -> float | None:
    if not ordered:
        return None
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _change(ratio: float) -> str:
    """A ratio to a plain cast in words: 'same' within 0.1 %, else 'N % lower' / 'N % higher'."""
    if abs(ratio - 1.0) < 1e-3:
        return "same"
    if ratio < 0.005:
        return "more than 99.5 % lower"
    pct = abs(ratio - 1.0) * 100
    digits = 0 if pct >= 10 else 1
    return f"{pct:.{digits}f} % {'lower' if ratio < 1 else 'higher'}"


def headline(report: dict) -> str:
    """The result in one line of words, for people who know ComfyUI but not this project."""
    line = "stored as fp16 with per-tensor power-of-two scales; error vs plain fp16 cast: "
    line += _change(report["error_ratio"])
    learned = report["learned"]
    if learned.get("calibrated_tensors") and learned.get("output_error_ratio_mean") is not None:
        line += f"; layer output error on calibration text: {_change(learned['output_error_ratio_mean'])}"
    elif learned.get("topk_tensors") and learned.get("topk_ratio_median") is not None:
        k = report["settings"].get("top_k", 1)
        line += (f"; along each weight's top-{k} principal direction{'s' if k > 1 else ''}: "
                 f"{_change(learned['topk_ratio_median'])} (median of {learned['topk_tensors']} checked tensors)")
    elif report["settings"].get("num_iter", 0) > 0 and not learned.get("calibrated_tensors"):
        line += " (nothing for the learned rounding to improve)" if not learned.get("topk_withheld") else \
            " (learned rounding left every weight as the plain cast: no figure it could check)"
    return line


def compact(report: dict) -> dict:
    """The report without the per-tensor list, plus the per-tensor error ratios (for UIs and charts): relF ratios
    and top-k ratios."""
    out = {k: v for k, v in report.items() if k != "tensors"}
    out["ratios"] = [t["error_ratio"] for t in report["tensors"]]
    # per tensor, the top-k error ratio where the default mode worked on the tensor (None elsewhere)
    out["topk_ratios"] = [t.get("topk_ratio") if t.get("method") == "topk" and t.get("iterations", 0) > 0 else None
                          for t in report["tensors"]]
    # per tensor (aligned with `ratios`): how the top-k figure was checked (or why it is withheld), the spectral
    # gap sigma_k / sigma_k+1 it relied on, and the search passes used (None where the default mode did not run)
    out["topk_checks"] = [t.get("topk_check") for t in report["tensors"]]
    out["spectral_gaps"] = [t.get("spectral_gap") for t in report["tensors"]]
    out["passes_used"] = [t.get("passes_used") for t in report["tensors"]]
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
    """A few lines for the terminal: the headline in words, then the figures (terms: README, "Glossary")."""
    c = report["counts"]
    per = report.get("rel_error_per_tensor") or {}
    lines = [
        report.get("headline") or headline(report),
        f"tensors: {c['quantized']} quantized, {c['kept']} kept, {c['removed']} removed",
        f"size: {_mb(report['bytes_in'])} -> {_mb(report['bytes_out'])} in {report['seconds']:.1f} s",
        f"error (relF): {report['rel_error']:.3e} over all weights vs {report['rtn_rel_error']:.3e} for "
        f"round-to-nearest (ratio {report['error_ratio']:.4f}); {report['changed_vs_rtn'] * 100:.2f}% of elements "
        "differ from RTN",
    ]
    if per.get("median") is not None:
        lines.append(f"error per tensor (relF): median {per['median']:.3e}, worst {per['worst']:.3e} "
                     f"({per['worst_key']})")
    if report["bit_exact_fraction_bf16"] is not None:
        lines.append(f"bf16 sources: {report['bit_exact_fraction_bf16'] * 100:.4f}% of elements bit-exact")
    learned = report["learned"]
    k = report["settings"].get("top_k", 1)
    if learned["topk_tensors"]:
        lines.append(f"learned rounding: error along the top-{k} principal direction{'s' if k > 1 else ''} "
                     f"{learned['topk_ratio_median']:.3g}x RTN's (median; mean {learned['topk_ratio_mean']:.3g}x, "
                     f"worst {learned['topk_ratio_worst']:.3g}x over {learned['topk_tensors']} tensors, each "
                     "checked in a basis the search did not use)")
        lines.append(f"  both figures hold together: the search moves few elements, chosen so that their errors "
                     f"cancel along those directions, and lets the overall error (relF) rise by at most ~0.5 % "
                     f"(here ratio {report['error_ratio']:.4f})")
    elif not learned["calibrated_tensors"] and report["settings"].get("num_iter", 0) > 0 \
            and not learned.get("topk_withheld"):
        lines.append("learned rounding: nothing to improve (every weight is exact in fp16 or its round-to-nearest "
                     "error is negligible, as for BF16 weights)")
    if learned.get("topk_withheld"):
        lines.append(f"learned rounding withheld on {learned['topk_withheld']} tensors (stored as RTN), e.g. "
                     f"{learned['topk_withheld_example']}")
    if learned.get("topk_tensors") or learned.get("topk_withheld"):
        lines.append(f"search passes used: at most {learned.get('passes_used_max', 0)} per tensor "
                     f"(num_iter {report['settings'].get('num_iter')}; above {MAX_PASSES} it changes nothing)")
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
