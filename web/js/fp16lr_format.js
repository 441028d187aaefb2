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

/** Text lines of the live panel (what the Vue renderer fallback and tests read). */
export function progressLines(event, options) {
  const v = progressView(event, options);
  return [
    `Converting ${v.counter} · ${v.percent}`,
    v.key,
    `${v.rate} · ETA ${v.eta} · ${v.bytes}`,
    `last: ${v.last}`,
  ];
}

/** The compact report: headline figures and the worst tensors (`worstCount` of them). */
export function reportView(summary, { worstCount = 3, keyLength = 36, nameLength = 52 } = {}) {
  const c = summary.counts || {};
  const bitExact = toNumber(summary.bit_exact_fraction_bf16);
  const name = summary.output_name || summary.output;
  const lines = [
    `Done${isNum(toNumber(summary.seconds)) ? ` in ${formatDuration(summary.seconds)}` : ""}`,
    ...(name ? [`→ ${cutMiddle(String(name), nameLength)}`] : []),
    `tensors: ${c.quantized ?? 0} quantized · ${c.kept ?? 0} kept · ${c.removed ?? 0} removed`,
    `size: ${formatBytes(summary.bytes_in)} → ${formatBytes(summary.bytes_out)}`,
    `relF ${formatSci(summary.rel_error)} vs RTN ${formatSci(summary.rtn_rel_error)} (${formatRatio(summary.error_ratio)})`,
  ];
  if (bitExact !== null && isNum(bitExact)) lines.push(`bit-exact (BF16 source): ${formatPercent(bitExact, 2)}`);
  // what the learned step did (reports from before this field existed have no `learned`)
  const learned = summary.learned || {};
  const topkN = toNumber(learned.topk_tensors);
  if (isNum(topkN) && topkN > 0) {
    const k = toNumber(summary.settings?.top_k);
    lines.push(`learned: top-${isNum(k) ? k : 1} error ${formatSmallRatio(learned.topk_ratio_mean)} RTN (${topkN} tensors)`);
  }
  const calN = toNumber(learned.calibrated_tensors);
  if (isNum(calN) && calN > 0) {
    const withBias = toNumber(learned.output_error_ratio_bias_corrected_mean);
    lines.push(`calibrated: output ${formatRatio(learned.output_error_ratio_mean)} RTN` +
      (isNum(withBias) ? `, ${formatRatio(withBias)} with bias` : "") + ` (${calN} tensors)`);
  }
  // out(randn): the output error on `calib_samples` synthetic rows, for the tensors the learned step changed
  const randN = toNumber(learned.out_randn_tensors);
  if (isNum(randN) && randN > 0) {
    const rows = toNumber(learned.out_randn_samples);
    lines.push(`out(randn): ${formatRatio(learned.out_randn_ratio_mean, 4)} RTN` +
      ` (${isNum(rows) ? `${rows} rows, ` : ""}${randN} tensors)`);
  }
  const worst = (summary.worst || []).slice(0, worstCount).map((w) => ({
    key: shortenKey(w.key || "", keyLength),
    keyFull: w.key || "",
    text: `${formatSci(w.rel_error)} (${formatRatio(w.error_ratio)})`,
  }));
  return { lines, worst };
}

/** All report lines as plain text, worst tensors included. */
export function reportLines(summary, options) {
  const v = reportView(summary, options);
  const out = [...v.lines];
  if (v.worst.length) {
    out.push("worst (relF, × RTN):");
    for (const w of v.worst) out.push(`  ${w.key} ${w.text}`);
  }
  return out;
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
  const where = isNum(index) && isNum(total) ? ` at tensor ${index}/${total}` : isNum(total) ? ` before the first tensor` : "";
  if (payload.cancelled) return `Cancelled${where}, no file written.`;
  const message = String(payload.message || "unknown error").split("\n")[0];
  return `Failed${where}: ${message}; no file written.`;
}

const IDLE = Object.freeze({ phase: "idle", event: null, reports: [], error: null, promptId: null, prepare: null });

/**
 * The panel's state after one message. A state is {phase: "idle" | "running" | "done" | "error", event (the last
 * tensor event of the part being converted), reports (summaries of the parts finished in this run: a CLIP with two
 * encoders gives two), error (one line), promptId, prepare ({value, max}: ComfyUI's own bar, in tensors, before this
 * part's first tensor event)}. `message` is {kind, payload} with kind
 *   "start"    the node began executing (payload {prompt_id})
 *   "prepare"  ComfyUI's own progress of the node before its first tensor ({value, max})
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
      return { ...IDLE, phase: "running", promptId: p.prompt_id ?? null };
    case "prepare":
      if (prev.phase !== "running" || prev.event) return prev;
      return { ...prev, prepare: { value: toNumber(p.value), max: toNumber(p.max) } };
    case "progress":
      return { ...IDLE, phase: "running", event: p.event || null, reports: sameRun ? prev.reports : [], promptId };
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
  return `${summary.output_name || summary.output || "saved"}: relF ${formatSci(summary.rel_error)} (${formatRatio(summary.error_ratio)} RTN)`;
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
      lines = [`Working ${state.prepare.value}/${state.prepare.max} tensors · ${formatPercent(state.prepare.value / state.prepare.max)}`];
    } else lines = ["Starting…"];
    return [{ lines, event: state.event }, ...saved];
  }
  if (state.phase === "done") {
    return state.reports.map((report) => ({ lines: reportLines(report, options), report, chartAt: reportView(report, options).lines.length }));
  }
  const lines = [state.error];
  if (state.event) lines.push(`last tensor: ${shortenKey(state.event.key || "", 40)}`);
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
