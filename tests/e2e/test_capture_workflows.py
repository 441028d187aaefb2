"""The two capture example workflows queued on the real server as the browser would queue them, with the parts this
server has no model files for (text encoders, VAE, full-size models) replaced by the test models, the test pack's
conditioning and its tensor saver: the capture runs, its file links into the converter / Save Model, and the layers
with something to round are rounded with the calibrated mode."""

import os

import pytest

from quant_core.calibration import load_calibration

from .conftest import model_dir
from .models import FLUX_LORA_LAYERS, write_flux, write_flux_lora, write_t5_base
from .test_example_workflows import WORKFLOWS, to_api


def _workflow(number: int) -> str:
    (path,) = [w for w in WORKFLOWS if os.path.basename(w).startswith(f"{number}. ")]
    return path


@pytest.fixture(scope="module")
def info(comfy):
    return comfy.object_info()


def _api(info, number):
    import json
    with open(_workflow(number)) as f:
        return to_api(json.load(f), info)


def test_workflow_4_capture_prompts_convert_load(comfy, info):
    t5 = os.path.join(model_dir(comfy, "text_encoders"), "t5-base-e2e.safetensors")
    if not os.path.exists(t5):
        write_t5_base(t5)
    prompt = _api(info, 4)
    assert prompt["2"]["class_type"] == "ScaledFP16CapturePrompts" and prompt["3"]["inputs"][
        "calibration_override"] == ["2", 0] and prompt["4"]["inputs"]["clip_name2_override"] == ["3", 0]
    prompt["1"]["inputs"].update(clip_name="t5-base-e2e.safetensors", type="stable_audio")
    prompt["2"]["inputs"]["output_name"] = "wf4-t5-calibration"
    # num_iter 1: the calibrated GPTQ pass without its refinement sweeps (a third of the CPU time; the held-out
    # figure with the default is test_capture.py's)
    prompt["3"]["inputs"].update(model="text_encoders/t5-base-e2e.safetensors", output_name="wf4-t5-calibrated",
                                 overwrite=True, num_iter=1)
    prompt["4"] = {"class_type": "ScaledFP16CLIPLoader", "inputs": {
        "clip_name": "t5-base-e2e.safetensors", "type": "stable_audio", "clip_name_override": ["3", 0]}}
    for node_id in ("5", "11", "12", "13", "14", "15", "16"):
        del prompt[node_id]
    prompt["16"] = {"class_type": "FP16LRTestSaveTensors", "inputs": {"filename": "wf4_cond",
                                                                      "conditioning": ["10", 0]}}
    comfy.free()
    entry = comfy.run(prompt)
    comfy.free()
    assert entry["outputs"]["2"]["text"] == ["wf4-t5-calibration.safetensors"]
    (report,) = entry["outputs"]["3"]["fp16lr_report"]
    learned = report["learned"]
    print(f"\nworkflow 4 on T5-base: {learned.get('calibrated_tensors')} calibrated tensors, "
          f"{learned.get('calibrated_fallbacks')} fallbacks, layer output error ratio "
          f"{learned.get('output_error_ratio_mean')}")
    assert learned["calibrated_tensors"] > 0
    assert os.path.exists(comfy.path("output", "wf4_cond.safetensors"))


@pytest.fixture
def wf5_models(comfy):
    """The FLUX test model and its LoRA under names of their own: the server is shared with the other e2e modules, and
    files under the example workflows' names (flux1-dev, flux_lora) would change what those modules see."""
    flux = os.path.join(model_dir(comfy, "diffusion_models"), "wf5-flux-e2e.safetensors")
    lora = os.path.join(model_dir(comfy, "loras"), "wf5-lora-e2e.safetensors")
    write_flux(flux)
    write_flux_lora(lora)
    yield os.path.basename(flux), os.path.basename(lora)
    for path in (flux, lora):
        os.remove(path)


def test_workflow_5_lora_sampling_capture_save_model(comfy, info, wf5_models):
    prompt = _api(info, 5)
    assert prompt["7"]["class_type"] == "ScaledFP16CaptureSampling" and prompt["11"]["inputs"][
        "calibration_override"] == ["7", 0] and prompt["9"]["inputs"]["samples"] == ["7", 1]
    assert prompt["1"]["class_type"] == "UNETLoader" and prompt["2"]["class_type"] == "LoraLoaderModelOnly"
    prompt["1"]["inputs"]["unet_name"], prompt["2"]["inputs"]["lora_name"] = wf5_models
    for node_id in ("3", "4", "5", "8", "9", "10"):
        del prompt[node_id]
    prompt["5"] = {"class_type": "FP16LRTestConditioning",
                   "inputs": {"seed": 7, "tokens": 8, "width": 4096, "pooled": 768, "guidance": 3.5}}
    prompt["6"]["inputs"].update(width=64, height=64)
    prompt["7"]["inputs"].update(steps=2, output_name="wf5-flux-sampling")
    prompt["10"] = {"class_type": "FP16LRTestSaveTensors", "inputs": {"filename": "wf5_latent",
                                                                      "latent": ["7", 1]}}
    prompt["11"]["inputs"].update(output_name="wf5-flux-lora-calibrated", overwrite=True)
    comfy.free()
    entry = comfy.run(prompt)
    comfy.free()
    cal = load_calibration(comfy.path("models", "scaled_fp16_calibration", "wf5-flux-sampling.safetensors"))
    assert {f"{layer}.weight" for layer in FLUX_LORA_LAYERS} <= set(cal.keys())
    (report,) = entry["outputs"]["11"]["fp16lr_report"]
    print(f"\nworkflow 5 on the FLUX test model: recorded {cal.source['layers_recorded']} of "
          f"{cal.source['layers_total']} Linear layers; Save Model: {report['learned'].get('calibrated_tensors')} "
          "calibrated tensors")
    assert report["learned"]["calibrated_tensors"] >= len(FLUX_LORA_LAYERS)
    assert os.path.exists(comfy.path("output", "wf5_latent.safetensors"))
