"""The web panel in ComfyUI's real frontend, driven by headless Chromium.

Runs when all of these are present, and skips otherwise:
- a server: COMFYUI_DIR (a ComfyUI checkout with .venv; a CPU server is started on a free port with a temporary
  --base-directory) or COMFYUI_URL with COMFYUI_BASE_DIR (a running server with this pack; the test writes its
  models under that base directory);
- `node` on PATH, Chromium at /usr/bin/chromium (Debian's package; FP16LR_CHROMIUM overrides), and playwright-core
  installed next to this file: `PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --prefix tests/e2e_browser`.

drive.mjs does the browser work (two converting nodes in one run, a reload, a cancel, the Vue node renderer) and
writes result.json and screenshots to FP16LR_WEB_ARTIFACTS (default: a pytest temporary folder); this file checks
what the panels showed against the nodes' JSON reports in the server's history.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse

import pytest
import torch

from quant_core.demo import flux_specs, write_model

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CHROMIUM = os.environ.get("FP16LR_CHROMIUM", "/usr/bin/chromium")
# BF16, ~440 tensors, ~0.4 GB: several seconds at num_iter 0 on two CPU cores (a 19 MB model converted
# in about a second once the CPU path stopped page-faulting fresh buffers, too fast to watch between tensors)
BIG = "fp16lr-web-bf16.safetensors"
SMALL = "fp16lr-web-fp32.safetensors"  # FP32, ~60 tensors, ~16 MB: real rounding error, learned rounding on


def _missing() -> str | None:
    if not (os.environ.get("COMFYUI_DIR") or (os.environ.get("COMFYUI_URL") and os.environ.get("COMFYUI_BASE_DIR"))):
        return "set COMFYUI_DIR, or COMFYUI_URL with COMFYUI_BASE_DIR"
    if shutil.which("node") is None:
        return "node is not installed"
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if not os.path.isdir(os.path.join(HERE, "node_modules", "playwright-core")):
        return "playwright-core missing: PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --prefix tests/e2e_browser"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=f"browser end-to-end: {_missing()}")


def _comfy_server_module():
    """The end-to-end suite's server helper (tests/e2e is not importable as a package from here)."""
    spec = importlib.util.spec_from_file_location("fp16lr_e2e_comfy_server", os.path.join(ROOT, "tests", "e2e", "comfy_server.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ComfyServer = _comfy_server_module().ComfyServer
    if os.environ.get("COMFYUI_URL"):
        yield ComfyServer(os.environ["COMFYUI_URL"], os.environ["COMFYUI_BASE_DIR"])
        return
    base = str(tmp_path_factory.mktemp("comfy-web-base"))
    srv = ComfyServer.start(os.environ["COMFYUI_DIR"], base)
    try:
        yield srv
    finally:
        srv.stop()
        if os.environ.get("FP16LR_KEEP_E2E") != "1":
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def models(server):
    folder = server.path("models", "diffusion_models")
    os.makedirs(folder, exist_ok=True)
    big, small = os.path.join(folder, BIG), os.path.join(folder, SMALL)
    if not os.path.exists(big):
        write_model(big, flux_specs(hidden=512, double_blocks=10, single_blocks=24, head_dim=64, context_dim=1024,
                                    vec_dim=256), torch.bfloat16, seed=3)
    if not os.path.exists(small):
        write_model(small, flux_specs(hidden=256, double_blocks=1, single_blocks=2, head_dim=64, context_dim=256,
                                      vec_dim=96), torch.float32, seed=5)
    deadline = time.time() + 60
    while time.time() < deadline:
        choices = server.get("/object_info/ScaledFP16Convert")["ScaledFP16Convert"]["input"]["required"]["model"][0]
        if f"diffusion_models/{BIG}" in choices and f"diffusion_models/{SMALL}" in choices:
            return f"diffusion_models/{BIG}", f"diffusion_models/{SMALL}"
        time.sleep(1)
    pytest.fail(f"the server does not list the test models; choices: {choices}")


@pytest.fixture(scope="module")
def drive(server, models, tmp_path_factory):
    """Run drive.mjs once for all tests of this module; returns (result, artifacts folder)."""
    out = os.environ.get("FP16LR_WEB_ARTIFACTS") or str(tmp_path_factory.mktemp("web-artifacts"))
    tag = str(int(time.time()))
    cmd = ["node", os.path.join(HERE, "drive.mjs"), "--url", server.url, "--out", out, "--big", models[0],
           "--small", models[1], "--small-iter", os.environ.get("FP16LR_WEB_NUM_ITER", "8"), "--tag", tag]
    p = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=1500)
    path = os.path.join(out, "result.json")
    assert p.returncode == 0 and os.path.exists(path), f"drive.mjs failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    with open(path) as f:
        result = json.load(f)
    result["tag"] = tag
    return result, out


def _step(drive, name):
    step = drive[0]["steps"][name]
    assert step["ok"], f"step {name} failed in the browser:\n{step.get('error')}"
    return step


def _ui_reports(server, prompt_id, node):
    """The node's JSON report as the server stored it with the run (its `ui` output)."""
    entry = server.get(f"/history/{prompt_id}")[prompt_id]
    return entry["outputs"][node]["fp16lr_report"]


_UNITS = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}


