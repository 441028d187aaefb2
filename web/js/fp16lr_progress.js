// Live per-tensor progress and the quality report on the converting nodes (ScaledFP16Convert,
// ScaledFP16SaveModel, ScaledFP16SaveCLIP); live progress (prompt or step i of n, tokens recorded) and the summary
// of each calibration file written on the capture nodes (ScaledFP16CapturePrompts, ScaledFP16CaptureSampling).
// Listens to the events nodes/progress.py sends (docs/ARCHITECTURE.md, "ComfyUI custom events") and to the node's
// `ui` output, and draws a small panel under the node's widgets.
//
// The panel is a DOM widget (text + progress bar, and a chart of error ratio vs RTN when done). The canvas renderer
// mounts it; so do Vue node renderers that mount DOM widgets themselves. A Vue node renderer that does not (it shows
// no DOM widget of unknown type) gets the same element moved into the node's body: that is detected on the page, by
// whether the element ends up inside the node, not by version numbers.

import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { chartModel, chartSeries, nextPanelState, panelLines, panelSections, progressFraction } from "./fp16lr_format.js";
import { sortPackTemplates } from "./fp16lr_templates.js";

const EXTENSION_NAME = "comfyui-scaled-fp16.progress";
// the nodes with a panel, and what ComfyUI's own bar counts on each before the node's first event of its own
const BAR_UNITS = { ScaledFP16Convert: "tensors", ScaledFP16SaveModel: "tensors", ScaledFP16SaveCLIP: "tensors",
  ScaledFP16CapturePrompts: "prompts", ScaledFP16CaptureSampling: "steps" };
const NODE_TYPES = new Set(Object.keys(BAR_UNITS));
const WIDGET_NAME = "fp16lr_panel";
const LINE_PX = 16;
const PAD_PX = 12; // the panel's horizontal padding and border
const CHART_PX = 86;
const MIN_WIDTH = 400; // room for a 44-character key and the rate/ETA line at 11 px monospace
const HISTORY_ITEMS = 64;

// panel state per execution id (the node's unique_id; "a:b" inside subgraphs), kept even while the node is absent
const states = new Map();
let currentPromptId = null;

function injectStyle() {
  if (document.getElementById("fp16lr-style")) return;
  const style = document.createElement("style");
  style.id = "fp16lr-style";
  style.textContent = `
.fp16lr-panel { box-sizing: border-box; padding: 4px 6px; border-radius: 6px; overflow: hidden;
  font: 11px/16px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  color: var(--input-text, #ddd); background: var(--comfy-input-bg, #222); pointer-events: auto; }
.fp16lr-panel:empty { display: none; }
.fp16lr-line { white-space: pre-wrap; overflow-wrap: anywhere; min-height: 16px; }
.fp16lr-line.fp16lr-head { font-weight: bold; }
.fp16lr-line.fp16lr-error { color: #ff7b72; }
.fp16lr-line.fp16lr-key { white-space: pre; overflow: hidden; text-overflow: ellipsis; }
.fp16lr-line[title] { cursor: help; }
.fp16lr-line.fp16lr-sub { padding-left: 2ch; }
.fp16lr-bar { height: 6px; margin: 2px 0 4px; border-radius: 3px; background: rgba(127,127,127,.25); }
.fp16lr-bar > div { height: 100%; border-radius: 3px; background: #4c9be8; transition: width .2s; }
.fp16lr-chart { display: block; width: 100%; height: ${CHART_PX - 6}px; margin: 3px 0; }
.fp16lr-section + .fp16lr-section { margin-top: 6px; }
.fp16lr-panel.fp16lr-vue { margin: 0 16px; height: auto !important; }
`;
  document.head.appendChild(style);
}

/** The root graph: `app.rootGraph` where the frontend has it (`app.graph` is deprecated there). */
function rootGraph() {
  return app.rootGraph ?? app.graph;
}

