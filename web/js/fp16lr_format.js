// Pure display logic for the scaled-FP16 progress panel: number formatting, ETA, key shortening, the panel's
// state transitions and the chart's scaling. No DOM and no ComfyUI imports, so `node --test web/tests/` covers it.
//
// Every *.js under web/ is also loaded by ComfyUI as an extension; this module only exports, so loading it there
// has no effect.

const DASH = "–";

const isNum = (x) => typeof x === "number" && Number.isFinite(x);

/** Reads a number that JSON may have carried as null or as a string ("Infinity", "NaN"). */
export function toNumber(x) {
  if (typeof x === "number") return x;
  if (typeof x === "string" && x.trim() !== "") {
    const v = Number(x);
    return Number.isNaN(v) && x.trim() !== "NaN" ? null : v;
  }
  return null;
}

/** Bytes with decimal units (1 MB = 1e6 bytes, as the command-line summary prints), three significant digits. */
export function formatBytes(n) {
  n = toNumber(n);
  if (!isNum(n) || n < 0) return DASH;
  if (n < 1000) return `${Math.round(n)} B`;
  const units = ["kB", "MB", "GB", "TB", "PB"];
  let v = n;
  let u = -1;
  while (v >= 999.5 && u < units.length - 1) {
    v /= 1000;
    u += 1;
  }
  const digits = v >= 99.95 ? 0 : v >= 9.995 ? 1 : 2;
  return `${v.toFixed(digits)} ${units[u]}`;
}

/** Throughput in bytes per second. */
export function formatRate(bytesPerSecond) {
  const v = toNumber(bytesPerSecond);
  return isNum(v) && v > 0 ? `${formatBytes(v)}/s` : DASH;
}

/** A duration in seconds as "45 s", "2 min 05 s", "1 h 02 min". */
export function formatDuration(seconds) {
  const s = toNumber(seconds);
  if (!isNum(s) || s < 0) return DASH;
  if (s < 1) return "<1 s";
  const total = Math.round(s);
  if (total < 60) return `${total} s`;
  if (total < 3600) {
    const m = Math.floor(total / 60);
    return `${m} min ${String(total % 60).padStart(2, "0")} s`;
  }
  const totalMin = Math.round(s / 60);
  return `${Math.floor(totalMin / 60)} h ${String(totalMin % 60).padStart(2, "0")} min`;
}

/** A fraction in [0, 1] as a percentage. */
export function formatPercent(fraction, digits = 1) {
  const f = toNumber(fraction);
  return isNum(f) ? `${(f * 100).toFixed(digits)} %` : DASH;
}

/** A relative error such as 2.1e-4, in the command line's notation (mantissa with `digits` decimals). */
export function formatSci(x, digits = 2) {
  const v = toNumber(x);
  if (v === 0) return "0";
  if (!isNum(v)) return v === Infinity ? "inf" : DASH;
  const [mant, exp] = v.toExponential(digits).split("e");
  const e = Number(exp);
  return `${mant}e${e < 0 ? "-" : "+"}${String(Math.abs(e)).padStart(2, "0")}`;
}

/** An error ratio against round-to-nearest: below 1 means better than RTN. */
export function formatRatio(r, digits = 3) {
  const v = toNumber(r);
  if (v === Infinity) return "∞×";
  return isNum(v) ? `${v.toFixed(digits)}×` : DASH;
}

/** A ratio that may be far below 1 (the learned top-k error): three decimals, or two significant digits below 0.01. */
export function formatSmallRatio(r) {
  const v = toNumber(r);
  return isNum(v) && v > 0 && v < 0.01 ? `${v.toExponential(1)}×` : formatRatio(v);
}

/**
 * Seconds left. The event's own `eta_s` (linear in bytes, from the converter) wins; before it is known the estimate
 * comes from the bytes done so far and the elapsed time. Null when nothing can be said yet.
 */
export function etaSeconds(event) {
  if (!event) return null;
  const given = toNumber(event.eta_s);
  if (isNum(given) && given >= 0) return given;
  const done = toNumber(event.bytes_done);
  const total = toNumber(event.bytes_total);
  const elapsed = toNumber(event.elapsed_s);
  if (!isNum(done) || !isNum(total) || !isNum(elapsed) || done <= 0 || elapsed <= 0) return null;
  return Math.max(0, total - done) * (elapsed / done);
}