def _close(shown: float, actual: float, rel: float = 5e-3, abs_: float = 0.0) -> bool:
    return abs(shown - actual) <= max(rel * abs(actual), abs_)


def check_report_text(text: str, report: dict) -> None:
    """Every figure on the panel equals the JSON report's to the digits shown."""
    lines = text.split("\n")
    if report.get("up_to_date"):
        assert lines[0] == "Up to date: reused, nothing converted", lines[0]
    else:
        m = re.fullmatch(r"Done in (?:(\d+) s|(\d+) min (\d+) s|<1 s)", lines[0])
        assert m, lines[0]
        if m.group(1):
            assert int(m.group(1)) == round(report["seconds"])
    assert lines[1] == f"→ {report['output_name']}"
    if report.get("headline"):
        assert lines[2] == report["headline"].strip(), lines[2]
    else:
        m = re.fullmatch(r"stored as fp16 with per-tensor power-of-two scales; error vs plain fp16 cast: "
                         r"(same|([\d.]+) % (lower|higher))", lines[2])
        assert m, lines[2]
        r = report["error_ratio"]
        if m.group(1) == "same":
            assert abs(r - 1) < 5e-4
        else:
            assert _close(float(m.group(2)), abs(1 - r) * 100, rel=0, abs_=0.05) and (m.group(3) == "lower") == (r < 1)
    m = re.search(r"^tensors: (\d+) quantized · (\d+) kept · (\d+) removed$", text, re.M)
    assert m and [int(g) for g in m.groups()] == [report["counts"][k] for k in ("quantized", "kept", "removed")], text
    m = re.search(r"^size: ([\d.]+) (\w+)(?: in memory \(([\w +]+)\))? → ([\d.]+) (\w+)$", text, re.M)
    assert m, text
    assert _close(float(m.group(1)) * _UNITS[m.group(2)], report["bytes_in"])
    assert _close(float(m.group(4)) * _UNITS[m.group(5)], report["bytes_out"])
    assert (m.group(3) is not None) == ("source_in_memory" in report)
    m = re.search(r"^relF ([\d.e+-]+) vs RTN ([\d.e+-]+) \(([\d.]+)×\)$", text, re.M)
    assert m, text
    assert _close(float(m.group(1)), report["rel_error"])
    assert _close(float(m.group(2)), report["rtn_rel_error"])
    assert _close(float(m.group(3)), report["error_ratio"], rel=0, abs_=5e-4)
    m = re.search(r"^per tensor: (?:median ([\d.e+-]+) · )?worst ([\d.e+-]+)$", text, re.M)
    per = report.get("rel_error_per_tensor") or {}
    assert m, text
    assert _close(float(m.group(2)), per.get("worst", report["worst"][0]["rel_error"]))
    if per.get("median") is not None:
        assert m.group(1) and _close(float(m.group(1)), per["median"])
    m = re.search(r"^bit-exact \(BF16 source\): ([\d.]+) %$", text, re.M)
    if report["bit_exact_fraction_bf16"] is None:
        assert m is None, text
    else:
        assert m and _close(float(m.group(1)), report["bit_exact_fraction_bf16"] * 100, rel=0, abs_=5e-3), text
    learned = report.get("learned") or {}
    m = re.search(r"^learned rounding on (\d+) tensors(?: \(passes used ≤ (\d+) of num_iter (\d+)\))?:\n"
                  r"  top-(\d+) error(?: ([\d.e+-]+)× RTN(?: \(([^)]*)\))?|: (withheld.*)) · relF ([\d.]+)× RTN\n"
                  r"  the error along each weight's .* drops; the total stays at RTN's by design", text, re.M)
    if learned.get("topk_tensors"):
        assert m, text
        assert int(m.group(1)) == learned["topk_tensors"] and int(m.group(4)) == report["settings"]["top_k"]
        if learned.get("passes_used_max") is not None:
            assert int(m.group(2)) == learned["passes_used_max"] and int(m.group(3)) == report["settings"]["num_iter"]
        if m.group(7):
            assert m.group(7) == learned["topk_check"]
        else:
            assert _close(float(m.group(5)), learned["topk_ratio_mean"], rel=0.06, abs_=5e-4), (m.group(5), learned)
        assert _close(float(m.group(8)), report["error_ratio"], rel=0, abs_=5e-4)
    else:
        assert m is None, text
    m = re.search(r"^out\(randn\): ([\d.]+)× RTN \((\d+) rows, (\d+) tensors\)$", text, re.M)
    if learned.get("out_randn_tensors"):
        assert m, text
        assert int(m.group(2)) == report["settings"]["calib_samples"] == learned["out_randn_samples"]
        assert int(m.group(3)) == learned["out_randn_tensors"]
        assert _close(float(m.group(1)), learned["out_randn_ratio_mean"], rel=0, abs_=5e-5), (m.group(1), learned)
    else:
        assert m is None, text
    assert "worst tensors (relF, × RTN):" in lines
    worst = re.findall(r"^  (\S+) ([\d.e+-]+) \(([\d.]+)×\)$", text, re.M)
    assert len(worst) == min(3, len(report["worst"])), text
    for (key, rel, ratio), w in zip(worst, report["worst"]):
        assert key == w["key"], (key, w["key"])  # whole keys
        assert _close(float(rel), w["rel_error"])
        assert _close(float(ratio), w["error_ratio"], rel=0, abs_=5e-4)


