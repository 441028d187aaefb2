// Drives ComfyUI's real frontend in headless Chromium for test_web_panel.py: builds graphs with the converting nodes,
// queues them from the page (so the server sends the fp16lr.* events to this browser), records what the panels show
// and takes screenshots. Writes <out>/result.json; the Python test makes the assertions.
//
//   node tests/e2e_browser/drive.mjs --url http://127.0.0.1:8189 --out DIR --big NAME --small NAME [--small-iter N]
//
// NAME: a model choice of ScaledFP16Convert ("diffusion_models/x.safetensors"). Needs playwright-core (package.json
// here) and Debian's chromium (FP16LR_CHROMIUM overrides /usr/bin/chromium); never downloads a browser.

import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { chromium } from "playwright-core";
import { queue } from "./common.mjs";

const { values: opt } = parseArgs({
  options: {
    url: { type: "string" },
    out: { type: "string" },
    big: { type: "string" },
    small: { type: "string" },
    "small-iter": { type: "string", default: "8" },
    tag: { type: "string", default: String(Date.now()) },
  },
});
for (const k of ["url", "out", "big", "small"]) if (!opt[k]) throw new Error(`--${k} is required`);
mkdirSync(opt.out, { recursive: true });

const CHROMIUM_FLAGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
  "--disable-sync", "--no-first-run", "--disable-quic",
];
const result = { console: [], baselineConsole: [], httpErrors: [], steps: {} };
const browser = await chromium.launch({
  executablePath: process.env.FP16LR_CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: CHROMIUM_FLAGS,
});

function watch(page, sink) {
  page.on("console", (m) => {
    if (m.type() === "error" || m.type() === "warning") sink.push({ type: m.type(), text: m.text(), url: m.location()?.url ?? "" });
  });
  page.on("pageerror", (e) => sink.push({ type: "pageerror", text: e.message, url: (e.stack || "").split("\n").slice(1, 3).join(" ") }));
  page.on("response", (r) => {
    if (r.status() >= 400) result.httpErrors.push({ status: r.status(), url: r.url() });
  });
}

async function ready(page) {
  await page.waitForFunction(() => window.comfyAPI?.app?.app?.graph && window.LiteGraph, null, { timeout: 90_000 });
  // extensions are registered and the first graph is configured a moment after the app object exists
  await page.waitForFunction(() => (window.comfyAPI.app.app.extensions ?? []).length > 0, null, { timeout: 60_000 });
  await page.waitForTimeout(1500);
}

/** Replace the graph with converting nodes: [{model, num_iter, output_name, pos}]; returns their ids. */
async function loadGraph(page, nodes) {
  return page.evaluate(async (specs) => {
    const app = window.comfyAPI.app.app;
    app.graph.clear();
    for (const s of specs) {
      const node = window.LiteGraph.createNode("ScaledFP16Convert");
      node.pos = s.pos;
      app.graph.add(node);
      for (const [name, value] of Object.entries({ model: s.model, num_iter: s.num_iter, output_name: s.output_name, overwrite: true })) {
        const w = node.widgets.find((x) => x.name === name);
        if (!w) throw new Error(`widget ${name} missing`);
        w.value = value;
      }
    }
    const workflow = app.graph.serialize();
    workflow.id = crypto.randomUUID(); // a new workflow: no report of an earlier run is restored onto it
    // clear of the side bar, the tab bar and the breadcrumb
    workflow.extra = { ...(workflow.extra ?? {}), ds: { scale: 1, offset: [20, 70] } };
    await app.loadGraphData(workflow);
    app.canvas.ds.scale = 1;
    app.canvas.ds.offset = [20, 70];
    app.graph.setDirtyCanvas(true, true);
    return app.graph.nodes.filter((n) => n.type === "ScaledFP16Convert").map((n) => String(n.id));
  }, nodes);
}