/** Fraction of the bytes done, in [0, 1]; falls back to the tensor count when the byte total is 0 or missing. */
export function progressFraction(event) {
  if (!event) return 0;
  const done = toNumber(event.bytes_done);
  const total = toNumber(event.bytes_total);
  let f;
  if (isNum(done) && isNum(total) && total > 0) f = done / total;
  else f = toNumber(event.index) / toNumber(event.total);
  return isNum(f) ? Math.min(1, Math.max(0, f)) : 0;
}

// Key shortening. A checkpoint key is a dotted path; "block.23" style pairs (a name and its index) are kept
// together, because "23" alone says nothing.
function keyUnits(key) {
  const parts = key.split(".");
  const units = [];
  for (const p of parts) {
    if (/^\d+$/.test(p) && units.length > 0 && !/^\d+$/.test(units[units.length - 1].split(".").pop())) {
      units[units.length - 1] += `.${p}`;
    } else {
      units.push(p);
    }
  }
  return units;
}

function renderUnits(units, kept) {
  const out = [];
  let gap = false;
  for (let i = 0; i < units.length; i++) {
    if (!kept.has(i)) {
      gap = true;
      continue;
    }
    out.push(gap ? `…${units[i]}` : units[i]);
    gap = false;
  }
  return out.join(".");
}

function cutMiddle(text, maxLength) {
  if (text.length <= maxLength) return text;
  if (maxLength <= 1) return "…".slice(0, maxLength);
  const tail = Math.ceil((maxLength - 1) / 2);
  const head = maxLength - 1 - tail;
  return `${text.slice(0, head)}…${text.slice(text.length - tail)}`;
}

/**
 * A tensor key shortened to at most `maxLength` characters for a narrow panel. The last part (the parameter name)
 * is always kept, then the indexed parts that locate the tensor ("double_blocks.12", "layer.1"), then the nearest
 * parts to the name, then the leading ones; left-out parts become "…". Wrapper prefixes such as
 * "model.diffusion_model." go first.
 */
export function shortenKey(key, maxLength = 44) {
  if (typeof key !== "string") return "";
  if (key.length <= maxLength) return key;
  const units = keyUnits(key);
  const last = units.length - 1;
  if (units[last].length + (last > 0 ? 1 : 0) >= maxLength) return cutMiddle(key, maxLength);
  const order = [last];
  units.forEach((u, i) => {
    if (i !== last && /\.\d+$/.test(u)) order.push(i);
  });
  for (let i = last - 1; i >= 0; i--) {
    if (!order.includes(i) && !["model", "diffusion_model"].includes(units[i])) order.push(i);
  }
  for (let i = 0; i < last; i++) if (!order.includes(i)) order.push(i);
  const kept = new Set();
  for (const i of order) {
    kept.add(i);
    if (renderUnits(units, kept).length > maxLength) kept.delete(i);
  }
  return renderUnits(units, kept);
}

/** The lines of the live panel for one tensor event (see docs/ARCHITECTURE.md, events). */
export function progressView(event, { keyLength = 44 } = {}) {
  const fraction = progressFraction(event);
  const index = toNumber(event.index);
  const total = toNumber(event.total);
  const m = event.metrics || {};
  let last;
  if (event.action === "quantized") {
    last = `quantized · relF ${formatSci(m.rel_error)} · ${formatRatio(m.error_ratio)} RTN`;
  } else if (event.action === "kept") {
    last = m.bias_change !== undefined || m.bias_corrected ? "kept (bias corrected)" : `kept (${event.dtype || "as is"})`;
  } else {
    last = event.action || DASH;
  }
  return {
    fraction,
    counter: `${isNum(index) ? index : "?"}/${isNum(total) ? total : "?"}`,
    percent: formatPercent(fraction),
    key: shortenKey(event.key || "", keyLength),
    keyFull: event.key || "",
    rate: formatRate(event.rate_bytes_s),
    eta: formatDuration(etaSeconds(event)),
    bytes: `${formatBytes(event.bytes_done)} / ${formatBytes(event.bytes_total)}`,
    last,
  };
}

/** A count with thousands separators ("12,345"). */
export function formatCount(n) {
  const v = toNumber(n);
  return isNum(v) ? Math.round(v).toLocaleString("en-US") : DASH;
}

/** The parts' calibration tokens, e.g. "1,204" or "clip_l 770 · t5xxl 40", and their held-out tokens. */
function tokenParts(parts, field) {
  const list = Array.isArray(parts) ? parts : [];
  if (list.length <= 1) return formatCount(list[0]?.[field] ?? 0);
  return list.map((p) => `${p.name} ${formatCount(p[field])}`).join(" · ");
}

