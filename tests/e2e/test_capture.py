"""End-to-end: the capture nodes on a real ComfyUI server, and calibrated conversion in graphs.

- A T5-architecture FP32 text encoder: Capture Calibration from Prompts -> Convert (calibration linked) -> our loader
  -> encode held-out prompts (other sentences than the calibration prompts): the conditioning is closer to the
  original model's than round-to-nearest's (the same file converted with num_iter 0). The figure is printed (-s).
- A FLUX-architecture model with a LoRA: Sample and Capture Calibration -> Save Model (calibration linked) -> our
  loader -> sample; the LoRA's layers are rounded with the calibrated mode (report method "gptq").
"""

import json
import os
import random

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from quant_core.calibration import load_calibration
from quant_core.safetensors_io import read_header

from . import graphs
from .comfy_server import PromptFailed
from .conftest import model_dir, own_server
from .models import FLUX_LORA_LAYERS, write_flux_lora

SUBJECTS = ["a red fox", "an old lighthouse", "a small sailing boat", "a mountain village", "a cat on a windowsill",
            "a busy market street", "a wooden bridge", "a snowy forest", "a vintage car", "a field of sunflowers",
            "a quiet library", "a castle on a hill", "a bowl of ramen", "a steam train", "a desert canyon"]
STYLES = ["at sunset", "in the rain", "under a starry sky", "in morning fog", "at golden hour", "in winter",
          "on a summer afternoon", "seen from above"]
FINISH = ["highly detailed photograph", "oil painting", "watercolor illustration", "35mm film photo",
          "digital art, sharp focus", "soft pastel colors", "dramatic lighting", "wide angle shot"]


def prompt_sets(n_calib: int = 24, n_held: int = 8, seed: int = 0) -> tuple[list[str], list[str]]:
    """Calibration and held-out prompts: different sentences (no held-out prompt is a calibration prompt) of the
    same kind of text, as a user's own prompts are."""
    rng = random.Random(seed)
    every = [f"{s} {t}, {f}" for s in SUBJECTS for t in STYLES for f in FINISH]
    rng.shuffle(every)
    return every[:n_calib], every[n_calib:n_calib + n_held]


def rel_sum(pairs) -> float:
    """Relative L2 over all prompts together: sqrt(sum ||a - b||^2 / sum ||b||^2)."""
    pairs = list(pairs)
    num = sum(float((a.float() - b.float()).pow(2).sum()) for a, b in pairs)
    den = sum(float(b.float().pow(2).sum()) for _, b in pairs)
    return (num / den) ** 0.5


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """A server of its own, started with --fp32-text-enc: ComfyUI holds text encoders in fp16 by default, i.e. it
    rounds an FP32 encoder to nearest when it loads it, and the FP32 original this suite compares with would be
    round-to-nearest's output itself. fp16 weights (the converted files) are exact in fp32."""
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        pytest.skip("needs COMFYUI_DIR: the capture suite starts its own server with --fp32-text-enc")
    with own_server(comfy_dir, tmp_path_factory, "comfy-capture", ("--fp32-text-enc",)) as server:
        yield server


def encode_all(loader: dict, texts: list[str], prefix: str) -> dict:
    """`loader` gives CLIP at ["1", 0]; each text encoded and saved as <prefix>_<i>."""
    prompt = dict(loader)
    for i, text in enumerate(texts):
        prompt[f"e{i}"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 0], "text": text}}
        prompt[f"s{i}"] = {"class_type": "FP16LRTestSaveTensors",
                           "inputs": {"filename": f"{prefix}_{i}", "conditioning": [f"e{i}", 0]}}
    return prompt


def conds(comfy, prefix: str, n: int) -> list:
    return [load_file(comfy.path("output", f"{prefix}_{i}.safetensors"))["cond"] for i in range(n)]


def test_object_info_lists_capture_nodes(comfy):
    info = comfy.object_info()
    prompts, sampling = info["ScaledFP16CapturePrompts"], info["ScaledFP16CaptureSampling"]
    assert prompts["output"] == ["STRING"] and sampling["output"] == ["STRING", "LATENT"]
    assert prompts["input"]["required"]["prompts"][1]["multiline"] is True
    for node in ("ScaledFP16Convert", "ScaledFP16SaveModel", "ScaledFP16SaveCLIP"):
        link = info[node]["input"]["optional"]["calibration_override"]
        assert link[0] == "STRING" and link[1].get("forceInput") is True, link


