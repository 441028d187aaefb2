// The capture nodes in the real frontend, in headless Chromium: adds both capture nodes and the three converting
// nodes to an empty graph, links each capture node's `calibration` output to `calibration_override` the way a
// user's drag does (LiteGraph's connect, which refuses a link of another type), tries a wrong-typed link (LATENT ->
// calibration_override, must be refused), serialises the graph as the Queue button does (graphToPrompt) and takes
// a screenshot.
//
//   node tests/e2e_browser/capture_link.mjs --url http://127.0.0.1:8188 --out DIR
//
// Writes DIR/capture_link.json and DIR/capture-nodes.png. Needs playwright-core and Debian's chromium.

import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { chromium } from "playwright-core";

const { values: opt } = parseArgs({ options: { url: { type: "string" }, out: { type: "string" } } });
for (const k of ["url", "out"]) if (!opt[k]) throw new Error(`--${k} is required`);
mkdirSync(opt.out, { recursive: true });

const browser = await chromium.launch({
  executablePath: process.env.FP16LR_CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"],
});
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
result.errors = errors;
writeFileSync(join(opt.out, "capture_link.json"), JSON.stringify(result, null, 1));
console.log(JSON.stringify(result));
await browser.close();
