// Unit tests of the panel's pure display logic. Run: node --test web/tests/
import { test } from "node:test";
import assert from "node:assert/strict";

import {
  chartModel,
  chartSeries,
  errorLine,
  etaSeconds,
  formatBytes,
  formatDuration,
  formatPercent,
  formatRate,
  formatRatio,
  formatSci,
  nextPanelState,
  panelLines,
  panelSections,
  progressFraction,
  progressLines,
  progressView,
  reportHeadline,
  reportLines,
  reportLinesWithTips,
  reportView,
  shortenKey,
  toNumber,
} from "../js/fp16lr_format.js";

// A tensor event and a compact report as quant_core emits them (docs/ARCHITECTURE.md, events).
const tensorEvent = {
  type: "tensor",
  key: "model.diffusion_model.double_blocks.12.img_attn.qkv.weight",
  index: 117,
  total: 780,
  shape: [9216, 3072],
  dtype: "bfloat16",
  action: "quantized",
  scale: 0.5,
  bytes_done: 3_500_000_000,
  bytes_total: 23_800_000_000,
  elapsed_s: 41.2,
  eta_s: 239.0,
  rate_bytes_s: 85_300_000,
  metrics: { rel_error: 0.000211, rtn_rel_error: 0.000256, error_ratio: 0.8242, bit_exact_fraction: 0.97 },
};

const report = {
  format: "scaled_fp16",
  source: "flux1-dev.safetensors",
  output: "flux1-dev_float16_scaled_learned_svd.safetensors",
  output_name: "flux1-dev_float16_scaled_learned_svd.safetensors",
  counts: { quantized: 304, kept: 472, removed: 4 },
  bytes_in: 23_802_000_000,
  bytes_out: 23_790_000_000,
  rel_error: 0.0002102,
  rtn_rel_error: 0.0002554,
  error_ratio: 0.823,
  changed_vs_rtn: 0.012,
  bit_exact_fraction_bf16: 0.97125,
  worst: [
    { key: "model.diffusion_model.single_blocks.37.linear2.weight", rel_error: 3.1e-4, rtn_rel_error: 3.3e-4, error_ratio: 0.94 },
    { key: "img_in.weight", rel_error: 2.9e-4, rtn_rel_error: 2.9e-4, error_ratio: 1.0 },
    { key: "txt_in.weight", rel_error: 2.8e-4, rtn_rel_error: 3.0e-4, error_ratio: 0.93 },
    { key: "final_layer.linear.weight", rel_error: 2.7e-4, rtn_rel_error: 2.8e-4, error_ratio: 0.96 },
  ],
  seconds: 312.4,
  ratios: [0.8, 0.82, 0.9, 1.0, 0.85],
};

test("formatBytes uses decimal units with three significant digits", () => {
  assert.equal(formatBytes(0), "0 B");
  assert.equal(formatBytes(999), "999 B");
  assert.equal(formatBytes(1000), "1.00 kB");
  assert.equal(formatBytes(1_234_567), "1.23 MB");
  assert.equal(formatBytes(23_802_000_000), "23.8 GB");
  assert.equal(formatBytes(512_000_000), "512 MB");
  assert.equal(formatBytes(999_600), "1.00 MB"); // rounds up into the next unit, never "1000 kB"
  assert.equal(formatBytes(null), "–");
  assert.equal(formatBytes(-1), "–");
});

test("formatRate, formatPercent, formatRatio, formatSci", () => {
  assert.equal(formatRate(85_300_000), "85.3 MB/s");
  assert.equal(formatRate(0), "–");
  assert.equal(formatRate(null), "–");
  assert.equal(formatPercent(0.15), "15.0 %");
  assert.equal(formatPercent(0.97125, 2), "97.13 %");
  assert.equal(formatRatio(0.8242), "0.824×");
  assert.equal(formatRatio(Infinity), "∞×");
  assert.equal(formatRatio("Infinity"), "∞×");
  assert.equal(formatRatio(null), "–");
  assert.equal(formatSci(0.000211), "2.11e-04");
  assert.equal(formatSci(0), "0");
  assert.equal(formatSci(12345, 1), "1.2e+04");
  assert.equal(formatSci(undefined), "–");
});

