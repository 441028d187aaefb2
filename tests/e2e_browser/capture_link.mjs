// The capture nodes in the real frontend, in headless Chromium: adds both capture nodes and the three converting
// nodes to an empty graph, links each capture node's `calibration` output to `calibration_override` the way a
// user's drag does (LiteGraph's connect, which refuses a link of another type), tries a wrong-typed link (LATENT ->
// calibration_override, must be refused), serialises the graph as the Queue button does (graphToPrompt) and takes
// a screenshot.
//
// With --clip NAME (a text encoder in models/text_encoders that CLIPLoader loads as --clip-type) it then runs
// Capture Calibration from Prompts from the Run button: records the pack's panel on the capture node every 100 ms
// until it shows the summary (screenshot capture-panel-done.png), then queues a long prompt list under another
// name, presses Cancel once the panel shows the first prompt, and records the panel's error line
// (capture-panel-cancelled.png).
//
//   node tests/e2e_browser/capture_link.mjs --url http://127.0.0.1:8188 --out DIR [--clip NAME --clip-type TYPE]
//
// Writes DIR/capture_link.json and the screenshots. Needs playwright-core and Debian's chromium.

import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { launchChromium, queue } from "./common.mjs";

const { values: opt } = parseArgs({
  options: { url: { type: "string" }, out: { type: "string" }, clip: { type: "string" },
    "clip-type": { type: "string", default: "stable_diffusion" }, prompts: { type: "string", default: "12" } },
});
for (const k of ["url", "out"]) if (!opt[k]) throw new Error(`--${k} is required`);
mkdirSync(opt.out, { recursive: true });

const browser = await launchChromium();
const page = await (await browser.newContext({ viewport: { width: 1600, height: 1000 } })).newPage();
const errors = [];
page.on("pageerror", (e) => errors.push(e.message));

await page.goto(opt.url, { waitUntil: "load" });
await page.waitForFunction(() => window.comfyAPI?.app?.app?.graph && window.LiteGraph, null, { timeout: 90_000 });
await page.waitForTimeout(2000);
// a fresh browser profile opens the template browser on start: close it
for (let i = 0; i < 3; i++) { await page.keyboard.press("Escape"); await page.waitForTimeout(300); }

const result = await page.evaluate(async () => {
  const app = window.comfyAPI.app.app;
  const graph = app.rootGraph ?? app.graph;
  graph.clear();
  const add = (type, x, y) => {
    const n = window.LiteGraph.createNode(type);
    n.pos = [x, y];
    graph.add(n);
    return n;
  };
  const prompts = add("ScaledFP16CapturePrompts", 40, 60);
  const sampling = add("ScaledFP16CaptureSampling", 40, 520);
  const convert = add("ScaledFP16Convert", 620, 40);
  const saveClip = add("ScaledFP16SaveCLIP", 1080, 40);
  const saveModel = add("ScaledFP16SaveModel", 620, 520);
  const slot = (n) => n.findInputSlot("calibration_override");
  const linked = (l) => !!l && l !== null;
  const out = {
    slots: [convert, saveClip, saveModel].map((n) => ({ type: n.type, slot: slot(n), inputType: n.inputs[slot(n)]?.type })),
    promptsToConvert: linked(prompts.connect(0, convert, slot(convert))),
    promptsToSaveClip: linked(prompts.connect(0, saveClip, slot(saveClip))),
    samplingToSaveModel: linked(sampling.connect(0, saveModel, slot(saveModel))),
  };
  // a LATENT may not go there: the frontend must refuse it
  const probe = add("ScaledFP16Convert", 1080, 520);
  out.latentRefused = !linked(sampling.connect(1, probe, slot(probe)));
  graph.remove(probe);
  app.canvas.setDirty(true, true);
  const { output } = await app.graphToPrompt();
  out.serialised = Object.fromEntries(Object.entries(output).map(([id, n]) => [id, {
    class_type: n.class_type, calibration_override: n.inputs.calibration_override ?? null }]));
  out.ids = { prompts: String(prompts.id), sampling: String(sampling.id), convert: String(convert.id),
              saveClip: String(saveClip.id), saveModel: String(saveModel.id) };
  return out;
});
await page.waitForTimeout(800);
await page.screenshot({ path: join(opt.out, "capture-nodes.png") });

/** The capture node's panel: phase, text, per-line tooltips, lines cut short or hidden. */
const panel = (id) => page.evaluate((id) => {
  const el = document.querySelector(`.fp16lr-panel[data-fp16lr-node="${id}"]`);
  if (!el) return null;
  const lines = [...el.querySelectorAll(".fp16lr-line")];
  return { phase: el.dataset.phase ?? "idle", text: el.dataset.text ?? "", shown: el.getBoundingClientRect().height > 0,
    tips: lines.map((l) => l.title || ""), bar: el.querySelector(".fp16lr-bar > div")?.style.width ?? null,
    cutLines: lines.filter((l) => l.scrollWidth > l.clientWidth + 1).map((l) => l.textContent),
    clipped: el.scrollHeight > el.clientHeight + 2 };
}, id);