def test_t5_prompts_capture_calibrated_convert_beats_rtn_on_held_out_prompts(comfy, t5_file):
    calib, held = prompt_sets()
    clip = {"c": {"class_type": "CLIPLoader", "inputs": {"clip_name": t5_file, "type": "stable_audio"}}}
    capture = {"cap": {"class_type": "ScaledFP16CapturePrompts", "inputs": {
        "clip": ["c", 0], "prompts": "\n".join(calib), "held_out_prompts": "\n".join(held[:2]),
        "calib_samples": 100000, "output_name": "t5-e2e-prompts", "overwrite": True}}}
    # num_iter 1: the calibrated GPTQ pass without its refinement sweeps (a third of the CPU time of the default)
    convert = graphs.convert(f"text_encoders/{t5_file}", "t5-e2e-calibrated", num_iter=1, t5xxl=True,
                             node_id="cv")
    convert["cv"]["inputs"]["calibration_override"] = ["cap", 0]
    loader = {"1": {"class_type": "ScaledFP16CLIPLoader", "inputs": {
        "clip_name": t5_file, "type": "stable_audio", "clip_name_override": ["cv", 0]}}}
    comfy.free()
    entry = comfy.run({**clip, **capture, **convert, **encode_all(loader, held, "t5cal")}, timeout=5400)

    # the capture wrote a calibration file the converter reads, whose layers resolve against the T5 file
    assert entry["outputs"]["cap"]["text"] == ["t5-e2e-prompts.safetensors"]
    cal_path = comfy.path("models", "scaled_fp16_calibration", "t5-e2e-prompts.safetensors")
    cal = load_calibration(cal_path)
    linear_keys = [k for k, info in read_header(comfy.path("models", "text_encoders", t5_file)).tensors.items()
                   if k.endswith(".weight") and len(info.shape) == 2 and ".block." in k
                   and "relative_attention_bias" not in k]  # an embedding, not a Linear layer
    unresolved = [k for k in linear_keys if cal.resolve(k) is None]
    assert linear_keys and not unresolved, unresolved[:5]
    assert cal.source["sequences"] == len(calib) and cal.source["eval_sequences"] == 2
    assert all(g["fit_count"] > 0 and g["eval_count"] > 0 for g in cal.groups.values())
    assert not [f for f in os.listdir(os.path.dirname(cal_path)) if f.endswith((".tmp", ".partial"))]

    report = entry["outputs"]["cv"]["fp16lr_report"][0]
    with safe_open(comfy.path("output", "clip", "t5-e2e-calibrated.safetensors"), "pt") as f:
        settings = json.loads(f.metadata()["scaled_fp16.settings"])
    assert settings.get("calibration"), settings
    record = json.load(open(comfy.path("output", "clip", "t5-e2e-calibrated.safetensors.report.json")))
    assert record["calibration"] is not None
    print(f"\ncalibrated conversion report: {json.dumps(report.get('learned'))[:600]}")
    assert report["learned"]["calibrated_tensors"] == len(linear_keys)

    # round-to-nearest: the same file, num_iter 0, no calibration
    rtn = graphs.convert(f"text_encoders/{t5_file}", "t5-e2e-rtn", num_iter=0, t5xxl=True, node_id="cv")
    loader_rtn = {"1": {"class_type": "ScaledFP16CLIPLoader", "inputs": {
        "clip_name": t5_file, "type": "stable_audio", "clip_name_override": ["cv", 0]}}}
    comfy.free()
    comfy.run({**rtn, **encode_all(loader_rtn, held, "t5rtn")}, timeout=5400)
    comfy.free()
    comfy.run(encode_all({"1": {"class_type": "CLIPLoader", "inputs": {"clip_name": t5_file,
                                                                        "type": "stable_audio"}}}, held, "t5ref"),
              timeout=5400)
    comfy.free()
    ref = conds(comfy, "t5ref", len(held))
    err_cal = rel_sum(zip(conds(comfy, "t5cal", len(held)), ref))
    err_rtn = rel_sum(zip(conds(comfy, "t5rtn", len(held)), ref))
    print(f"T5 (FP32, T5XXL mode) on {len(held)} held-out prompts, conditioning rel L2 vs the FP32 original: "
          f"calibrated {err_cal:.3e}, RTN {err_rtn:.3e}, ratio {err_cal / err_rtn:.3f}")
    assert err_cal < err_rtn