/** Lines of the live panel of a capture node (a `capture` event: prompt or sampling step i of n). */
export function captureProgressLines(event) {
  const index = toNumber(event.index);
  const total = toNumber(event.total);
  const unit = event.unit || "step";
  const elapsed = toNumber(event.elapsed_s);
  const eta = isNum(elapsed) && isNum(index) && isNum(total) && index > 0 ? elapsed * Math.max(0, total - index) / index : null;
  const parts = Array.isArray(event.tokens) ? event.tokens : [];
  const held = parts.some((p) => toNumber(p.held_out) > 0);
  const what = event.what === "model" || !event.what ? "the model" : event.what;
  return [
    `Capturing ${event.held_out ? "held-out " : ""}${unit} ${isNum(index) ? index : "?"}/${isNum(total) ? total : "?"} · ${formatPercent(progressFraction(event))}`,
    `tokens recorded: ${tokenParts(parts, "tokens")}${held ? ` (held-out: ${tokenParts(parts, "held_out")})` : ""}`,
    `recording ${formatCount(event.layers)} Linear layers of ${what}`,
    `elapsed ${formatDuration(elapsed)} · ETA ${formatDuration(eta)}`,
  ];
}

/** Text lines of the live panel (what the Vue renderer fallback and tests read). */
export function progressLines(event, options) {
  if (event?.type === "capture") return captureProgressLines(event);
  const v = progressView(event, options);
  return [
    `Converting ${v.counter} · ${v.percent}`,
    v.key,
    `${v.rate} · ETA ${v.eta} · ${v.bytes}`,
    `last: ${v.last}`,
  ];
}

/** Explanations of the panel's terms, shown as tooltips on the lines that use them. */
export const TERMS = Object.freeze({
  status: "Done: converted in this run. Up to date: the file already existed, made from this source file (same size " +
    "and date) with the same settings, so it was reused and nothing was converted; the report is the one stored with it.",
  output: "The file written, in the models folder of its kind under ComfyUI's output directory (the loaders list it).",
  headline: "What the file is, in one line: fp16 weights, each tensor with a power-of-two scale_weight, and how its " +
    "error compares with a plain cast to fp16 (RTN).",
  counts: "quantized: weights stored as fp16 + scale; kept: copied as they were (norms, biases, small tensors, or " +
    "layers kept on purpose); removed: dropped (T5XXL mode: decoder, lm_head).",
  size: "Bytes in → bytes out. For Save Model / Save CLIP the size in is the graph's weights as ComfyUI holds them in " +
    "memory (their dtype, e.g. float32 on a --cpu server), not a file.",
  relF: "relF: relative Frobenius error ‖Q−W‖/‖W‖ of the stored weights against the source, over all quantized " +
    "tensors together. RTN: the same for a plain round-to-nearest cast to fp16 (what .half() does) at the same " +
    "scales; the ratio below 1 means closer to the source than that cast.",
  perTensor: "The same error per tensor. The total is weighted by size, so one huge tensor can dominate it; the " +
    "median and the worst tensor show the rest.",
  bitExact: "Share of the BF16 source's elements that the file gives back bit for bit (BF16 values inside fp16's " +
    "normal range are exact in fp16).",
  learned: "Learned rounding: for each weight not exact in fp16, every element picks the lower or upper fp16 " +
    "neighbour. In default mode it drives the error along the weight's top-k principal directions (its strongest " +
    "singular vectors) towards zero while the total error (relF) stays within about 0.5 % of RTN's: so the top-k " +
    "ratio falls far below 1 while the relF ratio stays near 1.000. Both are measured on the stored file.",
  passes: "Passes the learned rounding used per weight (num_iter caps them; any num_iter above this gives the same file).",
  topkCheck: "How the top-k figure was checked: exact_svd = against the weight's exact singular vectors (not the " +
    "basis the search used); withheld = no figure, because the weight has no usable spectral gap there, so its " +
    "top-k directions are not well defined.",
  calibrated: "Calibrated mode: output error ‖(Q−W)x‖ on the calibration file's real activations, divided by RTN's " +
    "(and with the corrected bias).",
  outRandn: "out(randn): the output error on calib_samples random input rows, divided by RTN's, for the weights the " +
    "learned rounding changed. Random rows carry no information about a layer: it follows the relF ratio. Report only.",
  worst: "The quantized tensors with the largest relF, with their ratio to RTN's error.",
  captured: "Done: the statistics of this run were written. A run that is cancelled or fails writes no file.",
  calibrationFile: "The calibration file, in models/scaled_fp16_calibration: the converting nodes list it under " +
    "calibration, and a link from this node's output to calibration_override selects it.",
  captureSource: "What was recorded: the prompts (held-out prompts only for the report), or the sampling run " +
    "(every model call of it).",
  captureLayers: "Linear layers whose inputs were recorded. Layers that read the same input tensor (q, k, v) share " +
    "one group of statistics. Capture from sampling leaves out layers with nothing to round (weights exact in fp16, " +
    "no patch).",
  captureRows: "Per group, the statistics keep at most calib_samples directions of the input's second moment (a " +
    "bfloat16 sketch of the top directions of every row seen); where that reaches the input width they are exact (the whole " +
    "Gram matrix; rows shown = the width). budget_gb may lower the rows (then a note says so).",
  captureTokens: "Input rows (tokens) recorded by the most-fed layer group: fit = the half the calibrated rounding " +
    "is fitted on (alternate prompts or model calls), check = the other half, on which each layer's gain is " +
    "checked; held-out = the held-out prompts, used only for the report.",
  captureSize: "Size of the file on disk. budget_gb bounds it, and the memory the statistics held while recording.",
  captureNote: "The statistics' writer kept fewer rows per layer than calib_samples asked, to stay within budget_gb.",
});