/** Poll the panel every 100 ms until `until(p)`; every distinct text with its phase. `onTick(p)` may act. */
async function record(id, until, { timeoutMs = 600_000, onTick = async () => {} } = {}) {
  const timeline = [];
  const t0 = Date.now();
  while (Date.now() - t0 < timeoutMs) {
    const p = await panel(id);
    if (p && timeline.at(-1)?.text !== p.text) timeline.push({ t: (Date.now() - t0) / 1000, phase: p.phase, text: p.text, bar: p.bar });
    if (p) await onTick(p);
    if (p && until(p, timeline)) return { timeline, last: p };
    await page.waitForTimeout(100);
  }
  throw new Error(`panel ${id}: timed out; timeline ${JSON.stringify(timeline).slice(-2000)}`);
}

/** A graph of CLIPLoader -> Capture Calibration from Prompts with these widget values; returns the capture's id. */
const captureGraph = (values) => page.evaluate(async ([clip, clipType, values]) => {
  const app = window.comfyAPI.app.app;
  const graph = app.rootGraph ?? app.graph;
  graph.clear();
  const loader = window.LiteGraph.createNode("CLIPLoader");
  loader.pos = [30, 60];
  graph.add(loader);
  loader.widgets.find((w) => w.name === "clip_name").value = clip;
  loader.widgets.find((w) => w.name === "type").value = clipType;
  const cap = window.LiteGraph.createNode("ScaledFP16CapturePrompts");
  cap.pos = [380, 60];
  graph.add(cap);
  for (const [name, value] of Object.entries(values)) {
    const w = cap.widgets.find((x) => x.name === name);
    if (!w) throw new Error(`widget ${name} missing`);
    w.value = value;
  }
  loader.connect(0, cap, cap.findInputSlot("clip"));
  cap.setSize([560, cap.size[1]]);
  const workflow = graph.serialize();
  workflow.id = crypto.randomUUID();
  workflow.extra = { ...(workflow.extra ?? {}), ds: { scale: 1, offset: [20, 70] } };
  await app.loadGraphData(workflow);
  app.canvas.ds.scale = 1;
  app.canvas.ds.offset = [20, 70];
  (app.rootGraph ?? app.graph).setDirtyCanvas(true, true);
  return String((app.rootGraph ?? app.graph).nodes.find((n) => n.type === "ScaledFP16CapturePrompts").id);
}, [opt.clip, opt["clip-type"], values]);


if (opt.clip) {
  const words = ["a red fox", "an old lighthouse", "a steam train", "a bowl of ramen", "a snowy forest", "a quiet library"];
  const light = ["at sunset", "in the rain", "in morning fog", "at golden hour"];
  const lines = (n, offset = 0) => Array.from({ length: n }, (_, i) => `${words[(i + offset) % words.length]} ${light[Math.floor((i + offset) / words.length) % light.length]}, photo ${i + offset}`).join("\n");
  const n = Number(opt.prompts);
  // calib_samples 512 within 0.05 GB: the budget keeps fewer rows, and the summary's note says so
  const id = await captureGraph({ prompts: lines(n), held_out_prompts: lines(2, n), calib_samples: 512, budget_gb: 0.05,
    output_name: "fp16lr-web-capture", overwrite: true });
  const promptId = await queue(page);
  let shot = false;
  const run = await record(id, (p) => p.phase === "done" || p.phase === "error", {
    onTick: async (p) => {
      if (!shot && p.text.startsWith("Capturing")) {  // best effort: a short list may finish before the picture
        shot = true;
        await page.screenshot({ path: join(opt.out, "capture-panel-running.png") });
      }
    },
  });
  result.capture = { node: id, promptId, timeline: run.timeline, final: run.last };
  await page.waitForTimeout(600);
  await page.screenshot({ path: join(opt.out, "capture-panel-done.png") });

  // Cancel: a long list, interrupted once the panel shows a prompt recorded (what the queue's cancel button does)
  const cid = await captureGraph({ prompts: lines(400), calib_samples: 64, output_name: "fp16lr-web-capture-cancelled",
    overwrite: true });
  const cancelPromptId = await queue(page);
  let interrupted = false;
  const cancel = await record(cid, (p) => p.phase === "error" || p.phase === "done", {
    onTick: async (p) => {
      if (!interrupted && p.text.startsWith("Capturing")) {
        interrupted = true;
        await page.evaluate(() => window.comfyAPI.api.api.interrupt());
      }
    },
  });
  result.cancel = { node: cid, promptId: cancelPromptId, interrupted, timeline: cancel.timeline, final: cancel.last };
  await page.waitForTimeout(600);
  await page.screenshot({ path: join(opt.out, "capture-panel-cancelled.png") });
}
result.errors = errors;
writeFileSync(join(opt.out, "capture_link.json"), JSON.stringify(result, null, 1));
console.log(JSON.stringify(result));
await browser.close();