def test_capture_refuses_existing_name_without_overwrite_and_empty_prompts(comfy, t5_file):
    clip = {"c": {"class_type": "CLIPLoader", "inputs": {"clip_name": t5_file, "type": "stable_audio"}}}

    def capture(prompts, name, overwrite):
        return {**clip, "cap": {"class_type": "ScaledFP16CapturePrompts", "inputs": {
            "clip": ["c", 0], "prompts": prompts, "calib_samples": 512, "output_name": name,
            "overwrite": overwrite}}}

    with pytest.raises(PromptFailed, match="no prompts"):
        comfy.run(capture("\n  \n", "t5-e2e-empty", True))
    assert not os.path.exists(comfy.path("models", "scaled_fp16_calibration", "t5-e2e-empty.safetensors"))
    comfy.run(capture("a red fox\na blue bird", "t5-e2e-twice", True))
    with pytest.raises(PromptFailed, match="already exists"):
        comfy.run(capture("a green frog\na grey owl", "t5-e2e-twice", False))


def check_capture_summary(summary: dict, path: str, name: str) -> None:
    """A capture node's panel summary (its ui output and fp16lr.report) against the file on disk."""
    meta = json.loads(read_header(path).metadata["fp16lr_calibration"])
    cal = load_calibration(path)
    rows = [r for g in cal.groups.values() for r in g["rows"].values()]
    assert summary["kind"] == "capture" and summary["output_name"] == name
    assert summary["bytes"] == os.path.getsize(path)
    assert (summary["layers"], summary["groups"]) == (len(cal.layers), len(cal.groups))
    assert summary["exact_groups"] == sum(all(g["exact"].values()) for g in cal.groups.values())
    assert (summary["rows_kept_min"], summary["rows_kept_max"]) == (min(rows), max(rows))
    assert summary["tokens_fit"] == max(g["fit_count"] for g in cal.groups.values())
    assert summary["tokens_held_out"] == max(g["eval_count"] for g in cal.groups.values())
    assert summary["notes"] == meta["statistics"]["notes"]
    assert summary["budget_bytes"] == meta["statistics"]["budget_bytes"]


def test_prompts_capture_panel_events_summary_and_budget(comfy, t5_file):
    """The capture node's events on the websocket (one per prompt, then the summary of the file), its ui output, and
    budget_gb: a budget below what calib_samples rows need lowers the rows (a note says so) and bounds the file."""
    calib, held = prompt_sets(n_calib=6, n_held=2, seed=1)
    comfy.events.clear()
    entry = comfy.run({"c": {"class_type": "CLIPLoader", "inputs": {"clip_name": t5_file, "type": "stable_audio"}},
                       "cap": {"class_type": "ScaledFP16CapturePrompts", "inputs": {
                           "clip": ["c", 0], "prompts": "\n".join(calib), "held_out_prompts": "\n".join(held),
                           "calib_samples": 512, "budget_gb": 0.05, "output_name": "t5-e2e-budget",
                           "overwrite": True}}})
    progress = [m["event"] for m in comfy.events.of_type("fp16lr.progress") if m["node"] == "cap"]
    assert [(e["type"], e["unit"], e["index"], e["total"]) for e in progress] == [
        ("capture", "prompt", i, 8) for i in range(1, 9)]
    tokens = [e["tokens"][0]["tokens"] for e in progress]
    assert tokens == sorted(tokens) and tokens[0] > 0 and progress[-1]["tokens"][0]["held_out"] > 0
    (report,) = [m["report"] for m in comfy.events.of_type("fp16lr.report") if m["node"] == "cap"]
    path = comfy.path("models", "scaled_fp16_calibration", "t5-e2e-budget.safetensors")
    check_capture_summary(report, path, "t5-e2e-budget.safetensors")
    assert entry["outputs"]["cap"]["fp16lr_report"] == [report]
    assert report["budget_bytes"] == 5 * 10 ** 7 and os.path.getsize(path) < 5 * 10 ** 7
    assert report["rows"] < 512 and report["notes"] and "0.05 GB budget" in report["notes"][0], report
    print(f"\nprompts capture with budget_gb 0.05: {report['rows']} rows per layer, file {report['bytes']} bytes; "
          f"note: {report['notes'][0]}")
    # below the widget's minimum: ComfyUI's own validation refuses the prompt, the node never runs
    with pytest.raises(PromptFailed, match="budget_gb"):
        comfy.run({"c": {"class_type": "CLIPLoader", "inputs": {"clip_name": t5_file, "type": "stable_audio"}},
                   "cap": {"class_type": "ScaledFP16CapturePrompts", "inputs": {
                       "clip": ["c", 0], "prompts": "a red fox", "calib_samples": 512, "budget_gb": 0.001,
                       "output_name": "t5-e2e-budget-too-small", "overwrite": True}}})
    assert not os.path.exists(comfy.path("models", "scaled_fp16_calibration", "t5-e2e-budget-too-small.safetensors"))


