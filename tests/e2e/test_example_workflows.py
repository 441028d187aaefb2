"""The example workflows on the real server: they load without missing nodes or widget errors, and workflow 1
queued again (another seed, and after a restart) reuses its converted file instead of refusing or converting again.

The browser checks the same things when it loads a workflow: every node type is known (`/object_info`), each node's
`widgets_values` has one value per widget in declaration order (plus the seed's control value) and every value fits
its widget, and every link joins an output to an input of the same type. Then the workflow is posted in API format:
the server's own validation may only complain about model files this test server does not have.
"""

import glob
import json
import os
import re
import time

import pytest

from .comfy_server import PACK_ROOT, PromptFailed
from .conftest import model_dir
from .models import write_flux

WORKFLOWS = sorted(glob.glob(os.path.join(PACK_ROOT, "example_workflows", "*.json")))
# nodes the frontend draws but never sends to the server
FRONTEND_ONLY = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = ("seed", "noise_seed")
FILE_INPUTS = {"model", "unet_name", "clip_name", "clip_name1", "clip_name2", "ckpt_name", "vae_name", "lora_name"}


def widgets_of(info: dict) -> list[tuple[str, object, dict]]:
    """(name, type, options) of each widget in the order the frontend creates them."""
    out = []
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            typ, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            if isinstance(typ, list):
                typ, opts = "COMBO", {**opts, "options": typ}
            if typ not in WIDGET_TYPES or opts.get("forceInput"):
                continue
            out.append((name, typ, opts))
            if typ == "INT" and (name in SEED_NAMES or opts.get("control_after_generate")):
                out.append(("control_after_generate", "CONTROL", {}))
    return out


def check_value(name, typ, opts, value) -> str | None:
    if typ == "CONTROL":
        return None if value in ("fixed", "increment", "decrement", "randomize") else f"bad control {value!r}"
    if typ == "BOOLEAN":
        return None if isinstance(value, bool) else f"{name}: {value!r} is not a boolean"
    if typ == "STRING":
        return None if isinstance(value, str) else f"{name}: {value!r} is not a string"
    if typ in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (typ == "INT" and value != int(value)):
            return f"{name}: {value!r} is not {typ}"
        if "min" in opts and value < opts["min"] or "max" in opts and value > opts["max"]:
            return f"{name}: {value} outside [{opts.get('min')}, {opts.get('max')}]"
        return None
    if typ == "COMBO":
        if name in FILE_INPUTS:  # file lists depend on the user's models folder
            return None if isinstance(value, str) and value.endswith(".safetensors") else f"{name}: {value!r}"
        return None if value in opts["options"] else f"{name}: {value!r} not in {opts['options']}"
    return f"{name}: unknown widget type {typ}"