async function panels(page) {
  return page.evaluate(() =>
    Object.fromEntries(
      [...document.querySelectorAll(".fp16lr-panel[data-fp16lr-node]")].map((el) => [
        el.dataset.fp16lrNode,
        { phase: el.dataset.phase ?? "idle", text: el.dataset.text ?? "", shown: el.isConnected && el.getBoundingClientRect().height > 0,
          inVueNode: !!el.closest(".lg-node"), chartColumns: [...el.querySelectorAll("canvas")].map((c) => Number(c.dataset.columns || 0)),
          chartLabels: [...el.querySelectorAll("canvas")].map((c) => c.dataset.label ?? ""),
          mount: el.dataset.fp16lrMount ?? null,
          // lines cut short (an ellipsis or hidden overflow), the live key line excepted: it is shortened on purpose
          cutLines: [...el.querySelectorAll(".fp16lr-line:not(.fp16lr-key)")].filter((l) => l.scrollWidth > l.clientWidth + 1).map((l) => l.textContent),
          // content hidden below the panel's box
          clipped: el.scrollHeight > el.clientHeight + 2,
          tips: [...el.querySelectorAll(".fp16lr-line")].filter((l) => l.title).length },
      ]),
    ),
  );
}

/**
 * Poll the panels every 100 ms until `until(panels)` holds; records every distinct text per node. `onTick` may take
 * screenshots. Returns {timeline: {node: [{t, phase, text}]}, last}.
 */
async function record(page, until, { timeoutMs = 600_000, onTick = async () => {} } = {}) {
  const timeline = {};
  const t0 = Date.now();
  let last = {};
  while (Date.now() - t0 < timeoutMs) {
    last = await panels(page);
    for (const [id, p] of Object.entries(last)) {
      const list = (timeline[id] ??= []);
      if (list.at(-1)?.text !== p.text) list.push({ t: (Date.now() - t0) / 1000, phase: p.phase, text: p.text });
    }
    await onTick(last, timeline);
    if (until(last, timeline)) return { timeline, last };
    await page.waitForTimeout(100);
  }
  throw new Error(`timed out; panels: ${JSON.stringify(last).slice(0, 2000)}`);
}

const converting = (list) => (list ?? []).filter((e) => e.text.startsWith("Converting"));

async function step(name, fn) {
  const t0 = Date.now();
  try {
    result.steps[name] = { ok: true, ...(await fn()) };
  } catch (e) {
    result.steps[name] = { ok: false, error: String(e?.stack || e) };
  }
  result.steps[name].seconds = (Date.now() - t0) / 1000;
  writeFileSync(join(opt.out, "result.json"), JSON.stringify(result, null, 1));
}

// 1. The page's own console noise without this extension (its files answered by empty modules): a fresh server
//    logs 404s for user files and fails to reach api.comfy.org offline. Only messages beyond these count.
await step("baseline", async () => {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  await page.route(/\/extensions\/[^/]+\/js\/fp16lr_[a-z]+\.js/, (route) =>
    route.fulfill({ status: 200, contentType: "text/javascript", body: "export {};" }));
  watch(page, result.baselineConsole);
  await page.goto(opt.url, { waitUntil: "load" });
  await ready(page);
  await page.waitForTimeout(1500);
  await context.close();
  return {};
});

const context = await browser.newContext({ viewport: { width: 1280, height: 860 } });
const page = await context.newPage();
watch(page, result.console);
await page.goto(opt.url, { waitUntil: "load" });
await ready(page);

// 2. Two converting nodes in one run: each shows its own live panel, then its report and chart.
await step("run", async () => {
  const registered = await page.evaluate(() => window.comfyAPI.app.app.extensions.map((e) => e.name).filter((n) => n.startsWith("comfyui-scaled-fp16")));
  const [big, small] = await loadGraph(page, [
    { model: opt.big, num_iter: 0, output_name: `web-big-${opt.tag}`, pos: [60, 60] },
    { model: opt.small, num_iter: Number(opt["small-iter"]), output_name: `web-small-${opt.tag}`, pos: [500, 60] },
  ]);
  const promptId = await queue(page);
  let midShot = null;
  const { timeline, last } = await record(
    page,
    (p) => p[big]?.phase === "done" && p[small]?.phase === "done",
    {
      onTick: async (p, tl) => {
        // mid-run: a panel that has moved through a few tensors and about a third of the bytes
        const percent = (id) => Number(/· ([\d.]+) %/.exec(p[id]?.text ?? "")?.[1] ?? 0);
        const running = [big, small].find((id) => p[id]?.phase === "running" && converting(tl[id]).length >= 3 && percent(id) >= 30);
        if (!midShot && running) {
          await page.screenshot({ path: join(opt.out, "web-progress-running.png") });
          midShot = { node: running, text: p[running].text };
        }
      },
    },
  );
  await page.waitForTimeout(700); // let the chart and the node size settle
  await page.screenshot({ path: join(opt.out, "web-progress-report.png") });
  return { registered, nodes: { big, small }, promptId, midShot, timeline, final: await panels(page) };
});