const DTYPE_NAMES = { F32: "float32", F16: "float16", BF16: "bfloat16", F64: "float64" };

/** The one-line verdict: the report's own `headline` when it has one, else one built from the error ratio. */
export function headlineOf(summary) {
  if (typeof summary.headline === "string" && summary.headline.trim()) return summary.headline.trim();
  const r = toNumber(summary.error_ratio);
  let verdict = DASH;
  if (isNum(r)) {
    if (Math.abs(r - 1) < 5e-4) verdict = "same";
    else verdict = r < 1 ? `${((1 - r) * 100).toFixed(1)} % lower` : `${((r - 1) * 100).toFixed(1)} % higher`;
  }
  return `stored as fp16 with per-tensor power-of-two scales; error vs plain fp16 cast: ${verdict}`;
}

function sizeLine(summary) {
  const dtypes = Array.isArray(summary.source_in_memory) ? summary.source_in_memory : null;
  if (!dtypes) return `size: ${formatBytes(summary.bytes_in)} → ${formatBytes(summary.bytes_out)}`;
  const names = dtypes.map((d) => DTYPE_NAMES[d] ?? String(d).toLowerCase()).join(" + ");
  return `size: ${formatBytes(summary.bytes_in)} in memory${names ? ` (${names})` : ""} → ${formatBytes(summary.bytes_out)}`;
}

function gapText(gap) {
  const v = toNumber(gap);
  if (isNum(v)) return v.toPrecision(3);
  if (gap && typeof gap === "object") {
    const min = toNumber(gap.min ?? gap.median);
    return isNum(min) ? `${gap.min != null ? "min " : "median "}${min.toPrecision(3)}` : null;
  }
  return typeof gap === "string" && gap ? gap : null;
}

/**
 * The compact report as panel lines: {lines, tips, worst}. `tips[i]` explains line i (a tooltip); `worst` lists the
 * worst tensors with their whole keys (the panel wraps them). Fields a report may lack (older converters) are left
 * out: `headline`, `rel_error_per_tensor`, `learned.passes_used_max`, `learned.topk_check`, `learned.spectral_gap`.
 */
