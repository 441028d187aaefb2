// The pack's example workflows as ComfyUI users meet them, in headless Chromium on a real server: opens the
// template browser (screenshots: its top, and scrolled to the last card), records the cards it shows for this pack
// (titles, order, whether each thumbnail loaded while its card was in view), loads each workflow from its card the way
// a user does, checks that the converter node's title is not covered by the tab bar or breadcrumb (the element under
// its title is the graph canvas or the node itself), and screenshots it. With --thumbnails DIR it also renders each
// loaded workflow, fitted to the view with the page's menus hidden, into DIR/<name>.jpg: the thumbnails in
// example_workflows/ are made this way.
//
//   node tests/e2e_browser/templates.mjs --url http://127.0.0.1:8188 --out DIR [--thumbnails example_workflows] [--vue]
//
// Writes DIR/templates.json. Needs playwright-core and Debian's chromium, like drive.mjs.

import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { launchChromium } from "./common.mjs";

const { values: opt } = parseArgs({
  options: {
    url: { type: "string" },
    out: { type: "string" },
    thumbnails: { type: "string" },
    vue: { type: "boolean", default: false },
    pack: { type: "string", default: "comfyui-scaled-fp16" },
  },
});
for (const k of ["url", "out"]) if (!opt[k]) throw new Error(`--${k} is required`);
mkdirSync(opt.out, { recursive: true });

const browser = await launchChromium();
const result = { pack: opt.pack, vue: opt.vue, console: [], cards: [], workflows: {}, thumbnailRequests: [] };
const context = await browser.newContext({ viewport: { width: 1280, height: 860 } });
const page = await context.newPage();
page.on("pageerror", (e) => result.console.push({ type: "pageerror", text: e.message, stack: String(e.stack || "").split("\n").slice(0, 6).join("\n") }));
page.on("response", (r) => {
  if (r.url().includes("/workflow_templates/") && r.url().endsWith(".jpg")) result.thumbnailRequests.push({ url: r.url(), status: r.status() });
  if (r.status() >= 400 && r.url().includes("/workflow_templates/")) result.console.push({ type: "http", text: `${r.status()} ${r.url()}` });
});

async function ready() {
  await page.waitForFunction(() => window.comfyAPI?.app?.app?.graph && window.LiteGraph, null, { timeout: 90_000 });
  await page.waitForFunction(() => (window.comfyAPI.app.app.extensions ?? []).length > 0, null, { timeout: 60_000 });
  await page.waitForTimeout(1500);
}

await page.goto(opt.url, { waitUntil: "load" });
await ready();
if (opt.vue) {
  await page.evaluate(() => window.comfyAPI.app.app.extensionManager.setting.set("Comfy.VueNodes.Enabled", true));
  await page.reload({ waitUntil: "load" });
  await ready();
}
result.frontend = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null);
result.served = await page.evaluate(async () => (await (await fetch("/workflow_templates")).json()));

async function openTemplates() {
  await page.evaluate(() => window.comfyAPI.app.app.extensionManager.command.execute("Comfy.BrowseTemplates"));
  await page.waitForTimeout(1500);
  // the pack's category (a list entry with the pack's name), then its cards
  const category = page.locator("[role=dialog]").getByText(opt.pack, { exact: true }).first();
  if (await category.count()) await category.click();
  await page.waitForTimeout(2500);
}

await openTemplates();
await page.screenshot({ path: join(opt.out, `template-browser${opt.vue ? "-vue" : ""}.png`) });
const names = result.served[opt.pack] ?? [];
// Each card's thumbnail is read while that card is in view, as a user scrolling the browser sees it: the frontend
// loads thumbnails lazily (an IntersectionObserver per card) and frontend 1.27.10's LazyImage also unloads them again
// when the card leaves the view (img src back to null), so a read of all cards after scrolling through them sees only
// the cards that happen to be in view last (the server lists the files in directory order, not in card order).
const thumbnailOf = (name) => page.evaluate((name) => {
  for (const el of document.querySelectorAll("[role=dialog] *, .p-dialog *")) {
    if (el.childElementCount !== 0 || el.textContent.trim() !== name) continue;
    let card = el;
    while (card && !card.querySelector("img")) card = card.parentElement;
    const img = card?.querySelector("img");
    return img ? { src: img.getAttribute("src"), loaded: img.complete && img.naturalWidth > 0, width: img.naturalWidth } : null;
  }
  return null;
}, name);
const thumbnails = {};
for (const name of names) {
  const card = page.locator("[role=dialog]").getByText(name, { exact: true }).first();
  if (!(await card.count())) continue;
  await card.scrollIntoViewIfNeeded();
  const t0 = Date.now();
  do {
    await page.waitForTimeout(250);
    thumbnails[name] = await thumbnailOf(name);
  } while (!thumbnails[name]?.loaded && Date.now() - t0 < 10_000);
}
result.cards = await page.evaluate((names) => {
  // each card: the smallest element that shows one of our names; all positions read at one scroll position
  const out = [];
  for (const el of document.querySelectorAll("[role=dialog] *, .p-dialog *")) {
    const text = el.childElementCount === 0 ? el.textContent.trim() : "";
    if (!names.includes(text)) continue;
    const r = el.getBoundingClientRect();
    out.push({ name: text, x: r.x, y: r.y });
  }
  const seen = new Set();
  return out.filter((c) => !seen.has(c.name) && seen.add(c.name)).sort((a, b) => a.y - b.y || a.x - b.x);
}, names);
for (const card of result.cards) card.thumbnail = thumbnails[card.name] ?? null;
if (result.cards.length) {  // the last card in view: a second picture of the browser
  await page.locator("[role=dialog]").getByText(result.cards.at(-1).name, { exact: true }).first().scrollIntoViewIfNeeded();
  await page.waitForTimeout(1500);
  await page.screenshot({ path: join(opt.out, `template-browser-end${opt.vue ? "-vue" : ""}.png`) });
}
await page.keyboard.press("Escape");
await page.waitForTimeout(500);