/** The node of an execution id ("12", or "3:12" for a node inside subgraph node 3). */
function nodeByExecutionId(executionId) {
  let graph = rootGraph();
  const parts = String(executionId).split(":");
  for (let i = 0; i < parts.length && graph; i++) {
    const node = graph.getNodeById?.(parts[i]) ?? graph.getNodeById?.(Number(parts[i]));
    if (i === parts.length - 1) return node ?? null;
    graph = node?.subgraph;
  }
  return null;
}

function executionIdOf(node) {
  return node.fp16lrExecutionId ?? String(node.id);
}

function hasPanel(node) {
  return !!node && (NODE_TYPES.has(node.type) || NODE_TYPES.has(node.comfyClass));
}

function themeColor(el, name, fallback) {
  const v = getComputedStyle(el).getPropertyValue(name).trim();
  return v || fallback;
}

function drawChart(canvas, ratios, label) {
  const width = Math.max(60, Math.round(canvas.clientWidth || 280));
  const height = Math.max(40, Math.round(canvas.clientHeight || CHART_PX - 6));
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * dpr);
  canvas.height = Math.round(height * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const m = chartModel(ratios, { width, height, padLeft: 34, padRight: 4, padTop: 5, padBottom: 12 });
  const fg = themeColor(canvas, "--descrip-text", "#999");
  ctx.font = "9px ui-monospace, monospace";
  ctx.fillStyle = fg;
  ctx.textBaseline = "middle";
  ctx.textAlign = "right";
  for (const t of m.ticks) ctx.fillText(t.label, 30, t.y);
  ctx.strokeStyle = "rgba(127,127,127,.35)";
  ctx.lineWidth = 1;
  ctx.strokeRect(34.5, 5.5, width - 38, height - 17);
  // RTN reference
  ctx.strokeStyle = "rgba(232,163,60,.8)";
  ctx.setLineDash([4, 3]);
  ctx.beginPath();
  ctx.moveTo(34, m.refY);
  ctx.lineTo(width - 4, m.refY);
  ctx.stroke();
  ctx.setLineDash([]);
  for (const c of m.columns) {
    // better than RTN green, worse orange, equal (e.g. BF16 sources, exact in fp16) neutral
    ctx.strokeStyle = c.clipped ? "#ff7b72" : c.mean < 0.9995 ? "#5cc27a" : c.mean > 1.0005 ? "#e8a33c" : "#8fb3d9";
    ctx.lineWidth = Math.max(1, Math.min(3, (width - 38) / Math.max(1, m.columns.length) - 0.5));
    ctx.beginPath();
    ctx.moveTo(c.x, c.yBottom + 1.5);
    ctx.lineTo(c.x, c.yTop - 1.5);
    ctx.stroke();
  }
  ctx.textAlign = "left";
  ctx.textBaseline = "alphabetic";
  ctx.fillStyle = fg;
  ctx.fillText(`${label} · ${m.better}/${m.finite} better`, 36, height - 2);
  canvas.dataset.columns = String(m.columns.length);
  canvas.dataset.label = label;
}

/** The panel of one node: a DOM element, the widget that hosts it, and its rendering of a panel state. */
class Panel {
  constructor(node) {
    injectStyle();
    this.node = node;
    this.element = document.createElement("div");
    this.element.className = "fp16lr-panel";
    this.height = 0;
    this.text = "";
    this.charts = [];
    this.widget = node.addDOMWidget(WIDGET_NAME, WIDGET_NAME, this.element, {
      serialize: false,
      hideOnZoom: true,
      getValue: () => this.text,
      setValue: () => {},
      getMinHeight: () => this.height,
      getMaxHeight: () => this.height,
      margin: 6,
    });
    this.widget.serialize = false; // never part of widgets_values: saved workflows keep their positions
    this.resizeObserver = new ResizeObserver(() => this.redrawCharts());
    this.resizeObserver.observe(this.element);
  }