export function reportView(summary, { worstCount = 3 } = {}) {
  const c = summary.counts || {};
  const bitExact = toNumber(summary.bit_exact_fraction_bf16);
  const name = summary.output_name || summary.output;
  const lines = [];
  const tips = [];
  const add = (line, tip) => {
    lines.push(line);
    tips.push(tip ?? "");
  };
  if (summary.up_to_date) add("Up to date: reused, nothing converted", TERMS.status);
  else add(`Done${isNum(toNumber(summary.seconds)) ? ` in ${formatDuration(summary.seconds)}` : ""}`, TERMS.status);
  if (name) add(`→ ${name}`, TERMS.output);
  add(headlineOf(summary), TERMS.headline);
  add(`tensors: ${c.quantized ?? 0} quantized · ${c.kept ?? 0} kept · ${c.removed ?? 0} removed`, TERMS.counts);
  add(sizeLine(summary), TERMS.size);
  add(`relF ${formatSci(summary.rel_error)} vs RTN ${formatSci(summary.rtn_rel_error)} (${formatRatio(summary.error_ratio)})`, TERMS.relF);
  const per = summary.rel_error_per_tensor;
  const worstRel = toNumber(per?.worst ?? summary.worst?.[0]?.rel_error);
  if (per && isNum(toNumber(per.median))) {
    add(`per tensor: median ${formatSci(per.median)} · worst ${formatSci(worstRel)}`, TERMS.perTensor);
  } else if (isNum(worstRel)) {
    add(`per tensor: worst ${formatSci(worstRel)}`, TERMS.perTensor);
  }
  if (bitExact !== null && isNum(bitExact)) add(`bit-exact (BF16 source): ${formatPercent(bitExact, 2)}`, TERMS.bitExact);
  // what the learned step did (reports from before this field existed have no `learned`)
  const learned = summary.learned || {};
  const topkN = toNumber(learned.topk_tensors);
  if (isNum(topkN) && topkN > 0) {
    const k = toNumber(summary.settings?.top_k);
    const kk = isNum(k) ? k : 1;
    const passes = toNumber(learned.passes_used_max);
    const numIter = toNumber(summary.settings?.num_iter);
    add(`learned rounding on ${topkN} tensors` +
      (isNum(passes) ? ` (passes used ≤ ${passes}${isNum(numIter) ? ` of num_iter ${numIter}` : ""})` : "") + ":",
      TERMS.learned + (isNum(passes) ? ` ${TERMS.passes}` : ""));
    const check = typeof learned.topk_check === "string" ? learned.topk_check : null;
    const withheld = check && /^withheld/i.test(check);
    const topk = withheld ? `top-${kk} error: ${check}` :
      `top-${kk} error ${formatSmallRatio(learned.topk_ratio_mean)} RTN` + (check ? ` (${check.replace(/_/g, " ")})` : "");
    add(`  ${topk} · relF ${formatRatio(summary.error_ratio)} RTN`, TERMS.learned + (check ? ` ${TERMS.topkCheck}` : ""));
    const gap = gapText(learned.spectral_gap ?? summary.spectral_gap);
    add(`  the error along each weight's ${kk === 1 ? "strongest direction" : `${kk} strongest directions`} ` +
      `drops; the total stays at RTN's by design${gap ? ` (spectral gap ${gap})` : ""}`, TERMS.learned);
  }
  const calN = toNumber(learned.calibrated_tensors);
  if (isNum(calN) && calN > 0) {
    const withBias = toNumber(learned.output_error_ratio_bias_corrected_mean);
    add(`calibrated: output ${formatRatio(learned.output_error_ratio_mean)} RTN` +
      (isNum(withBias) ? `, ${formatRatio(withBias)} with bias` : "") + ` (${calN} tensors)`, TERMS.calibrated);
  }
  // out(randn): the output error on `calib_samples` synthetic rows, for the tensors the learned step changed
  const randN = toNumber(learned.out_randn_tensors);
  if (isNum(randN) && randN > 0) {
    const rows = toNumber(learned.out_randn_samples);
    add(`out(randn): ${formatRatio(learned.out_randn_ratio_mean, 4)} RTN` +
      ` (${isNum(rows) ? `${rows} rows, ` : ""}${randN} tensors)`, TERMS.outRandn);
  }
  const worst = (summary.worst || []).slice(0, worstCount).map((w) => ({
    key: w.key || "",
    keyFull: w.key || "",
    text: `${formatSci(w.rel_error)} (${formatRatio(w.error_ratio)})`,
  }));
  return { lines, tips, worst };
}

function captureSourceLine(summary) {
  const src = summary.source || {};
  if (isNum(toNumber(src.prompts))) {
    const held = toNumber(src.held_out_prompts);
    return `from ${formatCount(src.prompts)} prompts${held > 0 ? ` + ${formatCount(held)} held-out` : ""}` +
      (src.encoder ? ` · ${src.encoder} encoder` : "");
  }
  if (isNum(toNumber(src.steps))) {
    return `from a ${src.steps}-step sampling run (${[src.sampler, src.scheduler].filter(Boolean).join(", ")}` +
      `${isNum(toNumber(src.model_calls)) ? `; ${formatCount(src.model_calls)} model calls` : ""})`;
  }
  return null;
}