test("toNumber reads what JSON may carry", () => {
  assert.equal(toNumber(3), 3);
  assert.equal(toNumber("Infinity"), Infinity);
  assert.ok(Number.isNaN(toNumber("NaN")));
  assert.equal(toNumber("abc"), null);
  assert.equal(toNumber(null), null);
});

test("formatDuration", () => {
  assert.equal(formatDuration(0.3), "<1 s");
  assert.equal(formatDuration(45.4), "45 s");
  assert.equal(formatDuration(59.6), "1 min 00 s");
  assert.equal(formatDuration(125), "2 min 05 s");
  assert.equal(formatDuration(3725), "1 h 02 min");
  assert.equal(formatDuration(null), "–");
  assert.equal(formatDuration(NaN), "–");
});

test("ETA: the converter's eta_s wins; otherwise linear in bytes; unknown before the first byte", () => {
  assert.equal(etaSeconds(tensorEvent), 239.0);
  const e = { ...tensorEvent, eta_s: null, bytes_done: 250, bytes_total: 1000, elapsed_s: 10 };
  assert.equal(etaSeconds(e), 30);
  assert.equal(etaSeconds({ ...e, bytes_done: 0 }), null);
  assert.equal(etaSeconds({ ...e, bytes_done: 1000 }), 0);
  assert.equal(etaSeconds(null), null);
});

test("progressFraction is by bytes, clamped, and falls back to the tensor count", () => {
  assert.equal(progressFraction({ bytes_done: 50, bytes_total: 200 }), 0.25);
  assert.equal(progressFraction({ bytes_done: 300, bytes_total: 200 }), 1);
  assert.equal(progressFraction({ bytes_done: 0, bytes_total: 0, index: 3, total: 4 }), 0.75);
  assert.equal(progressFraction({}), 0);
});

test("shortenKey keeps the parameter name and the indexed parts", () => {
  assert.equal(shortenKey("img_in.weight"), "img_in.weight");
  assert.equal(shortenKey(tensorEvent.key, 40), "…double_blocks.12.img_attn.qkv.weight");
  assert.equal(shortenKey("encoder.block.23.layer.1.DenseReluDense.wi_1.weight", 40), "encoder.block.23.layer.1.…wi_1.weight");
  assert.equal(shortenKey("encoder.block.23.layer.1.DenseReluDense.wi_1.weight", 30), "…block.23.layer.1.…wi_1.weight");
  assert.equal(shortenKey("a.b.c.d.e.f.g.h.i.j.k.l.m.n.o.p.q.r.s.t.u.v.w", 12), "…r.s.t.u.v.w");
  // the last part alone is too long: cut in the middle
  const long = "x".repeat(30) + "." + "y".repeat(60);
  const s = shortenKey(long, 20);
  assert.equal(s.length, 20);
  assert.ok(s.includes("…") && s.startsWith("x") && s.endsWith("y"));
  for (const n of [8, 12, 20, 30, 44]) {
    assert.ok(shortenKey(tensorEvent.key, n).length <= n, `length limit ${n}`);
    assert.ok(shortenKey("encoder.block.23.layer.1.DenseReluDense.wi_1.weight", n).length <= n);
  }
  assert.equal(shortenKey(undefined), "");
});

test("progressView: counter, percent by bytes, rate, ETA and the last tensor against RTN", () => {
  const v = progressView(tensorEvent, { keyLength: 40 });
  assert.equal(v.counter, "117/780");
  assert.equal(v.percent, "14.7 %");
  assert.equal(v.rate, "85.3 MB/s");
  assert.equal(v.eta, "3 min 59 s");
  assert.equal(v.bytes, "3.50 GB / 23.8 GB");
  assert.equal(v.key, "…double_blocks.12.img_attn.qkv.weight");
  assert.equal(v.keyFull, tensorEvent.key);
  assert.equal(v.last, "quantized · relF 2.11e-04 · 0.824× RTN");
  assert.equal(progressView({ ...tensorEvent, action: "kept", metrics: {} }).last, "kept (bfloat16)");
  assert.equal(progressView({ ...tensorEvent, action: "removed", metrics: {} }).last, "removed");
  const lines = progressLines(tensorEvent);
  assert.equal(lines.length, 4);
  assert.equal(lines[0], "Converting 117/780 · 14.7 %");
  // the text changes from one tensor to the next
  assert.notDeepEqual(progressLines({ ...tensorEvent, index: 118, key: "x.weight", bytes_done: 3_600_000_000 }), lines);
});