  render(state) {
    const sections = panelSections(state);
    const el = this.element;
    el.replaceChildren();
    this.charts = [];
    let height = 0;
    const perLine = this.charsPerLine();
    el.dataset.phase = state?.phase ?? "idle";
    el.dataset.fp16lrNode = executionIdOf(this.node); // not at construction: nodeCreated runs before the id is set
    for (const section of sections) {
      const box = document.createElement("div");
      box.className = "fp16lr-section";
      section.lines.forEach((line, i) => {
        const div = document.createElement("div");
        const isKey = i === section.keyAt; // the live key: one line, shortened, whole on hover
        div.className = "fp16lr-line" + (i === 0 ? " fp16lr-head" : "") + (section.error && i === 0 ? " fp16lr-error" : "") +
          (isKey ? " fp16lr-key" : "");
        const sub = /^ {2}\S/.test(line); // an indented line keeps its indent when it wraps
        if (sub) div.classList.add("fp16lr-sub");
        div.textContent = sub ? line.slice(2) : line;
        const tip = isKey ? section.event.key : section.tips?.[i];
        if (tip) div.title = tip;
        box.appendChild(div);
        height += LINE_PX * (isKey ? 1 : Math.max(1, Math.ceil(line.length / perLine)));
        if (section.event && i === 0) {
          const bar = document.createElement("div");
          bar.className = "fp16lr-bar";
          const fill = document.createElement("div");
          fill.style.width = `${(progressFraction(section.event) * 100).toFixed(1)}%`;
          bar.appendChild(fill);
          box.appendChild(bar);
          height += 12;
        }
        const series = section.report ? chartSeries(section.report) : null;
        if (series && i === section.chartAt - 1 && series.ratios.length) {
          const canvas = document.createElement("canvas");
          canvas.className = "fp16lr-chart";
          box.appendChild(canvas);
          this.charts.push([canvas, series.ratios, series.label]);
          height += CHART_PX;
        }
      });
      el.appendChild(box);
      height += 6;
    }
    this.text = panelLines(state).join("\n");
    el.dataset.text = this.text;
    this.height = sections.length ? height + 8 + 2 * (this.widget.margin ?? 6) : 0;
    this.attachToVueNode();
    this.redrawCharts();
    this.fitNode();
    this.measureSoon();
  }

  /** Characters of the 11 px monospace font per panel line at the node's width (for the wrapped height). */
  charsPerLine() {
    charWidth ??= measureCharWidth();
    const inner = Math.max(MIN_WIDTH, this.node.size?.[0] ?? MIN_WIDTH) - 2 * (this.widget.margin ?? 6) - PAD_PX;
    return Math.max(20, Math.floor(inner / charWidth));
  }

  /** Once laid out, the element's real height replaces the estimate (wrapping depends on the font and width). */
  measureSoon() {
    requestAnimationFrame(() => {
      const el = this.element;
      if (!el.isConnected || !this.height || el.classList.contains("fp16lr-vue")) return;
      const content = [...el.children].reduce((h, c) => h + c.getBoundingClientRect().height, 0);
      const scale = el.getBoundingClientRect().width / Math.max(1, el.offsetWidth || 1) || 1; // canvas zoom
      const measured = Math.ceil(content / scale) + 8 + 6 * Math.max(0, el.children.length - 1) + 2 * (this.widget.margin ?? 6);
      if (content > 0 && Math.abs(measured - this.height) > LINE_PX / 2) {
        this.height = measured;
        this.fitNode();
      }
    });
  }