/** A capture node's summary of one calibration file as panel lines: {lines, tips}. */
export function captureReportLinesWithTips(summary) {
  const lines = [];
  const tips = [];
  const add = (line, tip) => {
    lines.push(line);
    tips.push(tip ?? "");
  };
  add(`Captured${isNum(toNumber(summary.seconds)) ? ` in ${formatDuration(summary.seconds)}` : ""}`, TERMS.captured);
  if (summary.output_name) add(`→ ${summary.output_name}`, TERMS.calibrationFile);
  const source = captureSourceLine(summary);
  if (source) add(source, TERMS.captureSource);
  const total = toNumber(summary.source?.layers_total);
  add(`layers: ${formatCount(summary.layers)}${isNum(total) ? ` of ${formatCount(total)} Linear layers` : ""} recorded, ` +
    `${formatCount(summary.groups)} input groups`, TERMS.captureLayers);
  const lo = toNumber(summary.rows_kept_min);
  const hi = toNumber(summary.rows_kept_max);
  const asked = toNumber(summary.rows_requested);
  const rows = toNumber(summary.rows);
  add(`rows kept per layer: ${lo === hi ? formatCount(hi) : `${formatCount(lo)}–${formatCount(hi)}`}` +
    `${isNum(asked) && isNum(rows) && rows < asked ? ` (asked ${formatCount(asked)})` : ""}` +
    ` · exact in ${formatCount(summary.exact_groups)}/${formatCount(summary.groups)} groups`, TERMS.captureRows);
  add(`tokens: ${formatCount(summary.tokens_fit)} fit · ${formatCount(summary.tokens_check)} check · ` +
    `${formatCount(summary.tokens_held_out)} held-out`, TERMS.captureTokens);
  const budget = toNumber(summary.budget_bytes);
  add(`file: ${formatBytes(summary.bytes)}${isNum(budget) ? ` (budget ${formatBytes(budget)})` : ""}`, TERMS.captureSize);
  for (const note of Array.isArray(summary.notes) ? summary.notes : []) add(`note: ${note}`, TERMS.captureNote);
  return { lines, tips };
}

/** All report lines as plain text, worst tensors included (whole keys). */
export function reportLines(summary, options) {
  return reportLinesWithTips(summary, options).lines;
}

/** Report lines and the tooltip of each (a capture node's summary or a conversion's report). */
export function reportLinesWithTips(summary, options) {
  if (summary?.kind === "capture") return captureReportLinesWithTips(summary);
  const v = reportView(summary, options);
  const lines = [...v.lines];
  const tips = [...v.tips];
  if (v.worst.length) {
    lines.push("worst tensors (relF, × RTN):");
    tips.push(TERMS.worst);
    for (const w of v.worst) {
      lines.push(`  ${w.key} ${w.text}`);
      tips.push(w.keyFull);
    }
  }
  return { lines, tips };
}

/**
 * One plain sentence for a failed or cancelled run. `payload` is the fp16lr.error message; `lastEvent` the last
 * tensor event seen, used when the payload has no position.
 */
export function errorLine(payload, lastEvent = null) {
  let index = toNumber(payload.index);
  let total = toNumber(payload.total);
  if (!isNum(index) && lastEvent) index = toNumber(lastEvent.index);
  if (!isNum(total) && lastEvent) total = toNumber(lastEvent.total);
  const unit = payload.unit || lastEvent?.unit || "tensor";
  const where = isNum(index) && isNum(total) ? ` at ${unit} ${index}/${total}` : isNum(total) ? ` before the first ${unit}` : "";
  if (payload.cancelled) return `Cancelled${where}, no file written.`;
  const message = String(payload.message || "unknown error").split("\n")[0];
  return `Failed${where}: ${message}; no file written.`;
}

const IDLE = Object.freeze({ phase: "idle", event: null, reports: [], error: null, promptId: null, prepare: null, unit: null });