test("reportView: headline, counts, size, total and per-tensor error vs RTN, bit-exact share, worst tensors", () => {
  const v = reportView(report);
  assert.deepEqual(v.lines, [
    "Done in 5 min 12 s",
    "→ flux1-dev_float16_scaled_learned_svd.safetensors",
    "stored as fp16 with per-tensor power-of-two scales; error vs plain fp16 cast: 17.7 % lower",
    "tensors: 304 quantized · 472 kept · 4 removed",
    "size: 23.8 GB → 23.8 GB",
    "relF 2.10e-04 vs RTN 2.55e-04 (0.823×)",
    "per tensor: worst 3.10e-04",
    "bit-exact (BF16 source): 97.13 %",
  ]);
  // every line has its explanation (tooltip)
  assert.equal(v.tips.length, v.lines.length);
  assert.ok(v.tips.every((t) => t.length > 20));
  assert.equal(v.worst.length, 3);
  assert.equal(v.worst[0].text, "3.10e-04 (0.940×)");
  // keys whole: the panel wraps them
  assert.equal(v.worst[0].key, report.worst[0].key);
  // FP32 sources have no bit-exact share
  const fp32 = reportView({ ...report, bit_exact_fraction_bf16: null });
  assert.ok(!fp32.lines.some((l) => l.startsWith("bit-exact")));
  const lines = reportLines(report);
  assert.equal(lines[8], "worst tensors (relF, × RTN):");
  assert.equal(lines[9], "  model.diffusion_model.single_blocks.37.linear2.weight 3.10e-04 (0.940×)");
  assert.equal(lines.length, 12);
  // the converter's own headline and per-tensor figures, when the report has them
  const fuller = reportView({ ...report, headline: "stored as fp16 ...: same", rel_error_per_tensor: {
    median: 1.7e-8, worst: 3.1e-4, worst_key: "img_in.weight" } }).lines;
  assert.equal(fuller[2], "stored as fp16 ...: same");
  assert.equal(fuller[6], "per tensor: median 1.70e-08 · worst 3.10e-04");
  assert.equal(reportView({ ...report, error_ratio: 1.0002 }).lines[2].split(": ").at(-1), "same");
  // what the learned step did: both figures side by side, explained in the next line
  const learned = reportView({ ...report, bit_exact_fraction_bf16: null, settings: { top_k: 3, num_iter: 256 },
    learned: { topk_tensors: 12, topk_ratio_mean: 0.0548, calibrated_tensors: 36, output_error_ratio_mean: 0.8246,
      output_error_ratio_bias_corrected_mean: 0.6529 } }).lines;
  assert.deepEqual(learned.slice(7), ["learned rounding on 12 tensors:",
    "  top-3 error 0.055× RTN · relF 0.823× RTN",
    "  the error along each weight's 3 strongest directions drops; the total stays at RTN's by design",
    "calibrated: output 0.825× RTN, 0.653× with bias (36 tensors)"]);
  // passes used, the check of the top-k figure and the spectral gap (fields of newer converters)
  const checked = reportView({ ...report, bit_exact_fraction_bf16: null, settings: { top_k: 1, num_iter: 256 },
    learned: { topk_tensors: 5, topk_ratio_mean: 0.000213, passes_used_max: 3, topk_check: "exact_svd",
      spectral_gap: 1.42 } }).lines;
  assert.deepEqual(checked.slice(7), ["learned rounding on 5 tensors (passes used ≤ 3 of num_iter 256):",
    "  top-1 error 2.1e-4× RTN (exact svd) · relF 0.823× RTN",
    "  the error along each weight's strongest direction drops; the total stays at RTN's by design (spectral gap 1.42)"]);
  const withheld = reportView({ ...report, bit_exact_fraction_bf16: null, learned: { topk_tensors: 5,
    topk_ratio_mean: 0.5, topk_check: "withheld: no spectral gap (σ1/σ2 1.004)" } }).lines;
  assert.equal(withheld[8], "  top-1 error: withheld: no spectral gap (σ1/σ2 1.004) · relF 0.823× RTN");
  // out(randn) on the calib_samples synthetic rows, where the learned step changed tensors
  const randn = reportView({ ...report, bit_exact_fraction_bf16: null, learned: { topk_tensors: 5,
    topk_ratio_mean: 0.0548, out_randn_tensors: 5, out_randn_ratio_mean: 1.000123, out_randn_samples: 3072,
    out_randn_skipped: 0 } }).lines;
  assert.equal(randn.at(-1), "out(randn): 1.0001× RTN (3072 rows, 5 tensors)");
  const noRandn = reportView({ ...report, learned: { topk_tensors: 5, topk_ratio_mean: 0.0548, out_randn_tensors: 0,
    out_randn_ratio_mean: null } }).lines;
  assert.equal(noRandn.length, 11);
  const none = reportView({ ...report, learned: { topk_tensors: 0, calibrated_tensors: 0 } }).lines;
  assert.equal(none.length, 8);
  // a long output name is shown whole (the panel wraps it)
  const long = reportView({ ...report, output_name: "x".repeat(80) + ".safetensors" }).lines[1];
  assert.equal(long, `→ ${"x".repeat(80)}.safetensors`);
});