for (const name of [...names].sort((a, b) => a.localeCompare(b, "en", { numeric: true }))) {
  await openTemplates();
  const card = page.locator("[role=dialog]").getByText(name, { exact: true }).first();
  const entry = (result.workflows[name] = { clicked: false });
  if (await card.count()) {
    await card.click();
    entry.clicked = true;
  } else {
    // fall back to loading the served file the way the template browser does
    await page.keyboard.press("Escape");
    await page.evaluate(async ([pack, n]) => {
      const wf = await (await fetch(`/api/workflow_templates/${pack}/${encodeURIComponent(n)}.json`)).json();
      await window.comfyAPI.app.app.loadGraphData(wf, true, true, n);
    }, [opt.pack, name]);
  }
  await page.waitForTimeout(2500);
  Object.assign(entry, await page.evaluate(() => {
    const app = window.comfyAPI.app.app;
    const graph = app.rootGraph ?? app.graph;
    const first = graph.nodes.find((n) => n.type?.startsWith("ScaledFP16"));
    const note = graph.nodes.find((n) => n.type === "Note");
    const titleOf = (node) => {
      const ds = app.canvas.ds;
      const rect = app.canvas.canvas.getBoundingClientRect();
      const th = window.LiteGraph.NODE_TITLE_HEIGHT ?? 30;
      const x = rect.left + (node.pos[0] + 40 + ds.offset[0]) * ds.scale;
      const y = rect.top + (node.pos[1] - th / 2 + ds.offset[1]) * ds.scale;
      const hit = document.elementFromPoint(x, y);
      const visible = !!hit && (hit === app.canvas.canvas || !!hit.closest(`.lg-node[data-node-id="${node.id}"]`));
      return { x, y, visible, hit: hit ? `${hit.tagName.toLowerCase()}.${[...hit.classList].join(".")}` : null };
    };
    return { nodes: graph.nodes.map((n) => n.type), converterTitle: first ? { type: first.type, ...titleOf(first) } : null,
      noteTitle: note ? titleOf(note) : null, noteText: note?.widgets?.[0]?.value ?? null };
  }));
  const slug = name.replace(/[^A-Za-z0-9]+/g, "-").replace(/^-|-$/g, "");
  await page.screenshot({ path: join(opt.out, `workflow-${slug}${opt.vue ? "-vue" : ""}.png`) });
  if (opt.thumbnails) {
    // fit the graph into the view, hide the page's menus, keep the canvas and the DOM widgets (note text, prompts)
    await page.evaluate(() => {
      const app = window.comfyAPI.app.app;
      const graph = app.rootGraph ?? app.graph;
      const canvasEl = app.canvas.canvas;
      let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
      for (const n of graph.nodes) {
        x0 = Math.min(x0, n.pos[0]);
        y0 = Math.min(y0, n.pos[1] - 30);
        x1 = Math.max(x1, n.pos[0] + n.size[0]);
        y1 = Math.max(y1, n.pos[1] + n.size[1]);
      }
      // the whole graph where it fits at a zoom that still draws text; else its top-left part (the note and the
      // pack's nodes come first)
      const pad = 30;
      const fit = Math.min(canvasEl.clientWidth / (x1 - x0 + 2 * pad), canvasEl.clientHeight / (y1 - y0 + 2 * pad));
      const scale = Math.max(fit, 0.8);
      app.canvas.ds.scale = scale;
      app.canvas.ds.offset = scale > fit ? [-x0 + pad, -y0 + pad]
        : [-x0 + pad + (canvasEl.clientWidth / scale - (x1 - x0 + 2 * pad)) / 2, -y0 + pad + (canvasEl.clientHeight / scale - (y1 - y0 + 2 * pad)) / 2];
      app.canvas.show_info = false;
      graph.setDirtyCanvas(true, true);
      const style = document.createElement("style");
      style.id = "fp16lr-thumb";
      style.textContent = "body * { visibility: hidden !important; } canvas#graph-canvas, .dom-widget, .dom-widget *, .lg-node, .lg-node * { visibility: visible !important; }";
      document.head.appendChild(style);
    });
    await page.waitForTimeout(1200);
    const box = await page.evaluate(() => {
      const r = window.comfyAPI.app.app.canvas.canvas.getBoundingClientRect();
      return { x: r.x, y: r.y, width: r.width, height: r.height };
    });
    const file = join(opt.thumbnails, `${name}.jpg`);
    await page.screenshot({ path: file, type: "jpeg", quality: 82, clip: box });
    entry.thumbnail = file;
    await page.evaluate(() => {
      document.getElementById("fp16lr-thumb")?.remove();
      window.comfyAPI.app.app.canvas.show_info = true;
    });
  }
}

await browser.close();
writeFileSync(join(opt.out, "templates.json"), JSON.stringify(result, null, 1));
console.log(JSON.stringify(result, null, 1));