/**
 * The panel's state after one message. A state is {phase: "idle" | "running" | "done" | "error", event (the last
 * tensor event of the part being converted), reports (summaries of the parts finished in this run: a CLIP with two
 * encoders gives two), error (one line), promptId, prepare ({value, max}: ComfyUI's own bar, in tensors, before this
 * part's first tensor event), unit (what ComfyUI's own bar counts: "tensors", or "prompts"/"steps" for a capture
 * node)}. `message` is {kind, payload} with kind
 *   "start"    the node began executing (payload {prompt_id, unit})
 *   "prepare"  ComfyUI's own progress of the node before its first tensor or capture event ({value, max})
 *   "progress" an fp16lr.progress message        "report" an fp16lr.report message
 *   "error"    an fp16lr.error message, or an interrupt/error of the node ({cancelled, message, index, total})
 *   "outputs"  the node's ui output (a list of summaries; also what a reloaded page restores)
 *   "reset"
 * Reports of an earlier run are dropped when a new run of the node starts; those of the same run accumulate.
 */
export function nextPanelState(state, message) {
  const prev = state || IDLE;
  const p = message.payload || {};
  const promptId = p.prompt_id ?? prev.promptId;
  const sameRun = p.prompt_id == null || p.prompt_id === prev.promptId;
  switch (message.kind) {
    case "start":
      return { ...IDLE, phase: "running", promptId: p.prompt_id ?? null, unit: p.unit ?? null };
    case "prepare":
      if (prev.phase !== "running" || prev.event) return prev;
      return { ...prev, prepare: { value: toNumber(p.value), max: toNumber(p.max) } };
    case "progress":
      return { ...IDLE, phase: "running", event: p.event || null, reports: sameRun ? prev.reports : [], promptId, unit: prev.unit };
    case "report": {
      const report = p.report || p;
      return { ...IDLE, phase: "done", reports: [...(sameRun ? prev.reports : []), report], promptId };
    }
    case "outputs": {
      const list = Array.isArray(p.reports) ? p.reports : [];
      return list.length ? { ...IDLE, phase: "done", reports: list, promptId } : prev;
    }
    case "error":
      return { ...IDLE, phase: "error", event: prev.event, reports: prev.reports, error: errorLine(p, prev.event), promptId };
    case "reset":
      return IDLE;
    default:
      return prev;
  }
}

/** The one-line verdict of a finished part, e.g. "clip_l.safetensors: relF 2.10e-04 (0.823× RTN)". */
export function reportHeadline(summary) {
  if (summary?.kind === "capture") {
    return `${summary.output_name || "calibration"}: ${formatCount(summary.layers)} layers, ${formatBytes(summary.bytes)}`;
  }
  return `${summary.output_name || summary.output || "saved"}: relF ${formatSci(summary.rel_error)} (${formatRatio(summary.error_ratio)} RTN)` +
    (summary.up_to_date ? ", up to date" : "");
}

/**
 * Text sections of a panel state: [{lines, event?, report?, chartAt?, error?}]. The first line of a section is its
 * heading; a section with a report gets its chart drawn before line `chartAt` (the worst-tensor list).
 */
export function panelSections(state, options) {
  if (!state || state.phase === "idle") return [];
  const saved = state.reports.length ? [{ lines: state.reports.map((r) => `saved ${reportHeadline(r)}`) }] : [];
  if (state.phase === "running") {
    let lines;
    if (state.event) lines = progressLines(state.event, options);
    else if (state.prepare && state.prepare.value > 0 && state.prepare.max > 0) {
      lines = [`Working ${state.prepare.value}/${state.prepare.max} ${state.unit || "tensors"} · ${formatPercent(state.prepare.value / state.prepare.max)}`];
    } else lines = ["Starting…"];
    // keyAt: the line with the tensor key (one line, shortened, whole on hover); a capture event has none
    const keyAt = state.event && state.event.type !== "capture" ? 1 : null;
    return [{ lines, event: state.event, keyAt }, ...saved];
  }
  if (state.phase === "done") {
    return state.reports.map((report) => {
      const { lines, tips } = reportLinesWithTips(report, options);
      if (report?.kind === "capture") return { lines, tips, report: null };
      return { lines, tips, report, chartAt: reportView(report, options).lines.length };
    });
  }
  const lines = [state.error];
  if (state.event?.key) lines.push(`last tensor: ${state.event.key}`);
  return [{ lines, error: true }, ...saved];
}

/** All text lines of a panel state. */
export function panelLines(state, options) {
  return panelSections(state, options).flatMap((s) => s.lines);
}

function niceRound(v, up) {
  const f = up ? Math.ceil : Math.floor;
  return f(v * 20) / 20; // steps of 0.05 keep the axis labels short
}

/**
 * What the report's chart shows: the per-tensor top-k error ratio where the learned step worked (default mode: the
 * relF ratio stays ~1.000 by design, the top-k ratio is what moved), else the relF ratio. Returns {ratios, label}.
 */