def test_flux_lora_sampling_capture_then_save_model_calibrated(comfy, flux_file):
    lora = os.path.join(model_dir(comfy, "loras"), "flux-e2e-lora.safetensors")
    if not os.path.exists(lora):
        write_flux_lora(lora)
    prompt = {
        "2": {"class_type": "UNETLoader", "inputs": {"unet_name": flux_file, "weight_dtype": "default"}},
        "1": {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": ["2", 0], "lora_name": os.path.basename(lora), "strength_model": 1.0}},
        "10": {"class_type": "FP16LRTestConditioning",
               "inputs": {"seed": 7, "tokens": 8, "width": 4096, "pooled": 768, "guidance": 3.5}},
        "11": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "cap": {"class_type": "ScaledFP16CaptureSampling", "inputs": {
            "model": ["1", 0], "seed": 0, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "denoise": 1.0, "positive": ["10", 0], "negative": ["10", 0], "latent_image": ["11", 0],
            "calib_samples": 4096, "output_name": "flux-e2e-sampling", "overwrite": True}},
        "13": {"class_type": "FP16LRTestSaveTensors", "inputs": {"filename": "flux_capture", "latent": ["cap", 1]}},
        "30": {"class_type": "ScaledFP16SaveModel", "inputs": {
            "model": ["1", 0], "num_iter": 256, "top_k": 1, "calib_samples": 3072, "t5xxl": False,
            "keep_distillation": False, "output_name": "flux-e2e-lora-calibrated", "overwrite": True,
            "calibration_override": ["cap", 0]}},
    }
    comfy.free()
    comfy.events.clear()
    entry = comfy.run(prompt, timeout=5400)
    cal_path = comfy.path("models", "scaled_fp16_calibration", "flux-e2e-sampling.safetensors")
    cal = load_calibration(cal_path)
    # the panel heard each sampling step (through ComfyUI's progress hook) and got the file's summary
    steps = [m["event"] for m in comfy.events.of_type("fp16lr.progress") if m["node"] == "cap"]
    assert [(e["unit"], e["index"], e["total"]) for e in steps] == [("step", 1, 2), ("step", 2, 2)], steps
    (summary,) = entry["outputs"]["cap"]["fp16lr_report"]
    check_capture_summary(summary, cal_path, "flux-e2e-sampling.safetensors")
    assert summary["source"]["model_calls"] == cal.source["model_calls"]
    recorded = {k.removesuffix(".weight") for k in cal.keys()}
    # the LoRA's layers are recorded (patched: rounded from float32); BF16 layers without a patch are exact in fp16
    assert set(FLUX_LORA_LAYERS) <= recorded, sorted(recorded)
    assert cal.source["model_calls"] >= 2 and cal.source["layers_recorded"] < cal.source["layers_total"]
    assert load_file(comfy.path("output", "flux_capture.safetensors"))["latent"].abs().sum() > 0

    report = entry["outputs"]["30"]["fp16lr_report"][0]
    print(f"\nSave Model with sampling calibration: {json.dumps(report.get('learned'))[:800]}")
    assert report["learned"]["calibrated_tensors"] >= len(FLUX_LORA_LAYERS)
    assert report["output_name"] == "flux-e2e-lora-calibrated.safetensors"
    with safe_open(comfy.path("output", "diffusion_models", "flux-e2e-lora-calibrated.safetensors"), "pt") as f:
        settings = json.loads(f.metadata()["scaled_fp16.settings"])
    assert settings.get("calibration"), settings
    comfy.free()
    comfy.run(graphs.flux_sample({"1": {"class_type": "ScaledFP16UNETLoader", "inputs": {
        "unet_name": "flux-e2e-lora-calibrated.safetensors", "weight_dtype": "default"}}}, "flux_lora_calibrated"))
    comfy.free()
    latent = load_file(comfy.path("output", "flux_lora_calibrated.safetensors"))["latent"]
    assert bool(latent.isfinite().all())