test("reportView: an up-to-date file, and a save node's size in memory", () => {
  const again = reportView({ ...report, up_to_date: true }).lines;
  assert.equal(again[0], "Up to date: reused, nothing converted");
  assert.equal(reportHeadline({ ...report, up_to_date: true }),
    "flux1-dev_float16_scaled_learned_svd.safetensors: relF 2.10e-04 (0.823× RTN), up to date");
  const saved = reportView({ ...report, bytes_in: 2_180_000_000, bytes_out: 1_090_000_000,
    source_in_memory: ["F32"] }).lines;
  assert.equal(saved[4], "size: 2.18 GB in memory (float32) → 1.09 GB");
  assert.equal(reportView({ ...report, source_in_memory: ["BF16", "F32"] }).lines[4],
    "size: 23.8 GB in memory (bfloat16 + float32) → 23.8 GB");
});

test("errorLine says where the run stopped and that nothing was written", () => {
  assert.equal(errorLine({ cancelled: true, index: 117, total: 780, message: "Interrupted" }), "Cancelled at tensor 117/780, no file written.");
  assert.equal(errorLine({ cancelled: true, index: null, total: null }, tensorEvent), "Cancelled at tensor 117/780, no file written.");
  assert.equal(errorLine({ cancelled: true, index: null, total: 780 }), "Cancelled before the first tensor, no file written.");
  assert.equal(
    errorLine({ cancelled: false, index: 3, total: 10, message: "out of memory\ntraceback..." }),
    "Failed at tensor 3/10: out of memory; no file written.",
  );
  assert.equal(errorLine({ cancelled: false, message: "bad header" }), "Failed: bad header; no file written.");
});

test("panel state: start, prepare, progress, report, error, and a new run replacing an old report", () => {
  let s = nextPanelState(null, { kind: "start", payload: { prompt_id: "p1" } });
  assert.deepEqual(panelLines(s), ["Starting…"]);
  // ComfyUI's bar at 0 (the converter's start) says nothing new
  assert.deepEqual(panelLines(nextPanelState(s, { kind: "prepare", payload: { value: 0, max: 40 } })), ["Starting…"]);
  s = nextPanelState(s, { kind: "prepare", payload: { value: 10, max: 40 } });
  assert.deepEqual(panelLines(s), ["Working 10/40 tensors · 25.0 %"]);
  s = nextPanelState(s, { kind: "progress", payload: { node: "5", prompt_id: "p1", event: tensorEvent } });
  assert.equal(s.phase, "running");
  assert.equal(panelLines(s)[0], "Converting 117/780 · 14.7 %");
  // ComfyUI's own progress does not overwrite the tensor view
  assert.equal(nextPanelState(s, { kind: "prepare", payload: { value: 1, max: 2 } }), s);
  s = nextPanelState(s, { kind: "report", payload: { node: "5", prompt_id: "p1", report } });
  assert.equal(s.phase, "done");
  assert.equal(panelLines(s)[3], "tensors: 304 quantized · 472 kept · 4 removed");
  assert.equal(panelSections(s)[0].report, report);
  assert.equal(panelSections(s)[0].tips.length, panelLines(s).length);
  assert.equal(panelLines(s)[panelSections(s)[0].chartAt], "worst tensors (relF, × RTN):");
  s = nextPanelState(s, { kind: "progress", payload: { node: "5", prompt_id: "p2", event: { ...tensorEvent, index: 1 } } });
  assert.equal(s.phase, "running");
  assert.deepEqual(s.reports, []);
  s = nextPanelState(s, { kind: "error", payload: { node: "5", cancelled: true, index: null, total: null } });
  assert.equal(s.phase, "error");
  assert.equal(panelLines(s)[0], "Cancelled at tensor 1/780, no file written.");
  assert.deepEqual(panelLines(nextPanelState(s, { kind: "reset" })), []);
  assert.equal(nextPanelState(s, { kind: "unknown" }), s);
});