def _converting(timeline):
    """(index, total, percent) of each distinct live text, in order."""
    out = []
    for e in timeline:
        m = re.match(r"Converting (\d+)/(\d+) · ([\d.]+) %", e["text"])
        if m:
            out.append((int(m.group(1)), int(m.group(2)), float(m.group(3))))
    return out


def test_extension_registered_once_and_console_clean(drive):
    result, _ = drive
    assert _step(drive, "run")["registered"] == ["comfyui-scaled-fp16.progress"]
    baseline = {c["text"] for c in result["baselineConsole"]}
    ours = [c for c in result["console"] if c["type"] in ("error", "pageerror") and c["text"] not in baseline]
    assert not ours, f"console errors beyond the frontend's own: {json.dumps(ours, indent=1)[:4000]}"
    mentioning = [c for c in result["console"] if re.search(r"fp16lr|scaled.fp16", c["text"] + c["url"], re.I)]
    assert not mentioning, mentioning
    assert not [h for h in result["httpErrors"] if "/extensions/" in h["url"]], result["httpErrors"]


def test_live_panel_changes_between_tensors(drive):
    run = _step(drive, "run")
    for node in run["nodes"].values():
        steps = _converting(run["timeline"][node])
        assert len(steps) >= 3, run["timeline"][node]
        indices = [i for i, _, _ in steps]
        assert indices == sorted(indices) and len(set(indices)) == len(indices), indices
        percents = [p for _, _, p in steps]
        assert percents == sorted(percents), percents
        assert len({t for _, t, _ in steps}) == 1
        live = [e["text"].split("\n") for e in run["timeline"][node] if e["text"].startswith("Converting")]
        assert all(len(lines) == 4 and "/s · ETA " in lines[2] and lines[3].startswith("last: ") for lines in live), live
        assert len({lines[1] for lines in live}) >= 3, "the tensor key changes"
    assert run["midShot"] and run["midShot"]["text"].startswith("Converting")