// 2b. The same graph queued again: both outputs are up to date, reused at once, and the panels say so.
await step("requeue", async () => {
  const { big, small } = result.steps.run.nodes;
  const promptId = await queue(page);
  const { last } = await record(page, (p) => [big, small].every((id) => p[id]?.phase === "done" && p[id]?.text.startsWith("Up to date")),
    { timeoutMs: 120_000 });
  await page.waitForTimeout(700);
  await page.screenshot({ path: join(opt.out, "web-progress-uptodate.png") });
  return { promptId, final: await panels(page), sawConverting: false, last };
});

// 3. Reload: the reports come back from the server's history (the nodes' ui output).
await step("reload", async () => {
  const before = result.steps.run.final;
  await page.reload({ waitUntil: "load" });
  await ready(page);
  const ids = Object.keys(before ?? {});
  await page.waitForFunction(
    (want) => want.every(([id, text]) => document.querySelector(`.fp16lr-panel[data-fp16lr-node="${id}"]`)?.dataset.text === text),
    ids.map((id) => [id, before[id].text]),
    { timeout: 30_000 },
  ).catch(() => {});
  await page.waitForTimeout(500);
  await page.screenshot({ path: join(opt.out, "web-progress-reloaded.png") });
  return { after: await panels(page) };
});

// 4. Cancel mid-run: the panel says where it stopped and that no file was written.
await step("cancel", async () => {
  const [node] = await loadGraph(page, [{ model: opt.big, num_iter: 0, output_name: `web-cancel-${opt.tag}`, pos: [60, 60] }]);
  const promptId = await queue(page);
  let interrupted = false;
  const { timeline, last } = await record(page, (p) => p[node]?.phase === "error", {
    timeoutMs: 300_000,
    onTick: async (p, tl) => {
      if (!interrupted && converting(tl[node]).length >= 3) {
        interrupted = true;
        await page.evaluate(() => window.comfyAPI.api.api.interrupt()); // what the queue's cancel button does
      }
    },
  });
  await page.waitForTimeout(300);
  await page.screenshot({ path: join(opt.out, "web-progress-cancelled.png") });
  return { node, promptId, timeline, final: last[node], outputName: `web-cancel-${opt.tag}` };
});

// 5. The Vue node renderer (experimental in this frontend): the same panel inside the Vue node.
await step("vue", async () => {
  const setVue = (on) => page.evaluate((v) => window.comfyAPI.app.app.extensionManager.setting.set("Comfy.VueNodes.Enabled", v), on);
  await setVue(true);
  try {
    await page.reload({ waitUntil: "load" });
    await ready(page);
    const vueMode = await page.evaluate(() => !!window.LiteGraph.vueNodesMode);
    // the BF16 model for the live panel, the FP32 one for the learned-rounding lines (the longest ones)
    const [node, small] = await loadGraph(page, [
      { model: opt.big, num_iter: 0, output_name: `web-vue-${opt.tag}`, pos: [60, 60] },
      { model: opt.small, num_iter: Number(opt["small-iter"]), output_name: `web-vue-small-${opt.tag}`, pos: [720, 60] },
    ]);
    await page.waitForTimeout(1000);
    const promptId = await queue(page);
    let midShot = null;
    const { timeline, last } = await record(page, (p) => [node, small].every((id) => p[id]?.phase === "done" && p[id]?.inVueNode), {
      timeoutMs: 300_000,
      onTick: async (p, tl) => {
        if (!midShot && p[node]?.phase === "running" && p[node]?.inVueNode && converting(tl[node]).length >= 3) {
          await page.screenshot({ path: join(opt.out, "web-progress-vue-running.png") });
          midShot = { text: p[node].text };
        }
      },
    });
    await page.waitForTimeout(1500);
    await page.screenshot({ path: join(opt.out, "web-progress-vue-report.png") });
    const final = await panels(page);
    return { vueMode, node, small, promptId, midShot, timeline, final: final[node], finalSmall: final[small] };
  } finally {
    await setVue(false);
  }
});

await browser.close();
writeFileSync(join(opt.out, "result.json"), JSON.stringify(result, null, 1));
console.log(`wrote ${join(opt.out, "result.json")}`);