test("panel state: a CLIP with two encoders keeps the first part's report while the second converts", () => {
  const first = { ...report, output_name: "te_clip_l.safetensors" };
  const second = { ...report, output_name: "te_t5xxl.safetensors", error_ratio: 0.9 };
  let s = nextPanelState(null, { kind: "start", payload: { prompt_id: "p1" } });
  s = nextPanelState(s, { kind: "progress", payload: { prompt_id: "p1", event: tensorEvent } });
  s = nextPanelState(s, { kind: "report", payload: { prompt_id: "p1", report: first } });
  s = nextPanelState(s, { kind: "progress", payload: { prompt_id: "p1", event: tensorEvent } });
  assert.equal(s.phase, "running");
  assert.equal(panelLines(s).at(-1), "saved te_clip_l.safetensors: relF 2.10e-04 (0.823× RTN)");
  s = nextPanelState(s, { kind: "report", payload: { prompt_id: "p1", report: second } });
  assert.deepEqual(s.reports.map((r) => r.output_name), ["te_clip_l.safetensors", "te_t5xxl.safetensors"]);
  assert.equal(panelSections(s).length, 2);
  assert.equal(reportHeadline(second), "te_t5xxl.safetensors: relF 2.10e-04 (0.900× RTN)");
  // the ui output (also what a reload restores) is authoritative; an empty one changes nothing
  const restored = nextPanelState(null, { kind: "outputs", payload: { reports: [second] } });
  assert.equal(restored.phase, "done");
  assert.equal(restored.reports[0], second);
  assert.equal(nextPanelState(s, { kind: "outputs", payload: { reports: [] } }), s);
});

test("chart: y range includes RTN (1.0), columns in file order, outliers clamped", () => {
  const m = chartModel([0.8, 0.9, 1.0, 1.1], { width: 134, height: 84, padLeft: 30, padRight: 4, padTop: 2, padBottom: 2 });
  assert.equal(m.n, 4);
  assert.equal(m.better, 2);
  assert.ok(m.yLow <= 0.8 && m.yHigh >= 1.1);
  assert.ok(m.refY > 2 && m.refY < 82);
  assert.equal(m.columns.length, 4);
  const xs = m.columns.map((c) => c.x);
  assert.deepEqual(xs, [...xs].sort((a, b) => a - b));
  assert.ok(m.columns[0].yTop > m.columns[3].yTop, "a smaller ratio is drawn lower");
  // everything between the paddings
  for (const c of m.columns) {
    assert.ok(c.x >= 30 && c.x <= 130);
    assert.ok(c.yTop >= 2 && c.yBottom <= 82 && c.yTop <= c.yBottom);
  }
  assert.deepEqual(m.ticks.map((t) => t.value), [m.yLow, 1, m.yHigh]);
  // one huge outlier does not flatten the rest: it is clamped to the top and flagged
  const ratios = Array.from({ length: 200 }, (_, i) => 0.8 + (i % 10) / 100);
  ratios[50] = 40;
  ratios[60] = "Infinity";
  const o = chartModel(ratios, { width: 300, height: 80 });
  assert.ok(o.yHigh < 2, `yHigh ${o.yHigh}`);
  assert.ok(o.columns.some((c) => c.clipped));
  assert.equal(o.finite, 199);
});