def test_final_report_matches_node_json(server, drive):
    run = _step(drive, "run")
    for node in run["nodes"].values():
        assert run["final"][node]["phase"] == "done"
        (report,) = _ui_reports(server, run["promptId"], node)
        check_report_text(run["final"][node]["text"], report)
        assert run["final"][node]["chartColumns"] and run["final"][node]["chartColumns"][0] > 0
        assert len(report["ratios"]) == len(report["topk_ratios"]) == report["counts"]["quantized"]
        # the chart shows the top-k ratio where the learned step worked (FP32), else the relF ratio (BF16)
        learned = report["learned"]["topk_tensors"]
        assert run["final"][node]["chartLabels"] == (
            [f"top-{report['settings']['top_k']} error ÷ RTN per tensor"] if learned else ["error ÷ RTN per tensor"])
    big = run["final"][run["nodes"]["big"]]["text"]
    assert "bit-exact (BF16 source)" in big
    assert "bit-exact" not in run["final"][run["nodes"]["small"]]["text"]


def test_report_survives_reload(drive):
    # the latest run of the graph before the reload is the re-queued one (up to date, the same report)
    run, again, reload = _step(drive, "run"), _step(drive, "requeue"), _step(drive, "reload")
    for node in run["nodes"].values():
        assert reload["after"][node]["text"] == again["final"][node]["text"]
        assert reload["after"][node]["chartColumns"] == run["final"][node]["chartColumns"]


def test_cancel_says_where_and_writes_nothing(server, drive):
    cancel = _step(drive, "cancel")
    assert cancel["final"]["phase"] == "error"
    m = re.match(r"Cancelled at tensor (\d+)/(\d+), no file written\.", cancel["final"]["text"])
    assert m, cancel["final"]["text"]
    done = _converting(cancel["timeline"][cancel["node"]])
    assert done and int(m.group(2)) == done[-1][1] and int(m.group(1)) >= done[-1][0]
    out_dir = server.path("output", "diffusion_models")
    leftovers = [f for f in os.listdir(out_dir) if f.startswith(cancel["outputName"])] if os.path.isdir(out_dir) else []
    assert not leftovers, leftovers


def test_requeued_graph_reuses_up_to_date_files_and_says_so(server, drive):
    run, again = _step(drive, "run"), _step(drive, "requeue")
    for node in run["nodes"].values():
        (report,) = _ui_reports(server, again["promptId"], node)
        assert report["up_to_date"] is True
        check_report_text(again["final"][node]["text"], report)
        (first,) = _ui_reports(server, run["promptId"], node)
        assert {k: v for k, v in report.items() if k != "up_to_date"} == first


def test_panel_lines_are_never_cut_and_carry_tooltips(drive):
    run = _step(drive, "run")
    for node in run["nodes"].values():
        final = run["final"][node]
        assert not final["cutLines"] and not final["clipped"], final
        assert final["tips"] >= len(final["text"].split("\n")) - 1


def test_vue_node_renderer_shows_the_whole_panel(server, drive):
    vue = _step(drive, "vue")
    assert vue["vueMode"] is True
    assert len(_converting(vue["timeline"][vue["node"]])) >= 3
    for node, final in ((vue["node"], vue["final"]), (vue["small"], vue["finalSmall"])):
        assert final["inVueNode"] and final["shown"]
        # mounted by the frontend itself where it does that, else moved there by the extension
        assert final["mount"] in ("frontend", "moved")
        assert not final["cutLines"], final["cutLines"]  # lines wrap instead of ending in "…"
        (report,) = _ui_reports(server, vue["promptId"], node)
        check_report_text(final["text"], report)


@pytest.fixture(scope="module", params=["canvas", "vue"])
def templates(request, server, drive):
    """templates.mjs on the same server: the template browser and each example workflow loaded from its card."""
    out = os.path.join(drive[1], f"templates-{request.param}")
    cmd = ["node", os.path.join(HERE, "templates.mjs"), "--url", server.url, "--out", out]
    if request.param == "vue":
        cmd.append("--vue")
    p = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=900)
    path = os.path.join(out, "templates.json")
    assert p.returncode == 0 and os.path.exists(path), f"templates.mjs failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    with open(path) as f:
        return json.load(f)


WORKFLOW_NAMES = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(ROOT, "example_workflows"))
                        if f.endswith(".json"))