export function chartSeries(report) {
  const topk = Array.isArray(report?.topk_ratios) ? report.topk_ratios : [];
  const learnedN = toNumber(report?.learned?.topk_tensors);
  if (isNum(learnedN) && learnedN > 0 && topk.some((v) => isNum(toNumber(v)))) {
    const k = toNumber(report?.settings?.top_k);
    return { ratios: topk, label: `top-${isNum(k) ? k : 1} error ÷ RTN per tensor` };
  }
  return { ratios: Array.isArray(report?.ratios) ? report.ratios : [], label: "error ÷ RTN per tensor" };
}

/**
 * Geometry of the per-tensor error-ratio chart (ratio vs RTN per quantized tensor, in file order), in pixels of a
 * `width` x `height` drawing. The y range always includes 1 (RTN); ratios above the upper bound (a robust 98th
 * percentile with headroom, so one outlier cannot flatten the rest) are clamped to the top and flagged. When there
 * are more tensors than pixel columns, each column shows the min..max of its tensors.
 *
 * Returns {n, finite, better, yLow, yHigh, refY, columns: [{x, yTop, yBottom, mean, clipped}], ticks: [{value, y}]}
 */
const MIN_TICK_GAP_PX = 9; // the 9 px label font

export function chartModel(ratios, { width = 300, height = 80, padLeft = 34, padRight = 4, padTop = 4, padBottom = 4 } = {}) {
  const values = (ratios || []).map(toNumber);
  const finite = values.filter((v) => isNum(v) && v >= 0);
  const plotW = Math.max(1, width - padLeft - padRight);
  const plotH = Math.max(1, height - padTop - padBottom);
  const model = { n: values.length, finite: finite.length, better: finite.filter((v) => v < 1).length, columns: [], ticks: [] };
  if (!finite.length) {
    Object.assign(model, { yLow: 0.95, yHigh: 1.05, refY: padTop + plotH / 2 });
    return model;
  }
  const sorted = [...finite].sort((a, b) => a - b);
  const q98 = sorted[Math.min(sorted.length - 1, Math.floor(0.98 * (sorted.length - 1)))];
  const lo = Math.min(sorted[0], 1);
  const hi = Math.max(Math.min(sorted[sorted.length - 1], q98 + 0.25 * Math.max(q98 - lo, 0.05)), 1);
  let yLow = niceRound(lo - 0.02, false);
  let yHigh = niceRound(hi + 0.02, true);
  if (yHigh - yLow < 0.1) {
    yLow = niceRound(Math.min(yLow, 1 - 0.05), false);
    yHigh = niceRound(Math.max(yHigh, 1 + 0.05), true);
  }
  yLow = Math.max(0, yLow);
  const yOf = (v) => padTop + (1 - (Math.min(Math.max(v, yLow), yHigh) - yLow) / (yHigh - yLow)) * plotH;
  model.yLow = yLow;
  model.yHigh = yHigh;
  model.refY = yOf(1);
  const n = values.length;
  const columnsCount = Math.min(n, Math.floor(plotW));
  for (let c = 0; c < columnsCount; c++) {
    const start = Math.floor((c * n) / columnsCount);
    const end = Math.max(start + 1, Math.floor(((c + 1) * n) / columnsCount));
    const chunk = values.slice(start, end).map((v) => (v === Infinity ? yHigh * 2 : v)).filter((v) => isNum(v) && v >= 0);
    if (!chunk.length) continue;
    const min = Math.min(...chunk);
    const max = Math.max(...chunk);
    const mean = chunk.reduce((a, b) => a + b, 0) / chunk.length;
    const x = padLeft + (columnsCount === 1 ? plotW / 2 : ((c + 0.5) * plotW) / columnsCount);
    model.columns.push({ x, yTop: yOf(max), yBottom: yOf(min), mean, clipped: max > yHigh });
  }
  // axis labels: RTN's 1.00 always; the range ends unless they would overprint it (e.g. top-k ratios in 0..1.05)
  const refTick = { value: 1, y: yOf(1), label: "1.00" };
  for (const value of [yLow, 1, yHigh]) {
    const tick = value === 1 ? refTick : { value, y: yOf(value), label: value.toFixed(2) };
    if (tick === refTick || Math.abs(tick.y - refTick.y) >= MIN_TICK_GAP_PX) model.ticks.push(tick);
  }
  return model;
}