test("chart: more tensors than pixels are binned into min..max columns", () => {
  const ratios = Array.from({ length: 5000 }, (_, i) => (i % 2 ? 0.7 : 0.95));
  const m = chartModel(ratios, { width: 200, height: 60, padLeft: 30, padRight: 0 });
  assert.equal(m.columns.length, 170);
  for (const c of m.columns) assert.ok(c.yBottom - c.yTop > 5, "each column spans both values");
});

test("chart: a range end next to RTN's 1.00 is not labelled over it", () => {
  const m = chartModel([0.0005, 0.0002, 0.001], { width: 300, height: 60, padTop: 5, padBottom: 12 });
  assert.equal(m.yLow, 0);
  assert.deepEqual(m.ticks.map((t) => t.label), ["0.00", "1.00"]);  // 1.05 would sit 2 px above 1.00
  assert.ok(m.ticks.every((t, i) => i === 0 || Math.abs(t.y - m.ticks[i - 1].y) >= 9));
});

test("chart series: the top-k ratio where the learned step worked, else the relF ratio", () => {
  const base = { ratios: [1, 1, 1], topk_ratios: [0.05, null, 0.2], settings: { top_k: 2 } };
  assert.deepEqual(chartSeries({ ...base, learned: { topk_tensors: 2 } }),
    { ratios: [0.05, null, 0.2], label: "top-2 error ÷ RTN per tensor" });
  // BF16 (nothing learned), old reports without the field, or no finite top-k value: the relF ratio
  assert.deepEqual(chartSeries({ ...base, learned: { topk_tensors: 0 } }), { ratios: [1, 1, 1], label: "error ÷ RTN per tensor" });
  assert.deepEqual(chartSeries({ ratios: [0.9] }), { ratios: [0.9], label: "error ÷ RTN per tensor" });
  assert.deepEqual(chartSeries({ ...base, topk_ratios: [null, null, null], learned: { topk_tensors: 2 } }).label,
    "error ÷ RTN per tensor");
  assert.deepEqual(chartSeries(null), { ratios: [], label: "error ÷ RTN per tensor" });
});

test("chart: empty or all-missing ratios give an empty chart with the RTN line in the middle", () => {
  const m = chartModel([], { width: 100, height: 50, padTop: 0, padBottom: 0 });
  assert.equal(m.columns.length, 0);
  assert.equal(m.refY, 25);
  const n = chartModel([null, "NaN"], { width: 100, height: 50 });
  assert.equal(n.columns.length, 0);
  assert.equal(n.finite, 0);
  const one = chartModel([1, 1, 1], { width: 100, height: 50 });
  assert.ok(one.yHigh - one.yLow >= 0.1);
});

// --- capture nodes -------------------------------------------------------------------------------------------------

const captureEvent = {
  type: "capture", unit: "prompt", index: 3, total: 12, held_out: false, layers: 144, what: "clip_l, t5xxl",
  elapsed_s: 6, tokens: [{ name: "clip_l", tokens: 231, held_out: 0 }, { name: "t5xxl", tokens: 1204, held_out: 0 }],
};
const captureSummary = {
  kind: "capture", output_name: "cal_t5xxl.safetensors", seconds: 42, bytes: 123456789, layers: 96, groups: 72,
  exact_groups: 24, rows_kept_min: 512, rows_kept_max: 768, rows: 512, rows_requested: 3072, budget_bytes: 5e7,
  tokens_fit: 10240, tokens_check: 10112, tokens_held_out: 800,
  notes: ["calibration statistics keep 512 rows per layer (asked 3072): 72 groups of input widths up to 10240 within the 0.05 GB budget"],
  source: { encoder: "t5xxl", prompts: 24, held_out_prompts: 2 },
};

test("capture progress: prompt or step i of n, tokens per encoder, layers, elapsed and ETA", () => {
  assert.deepEqual(progressLines(captureEvent), [
    "Capturing prompt 3/12 · 25.0 %",
    "tokens recorded: clip_l 231 · t5xxl 1,204",
    "recording 144 Linear layers of clip_l, t5xxl",
    "elapsed 6 s · ETA 18 s",
  ]);
  const held = { ...captureEvent, index: 11, held_out: true,
    tokens: [{ name: "t5xxl", tokens: 4000, held_out: 35 }] };
  assert.equal(progressLines(held)[0], "Capturing held-out prompt 11/12 · 91.7 %");
  assert.equal(progressLines(held)[1], "tokens recorded: 4,000 (held-out: 35)");
  const step = { type: "capture", unit: "step", index: 5, total: 20, layers: 3, what: "model", elapsed_s: 10,
    tokens: [{ name: "model", tokens: 8192, held_out: 0 }] };
  assert.deepEqual(progressLines(step), ["Capturing step 5/20 · 25.0 %", "tokens recorded: 8,192",
    "recording 3 Linear layers of the model", "elapsed 10 s · ETA 30 s"]);
  assert.equal(progressFraction(step), 0.25);
});