def test_template_browser_shows_titles_thumbnails_in_order(templates):
    assert sorted(templates["served"][templates["pack"]]) == WORKFLOW_NAMES
    cards = templates["cards"]
    assert [c["name"] for c in cards] == WORKFLOW_NAMES  # 1., 2., 3.: the intended order
    for card in cards:
        thumb = card["thumbnail"]
        # our 1280 px picture, not the frontend's placeholder (the frontend may show it from a blob: cache), read
        # while the card is in view: frontend 1.27.10 unloads a thumbnail whose card left the view (templates.mjs)
        assert thumb and thumb["loaded"] and thumb["width"] == 1280, card
        requested = [r for r in templates["thumbnailRequests"]
                     if urllib.parse.unquote(r["url"]).endswith(f"/{card['name']}.jpg")]
        assert requested and all(r["status"] == 200 for r in requested), (card["name"], templates["thumbnailRequests"])
    # no failed request for a template file, no page error from this pack's code (the frontend logs its own)
    assert not [c for c in templates["console"] if c["type"] == "http"], templates["console"]
    assert not [c for c in templates["console"] if re.search(r"fp16lr|scaled.fp16", c.get("stack", ""), re.I)], \
        templates["console"]


def test_loaded_templates_show_their_note_and_the_converter_title(templates):
    assert sorted(templates["workflows"]) == WORKFLOW_NAMES
    for name, wf in templates["workflows"].items():
        assert wf["clicked"], f"{name}: no card to click"
        assert wf["noteText"].startswith("Files this workflow expects"), name
        assert wf["noteTitle"]["visible"], (name, wf["noteTitle"])
        assert wf["converterTitle"]["visible"], (name, wf["converterTitle"])  # not under the tab bar/breadcrumb