  /**
   * Where the frontend does not mount this DOM widget inside a Vue node itself, put the panel at the end of the
   * node's body (again, if Vue re-created it). Detected, not assumed: a panel found inside its Vue node without our
   * help means this frontend mounts DOM widgets itself, and nothing is ever moved from then on.
   */
  attachToVueNode() {
    if (!isVueNodesMode()) {
      if (this.element.dataset.fp16lrMount === "moved") this.element.classList.remove("fp16lr-vue");
      return;
    }
    const id = CSS.escape(String(this.node.id));
    const vueNode = document.querySelector(`.lg-node[data-node-id="${id}"]`);
    if (!vueNode) return; // not mounted (yet): the interval looks again
    if (vueNode.contains(this.element)) {
      if (this.element.dataset.fp16lrMount !== "moved") {
        frontendMountsDomWidgets = true;
        this.element.dataset.fp16lrMount = "frontend";
        this.element.classList.add("fp16lr-vue");
      }
      return;
    }
    if (frontendMountsDomWidgets) return;
    // give the frontend one look to mount it itself before moving it
    if (!this.missedOnce) {
      this.missedOnce = true;
      return;
    }
    const body = vueNode.querySelector(`[data-testid="node-body-${id}"]`);
    if (!body) return;
    // Vue reuses the element of a node with the same id from the graph shown before: drop that node's panel
    for (const other of body.querySelectorAll(":scope > .fp16lr-panel")) other.remove();
    this.element.classList.add("fp16lr-vue");
    this.element.dataset.fp16lrMount = "moved";
    body.appendChild(this.element);
    this.redrawCharts();
  }

  redrawCharts() {
    for (const [canvas, ratios, label] of this.charts) if (canvas.isConnected) drawChart(canvas, ratios, label);
  }

  fitNode() {
    const node = this.node;
    const wanted = node.computeSize?.();
    const width = this.height > 0 ? Math.max(node.size[0], MIN_WIDTH) : node.size[0];
    if (wanted && node.size && (Math.abs(node.size[1] - wanted[1]) > 1 || width !== node.size[0])) {
      node.setSize([Math.max(width, wanted[0]), wanted[1]]);
    }
    node.setDirtyCanvas?.(true, true);
    rootGraph()?.setDirtyCanvas?.(true, true);
  }

  remove() {
    this.resizeObserver.disconnect();
    if (this.element.dataset.fp16lrMount === "moved") this.element.remove(); // only what we moved; DOM widgets clean up themselves
  }
}

let charWidth = null;
let frontendMountsDomWidgets = false;

function measureCharWidth() {
  const ctx = document.createElement("canvas").getContext("2d");
  ctx.font = "11px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace";
  return ctx.measureText("0123456789").width / 10 || 6.6;
}

function isVueNodesMode() {
  return !!globalThis.LiteGraph?.vueNodesMode;
}

// Vue nodes mount lazily (and again after collapsing, zooming out, reloading): re-attach panels that have content,
// only while this frontend has not shown that it mounts DOM widgets itself.
setInterval(() => {
  if (!isVueNodesMode() || frontendMountsDomWidgets) return;
  for (const node of rootGraph()?.nodes ?? []) if (node.fp16lrPanel?.text) node.fp16lrPanel.attachToVueNode();
}, 1000);

function panelOf(node) {
  if (!node.fp16lrPanel) node.fp16lrPanel = new Panel(node);
  return node.fp16lrPanel;
}

/** Apply a message to the state of `executionId` and show it on the node if the node is in the graph. */
function apply(executionId, kind, payload) {
  const id = String(executionId);
  const before = states.get(id);
  const after = nextPanelState(before, { kind, payload });
  if (after === before) return;
  states.set(id, after);
  const node = nodeByExecutionId(id);
  if (hasPanel(node)) {
    node.fp16lrExecutionId = id;
    panelOf(node).render(after);
  }
}

function isBusy(executionId) {
  const s = states.get(String(executionId));
  return !!s && s.phase === "running";
}

