"""Done-criterion 2: the example workflows load on the real server without missing nodes or widget errors.

The browser checks the same things when it loads a workflow: every node type is known (`/object_info`), each node's
`widgets_values` has one value per widget in declaration order (plus the seed's control value) and every value fits
its widget, and every link joins an output to an input of the same type. Then the workflow is posted in API format:
the server's own validation may only complain about model files this test server does not have.
"""

import glob
import json
import os

import pytest

from .comfy_server import PACK_ROOT, PromptFailed

WORKFLOWS = sorted(glob.glob(os.path.join(PACK_ROOT, "example_workflows", "*.json")))
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


def test_there_are_three_example_workflows():
    assert [os.path.basename(w) for w in WORKFLOWS] == [
        "1_convert_flux_load_sample.json", "2_convert_t5xxl_dual_clip.json", "3_lora_save_scaled_fp16.json"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_workflow_loads_without_missing_nodes_or_widget_errors(comfy, info, path):
    with open(path) as f:
        workflow = json.load(f)
    missing = sorted({n["type"] for n in workflow["nodes"] if n["type"] not in info})
    assert not missing, f"missing node types: {missing}"
    problems = []
    for node in workflow["nodes"]:
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