def _e2e_models_module():
    spec = importlib.util.spec_from_file_location("fp16lr_e2e_models", os.path.join(ROOT, "tests", "e2e", "models.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CLIP = "fp16lr-web-clip_l.safetensors"  # CLIP-L key names and shapes, fp16, random: what CLIPLoader loads as SD1's


@pytest.fixture(scope="module")
def capture_page(server, tmp_path_factory):
    """capture_link.mjs once: the links between the capture and converting nodes, then a capture from prompts run
    from the Run button with the panel recorded, and a cancelled one."""
    folder = server.path("models", "text_encoders")
    os.makedirs(folder, exist_ok=True)
    if not os.path.exists(os.path.join(folder, CLIP)):
        _e2e_models_module().write_clip_l(os.path.join(folder, CLIP))
    deadline = time.time() + 60
    while CLIP not in server.get("/object_info/CLIPLoader")["CLIPLoader"]["input"]["required"]["clip_name"][0]:
        assert time.time() < deadline, "the server does not list the test CLIP"
        time.sleep(1)
    out = os.path.join(os.environ.get("FP16LR_WEB_ARTIFACTS") or str(tmp_path_factory.mktemp("capture")), "capture")
    p = subprocess.run(["node", os.path.join(HERE, "capture_link.mjs"), "--url", server.url, "--out", out,
                        "--clip", CLIP, "--clip-type", "stable_diffusion"], cwd=HERE, capture_output=True,
                       text=True, timeout=1200)
    path = os.path.join(out, "capture_link.json")
    assert p.returncode == 0 and os.path.exists(path), f"capture_link.mjs failed:\n{p.stdout}\n{p.stderr}"
    with open(path) as f:
        return json.load(f)


def test_capture_outputs_link_into_calibration_override(capture_page):
    """In the real frontend, each capture node's `calibration` output links into the converting nodes'
    `calibration_override` (a LATENT is refused there), and the Queue button's serialisation carries the link."""
    r = capture_page
    assert all(s["inputType"] == "STRING" for s in r["slots"]), r["slots"]
    assert r["promptsToConvert"] and r["promptsToSaveClip"] and r["samplingToSaveModel"] and r["latentRefused"], r
    ids, ser = r["ids"], r["serialised"]
    assert ser[ids["convert"]]["calibration_override"] == [ids["prompts"], 0]
    assert ser[ids["saveClip"]]["calibration_override"] == [ids["prompts"], 0]
    assert ser[ids["saveModel"]]["calibration_override"] == [ids["sampling"], 0]
    assert not [e for e in r["errors"] if re.search(r"fp16lr|scaled.fp16", e, re.I)], r["errors"]


def _count(text: str) -> int:
    return int(text.replace(",", ""))


def check_capture_text(text: str, s: dict) -> None:
    """Every figure of a capture node's panel equals its summary's, to the digits shown."""
    lines = text.split("\n")
    m = re.fullmatch(r"Captured in (?:(\d+) s|(\d+) min (\d+) s|<1 s)", lines[0])
    assert m, lines[0]
    if m.group(1):
        assert int(m.group(1)) == round(s["seconds"])
    assert lines[1] == f"→ {s['output_name']}"
    src = s["source"]
    held = f" + {src['held_out_prompts']} held-out" if src["held_out_prompts"] else ""
    assert lines[2] == f"from {src['prompts']} prompts{held} · {src['encoder']} encoder", lines[2]
    assert lines[3] == f"layers: {s['layers']} recorded, {s['groups']} input groups", lines[3]
    m = re.fullmatch(r"rows kept per layer: ([\d,]+)(?:–([\d,]+))?(?: \(asked ([\d,]+)\))? · exact in (\d+)/(\d+) groups",
                     lines[4])
    assert m, lines[4]
    assert _count(m.group(1)) == s["rows_kept_min"] and _count(m.group(2) or m.group(1)) == s["rows_kept_max"]
    assert (m.group(3) is not None) == (s["rows"] < s["rows_requested"])
    assert m.group(3) is None or _count(m.group(3)) == s["rows_requested"]
    assert (int(m.group(4)), int(m.group(5))) == (s["exact_groups"], s["groups"])
    m = re.fullmatch(r"tokens: ([\d,]+) fit · ([\d,]+) check · ([\d,]+) held-out", lines[5])
    assert m and [_count(g) for g in m.groups()] == [s["tokens_fit"], s["tokens_check"], s["tokens_held_out"]]
    m = re.fullmatch(r"file: ([\d.]+) (B|kB|MB|GB) \(budget ([\d.]+) (B|kB|MB|GB)\)", lines[6])
    assert m, lines[6]
    assert _close(float(m.group(1)) * _UNITS[m.group(2)], s["bytes"], rel=5e-3)
    assert _close(float(m.group(3)) * _UNITS[m.group(4)], s["budget_bytes"], rel=5e-3)
    assert lines[7:] == [f"note: {n}" for n in s["notes"]]


def test_capture_node_panel_shows_progress_then_the_summary_of_the_file(server, capture_page):
    cap = capture_page["capture"]
    final = cap["final"]
    assert final["phase"] == "done" and final["shown"], final
    # live: prompt i of 14 (12 + 2 held-out), the counter and the bar only moving forward
    live = [e for e in cap["timeline"] if e["text"].startswith("Capturing")]
    assert live, cap["timeline"]
    seen = [int(re.match(r"Capturing (?:held-out )?prompt (\d+)/14 · ", e["text"]).group(1)) for e in live]
    assert seen == sorted(seen) and seen[-1] <= 14
    # done: the summary, every figure as the server stored it (ui output) and as the file is
    (summary,) = _ui_reports(server, cap["promptId"], cap["node"])
    for e in live:
        assert re.search(r"\ntokens recorded: [\d,]+", e["text"]), e["text"]
        assert f"recording {summary['layers']} Linear layers of clip_l" in e["text"], e["text"]
    check_capture_text(final["text"], summary)
    path = server.path("models", "scaled_fp16_calibration", summary["output_name"])
    assert summary["bytes"] == os.path.getsize(path) and summary["bytes"] < summary["budget_bytes"] == 5 * 10 ** 7
    assert summary["notes"], summary  # 512 rows per layer do not fit 0.05 GB
    assert not final["cutLines"] and not final["clipped"], final
    assert all(final["tips"]), final["tips"]  # every line explains itself on hover


def test_capture_node_cancel_shows_where_it_stopped_and_leaves_no_file(server, capture_page):
    cancel = capture_page["cancel"]
    assert cancel["interrupted"] and cancel["final"]["phase"] == "error", cancel["final"]
    m = re.fullmatch(r"Cancelled at prompt (\d+)/400, no file written\.", cancel["final"]["text"])
    assert m and int(m.group(1)) < 400, cancel["final"]["text"]
    folder = server.path("models", "scaled_fp16_calibration")
    assert not [f for f in os.listdir(folder) if f.startswith("fp16lr-web-capture-cancelled")], os.listdir(folder)