def to_api(workflow: dict, info: dict) -> dict:
    links = {row[0]: row for row in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        inputs = {}
        values = iter(node["widgets_values"])
        for name, _, _ in widgets_of(info[node["type"]]):
            value = next(values)
            if name != "control_after_generate":
                inputs[name] = value
        for slot in node["inputs"]:
            if slot.get("link") is not None:
                row = links[slot["link"]]
                inputs[slot["name"]] = [str(row[1]), row[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


@pytest.fixture(scope="module")
def info(comfy):
    return comfy.object_info()


def test_example_workflows_with_readable_titles_thumbnails_and_notes():
    """The template browser shows a pack's workflow file names as titles and `<name>.jpg` as thumbnails."""
    names = [os.path.splitext(os.path.basename(w))[0] for w in WORKFLOWS]
    assert names == ["1. Convert a FLUX model to scaled FP16, load it and sample",
                     "2. Convert a T5XXL text encoder and load it beside CLIP-L",
                     "3. Apply a LoRA and save the model as scaled FP16",
                     "4. Calibrate T5XXL on your prompts, convert it and load it beside CLIP-L",
                     "5. Apply a LoRA, calibrate on a sampling run and save the model as scaled FP16"]
    for path, name in zip(WORKFLOWS, names):
        thumb = os.path.splitext(path)[0] + ".jpg"
        with open(thumb, "rb") as f:
            assert f.read(3) == b"\xff\xd8\xff", f"{thumb} is not a JPEG"
        with open(path) as f:
            workflow = json.load(f)
        assert workflow["extra"]["title"] == name
        notes = [n for n in workflow["nodes"] if n["type"] == "Note"]
        assert len(notes) == 1, "one note saying which files the workflow expects"
        text = notes[0]["widgets_values"][0]
        # every file a node of the workflow picks is named in the note, with its folder
        for node in workflow["nodes"]:
            if node["type"] in FRONTEND_ONLY:
                continue
            for value in node["widgets_values"]:
                if isinstance(value, str) and value.endswith(".safetensors"):
                    assert os.path.basename(value) in text, (name, value)
        assert re.search(r"output/(diffusion_models|clip)/\S+\.safetensors", text), text


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_workflow_loads_without_missing_nodes_or_widget_errors(comfy, info, path):
    with open(path) as f:
        workflow = json.load(f)
    missing = sorted({n["type"] for n in workflow["nodes"] if n["type"] not in info and n["type"] not in FRONTEND_ONLY})
    assert not missing, f"missing node types: {missing}"
    problems = []
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        widgets = widgets_of(info[node["type"]])
        values = node["widgets_values"]
        if len(values) != len(widgets):
            problems.append(f"node {node['id']} {node['type']}: {len(values)} widget values for "
                            f"{[w[0] for w in widgets]}")
            continue
        problems += [f"node {node['id']} {node['type']}: {p}" for (n, t, o), v in zip(widgets, values)
                     if (p := check_value(n, t, o, v))]
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, typ in workflow["links"]:
        out_type = info[nodes[src]["type"]]["output"][src_slot]
        in_name = nodes[dst]["inputs"][dst_slot]["name"]
        spec = {**info[nodes[dst]["type"]]["input"].get("required", {}),
                **info[nodes[dst]["type"]]["input"].get("optional", {})}[in_name]
        if not (out_type == typ == spec[0]):
            problems.append(f"link {link_id}: {out_type} -> {in_name} ({spec[0]}), stored as {typ}")
    assert not problems, "\n".join(problems)

    # the server's own validation: only model files this test server lacks may be reported
    try:
        comfy.post("/prompt", {"prompt": to_api(workflow, info), "client_id": comfy.client_id})
    except PromptFailed as e:
        body = json.loads(str(e).split(": ", 2)[2])
        errors = [err for node_errors in body.get("node_errors", {}).values() for err in node_errors["errors"]]
        assert errors, body
        bad = [err for err in errors if not (err["type"] == "value_not_in_list"
                                             and err["extra_info"]["input_name"] in FILE_INPUTS)]
        assert not bad, json.dumps(bad, indent=1)
    else:
        comfy.interrupt()
        pytest.fail("the example expects model files a test server does not have; it was queued instead")


def _workflow_1_on_test_models(info: dict, seed: int) -> dict:
    """Workflow 1 as the browser would queue it, with the parts this server has no model files for (text encoders,
    VAE) replaced by the test pack's conditioning and tensor saver, and a small latent in 2 steps."""
    with open(WORKFLOWS[0]) as f:
        prompt = to_api(json.load(f), info)
    assert prompt["1"]["class_type"] == "ScaledFP16Convert" and prompt["2"]["inputs"]["unet_name_override"] == ["1", 0]
    for node_id in ("3", "10", "14", "15", "16"):
        del prompt[node_id]
    prompt["10"] = {"class_type": "FP16LRTestConditioning",
                    "inputs": {"seed": 7, "tokens": 8, "width": 4096, "pooled": 768, "guidance": 3.5}}
    prompt["11"]["inputs"]["conditioning"] = ["10", 0]
    prompt["12"]["inputs"].update(width=64, height=64)
    prompt["13"]["inputs"].update(seed=seed, steps=2)
    prompt["16"] = {"class_type": "FP16LRTestSaveTensors", "inputs": {"filename": f"wf1_seed{seed}",
                                                                      "latent": ["13", 0]}}
    return prompt


def test_workflow_1_queued_again_and_after_restart_converts_once(comfy, info):
    """Queue workflow 1, again with another seed, and once more after a server restart: all three succeed, the
    model is converted once; the later runs return the up-to-date file and its stored report."""
    if comfy.process is None:
        pytest.skip("needs a server the test starts (COMFYUI_DIR): it restarts it")
    source = os.path.join(model_dir(comfy, "diffusion_models"), "flux1-dev.safetensors")  # the name workflow 1 uses
    if not os.path.exists(source):
        write_flux(source)
    saved = comfy.path("output", "diffusion_models", "flux1-dev_float16_scaled_learned_svd.safetensors")
    for leftover in (saved, saved + ".report.json"):
        if os.path.exists(leftover):
            os.remove(leftover)

    reports, tensor_events, latents, seconds = [], [], [], []
    for run, seed in enumerate((1, 2, 3)):
        if run == 2:
            comfy.restart()
        comfy.events.clear()
        t = time.time()
        entry = comfy.run(_workflow_1_on_test_models(info, seed))
        seconds.append(time.time() - t)
        (report,) = entry["outputs"]["1"]["fp16lr_report"]
        reports.append(report)
        tensor_events.append(len(comfy.events.of_type("fp16lr.progress")))
        latents.append(os.stat(comfy.path("output", f"wf1_seed{seed}.safetensors")).st_mtime_ns)
        if run == 0:
            stat = os.stat(saved)
        assert os.stat(saved).st_mtime_ns == stat.st_mtime_ns and os.stat(saved).st_size == stat.st_size

    print(f"\nworkflow 1, seconds per run (convert+sample, again, after restart): "
          f"{', '.join(f'{x:.1f}' for x in seconds)}; tensor events {tensor_events}")
    n = reports[0]["counts"]["quantized"] + reports[0]["counts"]["kept"]
    assert tensor_events == [n, 0, 0], tensor_events  # one conversion
    assert "up_to_date" not in reports[0] and reports[1]["up_to_date"] is True and reports[2]["up_to_date"] is True
    strip = lambda r: {k: v for k, v in r.items() if k != "up_to_date"}  # noqa: E731
    assert strip(reports[1]) == strip(reports[2]) == reports[0]
    with open(comfy.log_path, errors="replace") as f:
        log = f.read()
    # the host logs start-up tracebacks of its own (audio nodes without torchaudio): only ours count
    ours = [block for block in log.split("Traceback (most recent call last)")[1:]
            if "scaled-fp16" in block.split("\n\n")[0] or "scaled_fp16" in block.split("\n\n")[0]]
    assert not ours, ours
    assert not [line for line in log.splitlines() if line.startswith("WARNING: ") and "safetensors" in line]


def _error_of(entry: dict) -> dict:
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors, entry["status"]
    return errors[0]


def test_user_errors_read_cleanly_and_leave_no_traceback_in_the_log(comfy, info):
    """A bad output name, an existing file made from something else and a damaged model file: one-line messages under
    a clean class name; the server log shows the line, no traceback and no IS_CHANGED warning."""
    source = os.path.join(model_dir(comfy, "diffusion_models"), "flux1-dev.safetensors")
    if not os.path.exists(source):
        write_flux(source)
    taken = comfy.path("output", "diffusion_models", "taken-by-another.safetensors")
    os.makedirs(os.path.dirname(taken), exist_ok=True)
    with open(taken, "wb") as f:
        f.write(b"not ours")
    with open(os.path.join(model_dir(comfy, "diffusion_models"), "broken.safetensors"), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")  # a damaged download, say
    log_start = os.path.getsize(comfy.log_path) if comfy.log_path else 0
    flux = "diffusion_models/flux1-dev.safetensors"
    cases = [(flux, "../escape", "scaled_fp16.OutputNameError", "may not contain"),
             (flux, "taken-by-another", "scaled_fp16.OutputNameError", "already exists"),
             ("diffusion_models/broken.safetensors", "broken-out", "scaled_fp16.ConversionFailed", "broken.safetensors")]
    for model, name, typ, words in cases:
        prompt = {"1": {"class_type": "ScaledFP16Convert", "inputs": {
            "model": model, "num_iter": 0, "top_k": 1, "calib_samples": 0,
            "t5xxl": False, "keep_distillation": False, "output_name": name, "overwrite": False}}}
        error = _error_of(comfy.wait(comfy.queue(prompt)))
        assert error["exception_type"] == typ, error["exception_type"]
        assert words in error["exception_message"] and "\n" not in error["exception_message"].strip()
    with open(taken, "rb") as f:
        assert f.read() == b"not ours"
    if comfy.log_path:
        with open(comfy.log_path, errors="replace") as f:
            f.seek(log_start)
            log = f.read()
        assert "!!! Exception during processing !!!" in log
        assert "Traceback" not in log and "WARNING: " not in log, log