function listen() {
  api.addEventListener("fp16lr.progress", ({ detail }) => detail?.node != null && apply(detail.node, "progress", detail));
  api.addEventListener("fp16lr.report", ({ detail }) => detail?.node != null && apply(detail.node, "report", detail));
  api.addEventListener("fp16lr.error", ({ detail }) => detail?.node != null && apply(detail.node, "error", detail));
  api.addEventListener("execution_start", ({ detail }) => {
    currentPromptId = detail?.prompt_id ?? null;
  });
  api.addEventListener("executing", ({ detail }) => {
    const id = typeof detail === "object" && detail !== null ? detail.node : detail;
    const node = id != null ? nodeByExecutionId(id) : null;
    if (hasPanel(node)) apply(id, "start", { prompt_id: currentPromptId, unit: BAR_UNITS[node.type] ?? BAR_UNITS[node.comfyClass] });
  });
  api.addEventListener("progress", ({ detail }) => {
    if (detail?.node != null && isBusy(detail.node)) apply(detail.node, "prepare", detail);
  });
  // fallbacks for a run stopped before the node could send fp16lr.error (nothing happens if it did)
  api.addEventListener("execution_interrupted", ({ detail }) => {
    if (detail?.node_id != null && isBusy(detail.node_id)) apply(detail.node_id, "error", { cancelled: true });
  });
  api.addEventListener("execution_error", ({ detail }) => {
    if (detail?.node_id != null && isBusy(detail.node_id)) {
      apply(detail.node_id, "error", { cancelled: false, message: detail.exception_message });
    }
  });
}

/**
 * After a page reload the frontend has no node outputs; the server's history still has the ui output of each run.
 * Restore the latest report of each converting node of this workflow (matched by workflow id and node type).
 */
async function restoreFromHistory() {
  const graph = rootGraph();
  const nodes = (graph?.nodes ?? graph?._nodes ?? []).filter(hasPanel);
  const pending = nodes.filter((n) => !states.has(executionIdOf(n)));
  if (!pending.length) return;
  let history;
  try {
    const response = await api.fetchApi(`/history?max_items=${HISTORY_ITEMS}`);
    if (!response.ok) return;
    history = await response.json();
  } catch {
    return; // no history (server restarted, offline): the panel simply stays empty
  }
  const workflowId = graph?.id;
  for (const item of Object.values(history)) {
    const prompt = item?.prompt;
    const workflow = prompt?.[3]?.extra_pnginfo?.workflow;
    if (!workflowId || workflow?.id !== workflowId) continue;
    for (const node of pending) {
      const id = executionIdOf(node);
      const reports = item.outputs?.[id]?.fp16lr_report;
      if (!Array.isArray(reports) || prompt?.[2]?.[id]?.class_type !== node.type) continue;
      if (states.get(id)?.phase === "running") continue;
      states.set(id, nextPanelState(null, { kind: "outputs", payload: { reports, prompt_id: prompt[1] } }));
    }
  }
  for (const node of pending) {
    const s = states.get(executionIdOf(node));
    if (s) panelOf(node).render(s);
  }
}

const extension = {
  name: EXTENSION_NAME,

  setup() {
    listen();
    sortPackTemplates(api, import.meta.url);
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODE_TYPES.has(nodeData?.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      const result = onExecuted?.apply(this, arguments);
      if (Array.isArray(output?.fp16lr_report)) {
        apply(executionIdOf(this), "outputs", { reports: output.fp16lr_report });
      }
      return result;
    };
    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      this.fp16lrPanel?.remove();
      return onRemoved?.apply(this, arguments);
    };
  },

  nodeCreated(node) {
    if (!hasPanel(node)) return;
    const panel = panelOf(node);
    const state = states.get(executionIdOf(node));
    if (state) panel.render(state);
  },

  // switching workflow tabs or loading a run from the queue: outputs the frontend already has
  onNodeOutputsUpdated(nodeOutputs) {
    for (const [id, output] of Object.entries(nodeOutputs ?? {})) {
      if (Array.isArray(output?.fp16lr_report)) apply(id, "outputs", { reports: output.fp16lr_report });
    }
  },

  async afterConfigureGraph() {
    await restoreFromHistory();
  },
};

// ComfyUI may serve web/ twice (WEB_DIRECTORY under the folder name and pyproject's [tool.comfy] web under the
// project name); registering the same extension name twice throws, so the second copy stays silent.
const REGISTERED = Symbol.for(EXTENSION_NAME);
if (!globalThis[REGISTERED]) {
  globalThis[REGISTERED] = true;
  app.registerExtension(extension);
}
