// The pack's example workflows in ComfyUI's template browser, in their intended order. The server lists a pack's
// workflows in directory order (ext4 returns names in hash order), and the browser shows them as listed; their file
// names start with "1.", "2.", "3.", so sorting them by name gives the order they are meant to be read in.
// Pure: the only ComfyUI object used is the `api` passed in.

/** The pack's folder name as ComfyUI serves this file: /extensions/<pack>/js/<file>.js. */
export function packName(moduleUrl) {
  const m = /\/extensions\/([^/]+)\//.exec(new URL(moduleUrl, "http://x/").pathname);
  return m ? decodeURIComponent(m[1]) : null;
}

// the first template's name: finds the pack's list when the folder is served under another name
export const FIRST_TEMPLATE = "1. Convert a FLUX model to scaled FP16, load it and sample";

/** Sort the pack's template names (numbers in names compare as numbers); other packs' lists stay as they are. */
export function sortTemplateMap(map, pack) {
  if (!map || typeof map !== "object") return map;
  const out = { ...map };
  for (const [key, names] of Object.entries(map)) {
    if (!Array.isArray(names) || (key !== pack && !names.includes(FIRST_TEMPLATE))) continue;
    out[key] = [...names].sort((a, b) => String(a).localeCompare(String(b), "en", { numeric: true }));
  }
  return out;
}

/** Wrap `api.getWorkflowTemplates` (where the frontend has it) so that the pack's templates come sorted. */
export function sortPackTemplates(api, moduleUrl) {
  const pack = packName(moduleUrl);
  const original = api?.getWorkflowTemplates;
  if (typeof original !== "function" || original.fp16lrSorted) return false;
  const wrapped = async function (...args) {
    return sortTemplateMap(await original.apply(this, args), pack);
  };
  wrapped.fp16lrSorted = true;
  api.getWorkflowTemplates = wrapped;
  return true;
}
