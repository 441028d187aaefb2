import assert from "node:assert/strict";
import { readdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

import { FIRST_TEMPLATE, packName, sortPackTemplates, sortTemplateMap } from "../js/fp16lr_templates.js";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const names = readdirSync(join(ROOT, "example_workflows")).filter((f) => f.endsWith(".json")).map((f) => f.slice(0, -5));

test("the pack's folder name comes from the URL ComfyUI serves the extension under", () => {
  assert.equal(packName("http://127.0.0.1:8188/extensions/comfyui-scaled-fp16/js/fp16lr_progress.js"), "comfyui-scaled-fp16");
  assert.equal(packName("http://h/extensions/my%20pack/js/x.js"), "my pack");
  assert.equal(packName("file:///somewhere/web/js/x.js"), null);
});

test("the pack's templates are sorted by their numbered names, other packs' lists are untouched", () => {
  assert.ok(names.includes(FIRST_TEMPLATE));
  const shuffled = [...names].reverse();
  const other = ["b", "a"];
  const sorted = sortTemplateMap({ "comfyui-scaled-fp16": shuffled, other }, "comfyui-scaled-fp16");
  assert.deepEqual(sorted["comfyui-scaled-fp16"], [...names].sort());
  assert.equal(sorted["comfyui-scaled-fp16"][0], FIRST_TEMPLATE);
  assert.deepEqual(sorted.other, ["b", "a"]);
  // served under another folder name: found by the first template's name
  assert.deepEqual(sortTemplateMap({ renamed: shuffled }, "x").renamed[0], FIRST_TEMPLATE);
  assert.deepEqual(sortTemplateMap({ n: ["10. x", "2. y"] }, "n").n, ["2. y", "10. x"]);
});

test("getWorkflowTemplates is wrapped once, where the frontend has it", async () => {
  const api = { calls: 0, async getWorkflowTemplates() { this.calls += 1; return { p: ["3. c", "1. a", "2. b"] }; } };
  assert.equal(sortPackTemplates(api, "http://h/extensions/p/js/x.js"), true);
  assert.equal(sortPackTemplates(api, "http://h/extensions/p/js/x.js"), false);
  assert.deepEqual((await api.getWorkflowTemplates()).p, ["1. a", "2. b", "3. c"]);
  assert.equal(api.calls, 1);
  assert.equal(sortPackTemplates({}, "http://h/extensions/p/js/x.js"), false);
});