test("capture summary: file, source, layers, rows kept and whether exact, tokens, size and budget, notes", () => {
  const { lines, tips } = reportLinesWithTips(captureSummary);
  assert.deepEqual(lines, [
    "Captured in 42 s",
    "→ cal_t5xxl.safetensors",
    "from 24 prompts + 2 held-out · t5xxl encoder",
    "layers: 96 recorded, 72 input groups",
    "rows kept per layer: 512–768 (asked 3,072) · exact in 24/72 groups",
    "tokens: 10,240 fit · 10,112 check · 800 held-out",
    "file: 123 MB (budget 50.0 MB)",
    `note: ${captureSummary.notes[0]}`,
  ]);
  assert.equal(tips.length, lines.length);
  assert.ok(tips.every((t) => t.length > 20));
  const sampling = { ...captureSummary, output_name: "samp.safetensors", rows: 3072, rows_kept_min: 3072,
    rows_kept_max: 3072, exact_groups: 72, notes: [], tokens_held_out: 0,
    source: { steps: 20, sampler: "euler", scheduler: "simple", model_calls: 40, layers_total: 500 } };
  const l2 = reportLinesWithTips(sampling).lines;
  assert.equal(l2[2], "from a 20-step sampling run (euler, simple; 40 model calls)");
  assert.equal(l2[3], "layers: 96 of 500 Linear layers recorded, 72 input groups");
  assert.equal(l2[4], "rows kept per layer: 3,072 · exact in 72/72 groups");
  assert.equal(l2.length, 7);
});

test("capture panel state: start in prompts, progress, the summaries of two files, a cancel at a prompt", () => {
  let s = nextPanelState(null, { kind: "start", payload: { prompt_id: "p1", unit: "prompts" } });
  s = nextPanelState(s, { kind: "prepare", payload: { value: 2, max: 12 } });
  assert.deepEqual(panelLines(s), ["Working 2/12 prompts · 16.7 %"]);
  s = nextPanelState(s, { kind: "progress", payload: { prompt_id: "p1", event: captureEvent } });
  const running = panelSections(s);
  assert.equal(running[0].keyAt, null); // no tensor key line to shorten
  assert.equal(running[0].lines[0], "Capturing prompt 3/12 · 25.0 %");
  const clip = { ...captureSummary, output_name: "cal_clip_l.safetensors" };
  s = nextPanelState(s, { kind: "report", payload: { prompt_id: "p1", report: clip } });
  s = nextPanelState(s, { kind: "report", payload: { prompt_id: "p1", report: captureSummary } });
  const done = panelSections(s);
  assert.equal(done.length, 2);
  assert.equal(done[0].lines[1], "→ cal_clip_l.safetensors");
  assert.equal(done[1].lines[1], "→ cal_t5xxl.safetensors");
  assert.ok(done.every((d) => !d.report)); // no error-ratio chart for statistics
  let c = nextPanelState(null, { kind: "start", payload: { prompt_id: "p2", unit: "prompts" } });
  c = nextPanelState(c, { kind: "progress", payload: { prompt_id: "p2", event: captureEvent } });
  c = nextPanelState(c, { kind: "error", payload: { cancelled: true, index: 3, total: 12, unit: "prompt" } });
  assert.deepEqual(panelLines(c), ["Cancelled at prompt 3/12, no file written."]);
  c = nextPanelState(c, { kind: "error", payload: { cancelled: false, message: "calibration statistics: a budget of 0.05 GB cannot hold 8 rows" } });
  assert.equal(panelLines(c)[0], "Failed at prompt 3/12: calibration statistics: a budget of 0.05 GB cannot hold 8 rows; no file written.");
});
