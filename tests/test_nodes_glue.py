"""Glue unit tests: the ComfyUI nodes over stand-in ComfyUI modules (tests/comfy_test_pack/stand_ins.py).

The pack is loaded the way ComfyUI loads it (a package from its folder's __init__.py); the real server is exercised
by tests/e2e/.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from conftest import ROOT, load_stand_ins, small_flux_specs, small_t5_specs
from quant_core.demo import write_model


stand_ins = load_stand_ins()

NODE_TYPES = ["ScaledFP16Convert", "ScaledFP16SaveModel", "ScaledFP16SaveCLIP", "ScaledFP16UNETLoader",
              "ScaledFP16CLIPLoader", "ScaledFP16DualCLIPLoader", "ScaledFP16CheckpointLoader",
              "ScaledFP16CapturePrompts", "ScaledFP16CaptureSampling"]
CONVERT_WIDGETS = ["num_iter", "top_k", "calib_samples", "t5xxl", "keep_distillation", "output_name", "overwrite"]


@pytest.fixture
def comfy(tmp_path):
    pack, rec = stand_ins.install(str(tmp_path))
    pack.base = str(tmp_path)
    yield pack, rec
    stand_ins.uninstall()


def models(base, kind):
    return os.path.join(base, "models", kind)


def read(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def safe_open_metadata(path):
    with safe_open(path, "pt") as f:
        return f.metadata()


def convert_kwargs(**kw):
    args = dict(num_iter=0, top_k=1, calib_samples=3072, t5xxl=False, keep_distillation=False, output_name="",
                overwrite=False)
    args.update(kw)
    return args


def node(pack, name):
    return pack.NODE_CLASS_MAPPINGS[name]()


# --- registration ------------------------------------------------------------------------------------------------

def test_registers_exactly_the_public_node_types(comfy):
    pack, _ = comfy
    assert sorted(pack.NODE_CLASS_MAPPINGS) == sorted(NODE_TYPES)
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_TYPES)
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["ScaledFP16Convert"] == "Convert to Scaled FP16"
    assert pack.WEB_DIRECTORY == "./web"


def test_converting_nodes_share_widgets_in_saved_workflow_order(comfy):
    pack, _ = comfy
    for name, first in (("ScaledFP16Convert", "model"), ("ScaledFP16SaveModel", "model"),
                        ("ScaledFP16SaveCLIP", "clip")):
        spec = pack.NODE_CLASS_MAPPINGS[name].INPUT_TYPES()
        assert list(spec["required"]) == [first] + CONVERT_WIDGETS
        assert list(spec["optional"]) == ["calibration", "calibration_override"]  # appended only, never inserted
        assert spec["hidden"] == {"unique_id": "UNIQUE_ID"}
        defaults = {k: v[1]["default"] for k, v in spec["required"].items() if k in CONVERT_WIDGETS}
        assert defaults["num_iter"] == 256 and defaults["top_k"] == 1 and defaults["calib_samples"] == 3072
        assert defaults["t5xxl"] is False and defaults["keep_distillation"] is False and defaults["overwrite"] is False


def test_loaders_reuse_stock_type_lists(comfy):
    pack, _ = comfy
    clip = pack.NODE_CLASS_MAPPINGS["ScaledFP16CLIPLoader"].INPUT_TYPES()
    assert clip["required"]["type"][0] == ["stable_diffusion", "stable_audio", "sd3"]
    assert "device" in clip["optional"]
    dual = pack.NODE_CLASS_MAPPINGS["ScaledFP16DualCLIPLoader"].INPUT_TYPES()
    assert "flux" in dual["required"]["type"][0]
    unet = pack.NODE_CLASS_MAPPINGS["ScaledFP16UNETLoader"].INPUT_TYPES()
    assert unet["required"]["weight_dtype"][0] == ["default", "fp16", "bf16", "fp32"]


def test_model_combo_lists_files_with_their_folder(comfy):
    pack, _ = comfy
    open(os.path.join(models(pack.base, "diffusion_models"), "flux1-dev.safetensors"), "wb").close()
    open(os.path.join(models(pack.base, "clip"), "t5xxl.safetensors"), "wb").close()
    open(os.path.join(models(pack.base, "checkpoints"), "old.ckpt"), "wb").close()
    choices = pack.NODE_CLASS_MAPPINGS["ScaledFP16Convert"].INPUT_TYPES()["required"]["model"][0]
    assert choices == ["diffusion_models/flux1-dev.safetensors", "text_encoders/t5xxl.safetensors"]


def test_pack_imports_outside_comfyui_with_no_nodes():
    code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('p', sys.argv[1], "
            "submodule_search_locations=[sys.argv[2]]); m = importlib.util.module_from_spec(s); "
            "s.loader.exec_module(m); print(len(m.NODE_CLASS_MAPPINGS), m.WEB_DIRECTORY)")
    out = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "__init__.py"), ROOT],
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "./web"]


# --- output names -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["", "   ", "../escape", "a/../../b", "/abs/x", "C:/x", "a//b", "./x", "x?y"])
def test_output_names_cannot_escape_or_be_odd(comfy, bad):
    pack, _ = comfy
    paths = sys.modules[stand_ins.PACK_MODULE + ".nodes.paths"]
    with pytest.raises(paths.OutputNameError):
        paths.output_path("diffusion_models", bad, overwrite=True)


def test_output_name_gets_extension_and_lands_in_output_models_folder(comfy):
    pack, _ = comfy
    paths = sys.modules[stand_ins.PACK_MODULE + ".nodes.paths"]
    path, name = paths.output_path("diffusion_models", "sub/my model", overwrite=False)
    assert name == "sub/my model.safetensors"
    assert path == os.path.join(pack.base, "output", "diffusion_models", "sub", "my model.safetensors")


def test_output_name_clash_is_refused_unless_overwrite(comfy):
    pack, _ = comfy
    paths = sys.modules[stand_ins.PACK_MODULE + ".nodes.paths"]
    path, _ = paths.output_path("diffusion_models", "x", overwrite=False)
    open(path, "wb").close()
    with pytest.raises(paths.OutputNameError, match="already exists.*overwrite"):
        paths.output_path("diffusion_models", "x", overwrite=False)
    assert paths.output_path("diffusion_models", "x", overwrite=True)[0] == path
    # a same-named file in another folder of the kind would shadow ours in the loaders: refused even with overwrite
    open(os.path.join(models(pack.base, "unet"), "y.safetensors"), "wb").close()
    with pytest.raises(paths.OutputNameError, match="loaders would open that file"):
        paths.output_path("diffusion_models", "y", overwrite=True)


# --- convert node -------------------------------------------------------------------------------------------------

def test_convert_saves_reports_and_refreshes(comfy):
    pack, rec = comfy
    src = write_model(os.path.join(models(pack.base, "diffusion_models"), "flux-small.safetensors"),
                      small_flux_specs(), torch.bfloat16, seed=1)
    pack_fp = sys.modules["folder_paths"]
    pack_fp.filename_list_cache["diffusion_models"] = ["stale"]
    out = node(pack, "ScaledFP16Convert").convert("diffusion_models/flux-small.safetensors", unique_id="7",
                                                   **convert_kwargs())
    name = "flux-small_float16_scaled_learned_svd.safetensors"
    assert out["result"] == (name,)
    dst = os.path.join(pack.base, "output", "diffusion_models", name)
    sd = read(dst)
    assert sd["scaled_fp16"].dtype == torch.float16 and sd["scaled_fp16"].shape == (2,)
    assert sd["img_in.weight"].dtype == torch.float16 and sd["img_in.scale_weight"].shape == (1,)
    assert "diffusion_models" not in pack_fp.filename_list_cache  # dropdowns see the new file at once

    total = len(small_flux_specs())
    progress = rec.of("fp16lr.progress")
    assert [p["event"]["index"] for p in progress] == list(range(1, total + 1))
    assert all(p["node"] == "7" and p["prompt_id"] == "prompt-1" for p in progress)
    assert progress[0]["event"]["type"] == "tensor" and "metrics" in progress[0]["event"]
    assert rec.progress[-1][:2] == (total, total) and rec.progress[-1][2] == "7"
    (report,) = rec.of("fp16lr.report")
    assert report["node"] == "7" and report["report"]["output_name"] == name
    assert "tensors" not in report["report"] and len(report["report"]["ratios"]) == report["report"]["counts"][
        "quantized"]
    assert out["ui"]["fp16lr_report"] == [report["report"]]
    json.dumps(rec.events)  # everything sent is plain JSON


def test_convert_text_encoder_in_t5xxl_mode(comfy):
    pack, _ = comfy
    write_model(os.path.join(models(pack.base, "text_encoders"), "t5.safetensors"), small_t5_specs(),
                torch.float32, seed=2)
    out = node(pack, "ScaledFP16Convert").convert("text_encoders/t5.safetensors", unique_id="1",
                                                   **convert_kwargs(t5xxl=True, output_name="t5-scaled"))
    assert out["result"] == ("t5-scaled.safetensors",)
    sd = read(os.path.join(pack.base, "output", "clip", "t5-scaled.safetensors"))
    assert sd["scaled_fp16"].shape == (0,)
    assert not any(k.startswith(("decoder.", "lm_head")) for k in sd)
    assert "encoder.block.0.layer.0.SelfAttention.q.scale_input" in sd


def test_convert_refuses_clash_with_clear_error_and_ui_event(comfy):
    pack, rec = comfy
    write_model(os.path.join(models(pack.base, "diffusion_models"), "m.safetensors"), small_flux_specs(),
                torch.bfloat16)
    n = node(pack, "ScaledFP16Convert")
    n.convert("diffusion_models/m.safetensors", unique_id="3", **convert_kwargs(output_name="out"))
    with pytest.raises(ValueError, match=r"already exists .*\(made with other settings: num_iter 0 -> 2\).*overwrite"):
        n.convert("diffusion_models/m.safetensors", unique_id="3", **convert_kwargs(output_name="out", num_iter=2))
    (err,) = rec.of("fp16lr.error")
    assert err["node"] == "3" and err["cancelled"] is False and "already exists" in err["message"]
    n.convert("diffusion_models/m.safetensors", unique_id="3", **convert_kwargs(output_name="out", overwrite=True,
                                                                               num_iter=2))
    assert len(rec.of("fp16lr.report")) == 2


def _progress_count(rec):
    return len(rec.of("fp16lr.progress"))


def test_convert_up_to_date_returns_the_file_and_its_report_at_once(comfy):
    pack, rec = comfy
    src = write_model(os.path.join(models(pack.base, "diffusion_models"), "m.safetensors"), small_flux_specs(),
                      torch.float32, seed=4)
    cls = pack.NODE_CLASS_MAPPINGS["ScaledFP16Convert"]
    kw = convert_kwargs(output_name="o", num_iter=3)
    first = cls().convert("diffusion_models/m.safetensors", unique_id="2", **kw)
    dst = os.path.join(pack.base, "output", "diffusion_models", "o.safetensors")
    stat = os.stat(dst)
    tensors = _progress_count(rec)
    assert tensors == len(small_flux_specs()) and os.path.exists(dst + ".report.json")
    # the panel shows the passes the learned rounding used (num_iter 3 caps them)
    assert 1 <= first["ui"]["fp16lr_report"][0]["learned"]["passes_used_max"] <= 3
    # and the median and worst error per tensor beside the total
    summary = first["ui"]["fp16lr_report"][0]
    per = summary["rel_error_per_tensor"]
    assert per["worst"] == summary["worst"][0]["rel_error"] and per["worst_key"] == summary["worst"][0]["key"]
    assert 0 < per["median"] <= per["worst"]
    assert summary["counts"]["quantized"] >= 2 * len(summary["worst"])  # so the median is below every listed worst
    assert per["median"] <= min(w["rel_error"] for w in summary["worst"])
    key = cls.IS_CHANGED("diffusion_models/m.safetensors", output_name="o")

    # the same source and byte-affecting settings: no conversion, the stored report, marked up to date
    for extra in ({}, {"calib_samples": 16}, {"overwrite": True}):
        again = cls().convert("diffusion_models/m.safetensors", unique_id="2", **{**kw, **extra})
        assert again["result"] == first["result"]
        (report,) = again["ui"]["fp16lr_report"]
        assert report["up_to_date"] is True
        assert {k: v for k, v in report.items() if k != "up_to_date"} == first["ui"]["fp16lr_report"][0]
        assert rec.of("fp16lr.report")[-1]["report"] == report  # the panel gets it live too
        assert _progress_count(rec) == tensors and os.stat(dst).st_mtime_ns == stat.st_mtime_ns
        assert cls.IS_CHANGED("diffusion_models/m.safetensors", output_name="o") == key  # stable

    # the source changed (same name): refused without overwrite, saying why; nothing written
    write_model(src, small_flux_specs(), torch.float32, seed=5)
    with pytest.raises(ValueError, match=r"made from another source or an older m\.safetensors"):
        cls().convert("diffusion_models/m.safetensors", unique_id="2", **kw)
    assert os.stat(dst).st_mtime_ns == stat.st_mtime_ns
    assert cls.IS_CHANGED("diffusion_models/m.safetensors", output_name="o") != key
    cls().convert("diffusion_models/m.safetensors", unique_id="2", **{**kw, "overwrite": True})
    assert _progress_count(rec) == 2 * tensors
    assert cls().convert("diffusion_models/m.safetensors", unique_id="2", **kw)["ui"]["fp16lr_report"][0][
        "up_to_date"]

    # a file without our record (e.g. written by another tool) is not up to date
    os.remove(dst + ".report.json")
    with pytest.raises(ValueError, match="no record of what it was made from"):
        cls().convert("diffusion_models/m.safetensors", unique_id="2", **kw)


def test_user_errors_have_clean_names_one_line_and_no_traceback_in_the_log(comfy, caplog):
    import logging
    pack, rec = comfy
    paths = sys.modules[stand_ins.PACK_MODULE + ".nodes.paths"]
    cls = pack.NODE_CLASS_MAPPINGS["ScaledFP16Convert"]
    folder = models(pack.base, "diffusion_models")
    write_model(os.path.join(folder, "m.safetensors"), small_flux_specs(), torch.bfloat16)
    with open(os.path.join(folder, "broken.safetensors"), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    cases = [("diffusion_models/missing.safetensors", {}, paths.SourceError, "not found"),
             ("diffusion_models/broken.safetensors", {}, paths.ConversionFailed, "broken.safetensors"),
             ("diffusion_models/m.safetensors", {"output_name": "../x"}, paths.OutputNameError, r"'\.\.'")]
    for model, extra, error, message in cases:
        # IS_CHANGED never raises (ComfyUI would log a WARNING each time): the node reports the problem once
        changed = cls.IS_CHANGED(model, output_name=extra.get("output_name", ""))
        assert changed.startswith("unusable") == (error is not paths.ConversionFailed), changed
        with pytest.raises(error, match=message) as info:
            cls().convert(model, unique_id="9", **convert_kwargs(**extra))
        e = info.value
        assert f"{type(e).__module__}.{type(e).__name__}" == f"scaled_fp16.{error.__name__}"
        assert "\n" not in str(e)
        # what ComfyUI's executor does with a node's exception: a message line, then the traceback
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            try:
                raise e
            except Exception as ex:
                logging.error(f"!!! Exception during processing !!! {ex}")
                logging.error("Traceback (most recent call last):\n  ...")
        assert [r.getMessage().splitlines()[0] for r in caplog.records] == [
            f"!!! Exception during processing !!! {e}"]
    assert len(rec.of("fp16lr.error")) == len(cases)  # the panel hears of each one too
    # any other exception keeps its traceback
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        try:
            raise RuntimeError("a bug")
        except RuntimeError:
            logging.error("Traceback (most recent call last):\n  ...")
    assert len(caplog.records) == 1


def test_setting_widgets_are_the_options_definition(comfy):
    """Every option meant as a widget is one on each converting node, with the option's default, range and help."""
    from quant_core.options import option_fields
    pack, _ = comfy
    fields = [f for f in option_fields() if f.widget]
    assert {f.name for f in fields} == set(CONVERT_WIDGETS + ["calibration"]) - {"output_name"}
    for name in ("ScaledFP16Convert", "ScaledFP16SaveModel", "ScaledFP16SaveCLIP"):
        spec = pack.NODE_CLASS_MAPPINGS[name].INPUT_TYPES()
        widgets = {**spec["required"], **spec["optional"]}
        for field in fields:
            choices, opts = widgets[field.name]
            assert opts["tooltip"].startswith(field.help), (name, field.name)
            if field.name == "calibration":  # a choice of the calibration folder's files
                assert choices[0] == opts["default"] == "none"
                continue
            assert choices == {"int": "INT", "bool": "BOOLEAN"}[field.type]
            assert opts["default"] == field.default
            assert (opts.get("min"), opts.get("max")) == (field.min, field.max)


def test_widget_values_are_the_recorded_conversion_settings(comfy):
    pack, _ = comfy
    write_model(os.path.join(models(pack.base, "diffusion_models"), "m.safetensors"), small_flux_specs(),
                torch.float32, seed=4)
    kw = convert_kwargs(num_iter=3, top_k=2, calib_samples=16, keep_distillation=True, output_name="s")
    node(pack, "ScaledFP16Convert").convert("diffusion_models/m.safetensors", **kw)
    meta = safe_open_metadata(os.path.join(pack.base, "output", "diffusion_models", "s.safetensors"))
    settings = json.loads(meta["scaled_fp16.settings"])
    assert {k: settings[k] for k in ("num_iter", "top_k", "calib_samples", "t5xxl", "keep_distillation")} == {
        "num_iter": 3, "top_k": 2, "calib_samples": 16, "t5xxl": False, "keep_distillation": True}
    assert settings["calibration"] is None


def test_interrupt_stops_within_a_tensor_and_leaves_no_file(comfy):
    pack, rec = comfy
    write_model(os.path.join(models(pack.base, "diffusion_models"), "m.safetensors"), small_flux_specs(),
                torch.bfloat16)
    rec.interrupt_after = 4  # the UI's Cancel arrives while tensor 3 is being converted
    mm = sys.modules["comfy.model_management"]
    with pytest.raises(mm.InterruptProcessingException):
        node(pack, "ScaledFP16Convert").convert("diffusion_models/m.safetensors", unique_id="5",
                                                **convert_kwargs(output_name="cancelled"))
    folder = os.path.join(pack.base, "output", "diffusion_models")
    assert os.listdir(folder) == []  # neither the file nor a temporary one
    (err,) = rec.of("fp16lr.error")
    assert err["cancelled"] is True and err["index"] == 3 and err["total"] == len(small_flux_specs())
    assert len(rec.of("fp16lr.progress")) == 3


def test_convert_is_changed_follows_source_and_output(comfy):
    pack, _ = comfy
    cls = pack.NODE_CLASS_MAPPINGS["ScaledFP16Convert"]
    src = write_model(os.path.join(models(pack.base, "diffusion_models"), "m.safetensors"), small_flux_specs(),
                      torch.bfloat16)
    before = cls.IS_CHANGED("diffusion_models/m.safetensors", output_name="o")
    cls().convert("diffusion_models/m.safetensors", **convert_kwargs(output_name="o"))
    assert cls.IS_CHANGED("diffusion_models/m.safetensors", output_name="o") != before  # output now exists
    after = cls.IS_CHANGED("diffusion_models/m.safetensors", output_name="o")
    write_model(src, small_flux_specs(hidden=64), torch.bfloat16)
    assert cls.IS_CHANGED("diffusion_models/m.safetensors", output_name="o") != after


# --- loaders ------------------------------------------------------------------------------------------------------

def converted_flux(pack):
    src = write_model(os.path.join(models(pack.base, "diffusion_models"), "m.safetensors"), small_flux_specs(),
                      torch.bfloat16, seed=1)
    (name,) = node(pack, "ScaledFP16Convert").convert("diffusion_models/m.safetensors",
                                                      **convert_kwargs(output_name="m-scaled"))["result"]
    return src, name


def test_unet_loader_dequantizes_and_drops_scale_keys(comfy):
    pack, rec = comfy
    src, name = converted_flux(pack)
    assert node(pack, "ScaledFP16UNETLoader").load_unet(unet_name=name, weight_dtype="default") == ("MODEL",)
    kind, sd, options = rec.loaded[-1]
    original = read(src)
    assert kind == "unet" and options == {} and set(sd) == set(original)
    for k, w in original.items():
        # BF16 -> FP16 is exact except for values below fp16's subnormal spacing (the auto policy keeps scale 1)
        assert torch.allclose(sd[k].float(), w.float(), rtol=0, atol=2 ** -25), k

    node(pack, "ScaledFP16UNETLoader").load_unet(unet_name=name, weight_dtype="bf16")
    _, sd, options = rec.loaded[-1]
    assert options == {"dtype": torch.bfloat16} and all(t.dtype == torch.bfloat16 for t in sd.values())


def test_unet_loader_applies_scale_weight(comfy):
    """A tensor far beyond fp16's range is stored scaled; the loader must give back the real values."""
    pack, rec = comfy
    path = os.path.join(models(pack.base, "diffusion_models"), "big.safetensors")
    write_model(path, small_flux_specs(), torch.float32, seed=3)
    sd = read(path)
    sd["img_in.weight"] = sd["img_in.weight"] * 1e7
    from safetensors.torch import save_file
    save_file(sd, path)
    (name,) = node(pack, "ScaledFP16Convert").convert("diffusion_models/big.safetensors",
                                                      **convert_kwargs(output_name="big-scaled"))["result"]
    stored = read(os.path.join(pack.base, "output", "diffusion_models", name))
    assert float(stored["img_in.scale_weight"][0]) > 1
    # multiplied out at load (the run-time path needs a real ComfyUI: tests/e2e)
    node(pack, "ScaledFP16UNETLoader").load_unet(unet_name=name, weight_dtype="default", apply_scale="at load")
    loaded = rec.loaded[-1][1]["img_in.weight"].float()
    assert torch.allclose(loaded, sd["img_in.weight"], rtol=1e-3, atol=0)


def test_loader_takes_linked_name_over_dropdown(comfy):
    pack, rec = comfy
    _, name = converted_flux(pack)
    node(pack, "ScaledFP16UNETLoader").load_unet(unet_name="m.safetensors", weight_dtype="default",
                                                 unet_name_override=name)
    assert "scaled_fp16" not in rec.loaded[-1][1]
    assert len(rec.loaded[-1][1]) == len(small_flux_specs())
    node(pack, "ScaledFP16UNETLoader").load_unet(unet_name="m.safetensors", weight_dtype="default",
                                                 unet_name_override="diffusion_models/" + name)


def test_unrecognised_architecture_names_the_file(comfy):
    pack, _ = comfy
    _, name = converted_flux(pack)
    sys.modules["comfy.sd"].recognise = False
    with pytest.raises(ValueError, match=r"m-scaled\.safetensors: ComfyUI does not recognise"):
        node(pack, "ScaledFP16UNETLoader").load_unet(unet_name=name, weight_dtype="default")
    import shutil
    shutil.copy(os.path.join(pack.base, "output", "diffusion_models", name), models(pack.base, "text_encoders"))
    with pytest.raises(ValueError, match=r"m-scaled\.safetensors: not a text encoder ComfyUI recognises"):
        node(pack, "ScaledFP16CLIPLoader").load_clip(clip_name=name, type="sd3")


def test_clip_loaders_hand_dequantized_encoders_to_comfy(comfy):
    pack, rec = comfy
    write_model(os.path.join(models(pack.base, "text_encoders"), "t5.safetensors"), small_t5_specs(),
                torch.float32, seed=2)
    (name,) = node(pack, "ScaledFP16Convert").convert("text_encoders/t5.safetensors",
                                                      **convert_kwargs(t5xxl=True, output_name="t5s"))["result"]
    node(pack, "ScaledFP16CLIPLoader").load_clip(clip_name=name, type="stable_audio", device="cpu")
    kind, (sd,), options = rec.loaded[-1]
    assert kind == "clip" and options["clip_type"].name == "STABLE_AUDIO"
    assert options["load_device"] == torch.device("cpu")
    assert not any(k.endswith(("scale_weight", "scale_input")) or k == "scaled_fp16" for k in sd)
    node(pack, "ScaledFP16DualCLIPLoader").load_clip(clip_name1="t5.safetensors", clip_name2=name, type="flux")
    kind, sds, options = rec.loaded[-1]
    assert len(sds) == 2 and options["clip_type"].name == "FLUX"


def test_checkpoint_loader(comfy):
    pack, rec = comfy
    specs = [("model.diffusion_model." + k, s) for k, s in small_flux_specs()]
    write_model(os.path.join(models(pack.base, "checkpoints"), "ck.safetensors"), specs, torch.bfloat16,
                metadata={"modelspec.architecture": "test"})
    (name,) = node(pack, "ScaledFP16Convert").convert("checkpoints/ck.safetensors",
                                                      **convert_kwargs(output_name="ck-s"))["result"]
    assert node(pack, "ScaledFP16CheckpointLoader").load_checkpoint(ckpt_name=name) == ("MODEL", "CLIP", "VAE")
    _, sd, options = rec.loaded[-1]
    assert len(sd) == len(specs) and options["metadata"]["modelspec.architecture"] == "test"


def test_loader_is_changed_follows_size_and_mtime(comfy):
    pack, _ = comfy
    cls = pack.NODE_CLASS_MAPPINGS["ScaledFP16UNETLoader"]
    path = write_model(os.path.join(models(pack.base, "diffusion_models"), "m.safetensors"), small_flux_specs(),
                       torch.bfloat16)
    first = cls.IS_CHANGED(unet_name="m.safetensors", weight_dtype="default")
    assert cls.IS_CHANGED(unet_name="m.safetensors", weight_dtype="default") == first
    os.utime(path, ns=(1, 1))
    assert cls.IS_CHANGED(unet_name="m.safetensors", weight_dtype="default") != first
    assert cls.IS_CHANGED(unet_name="missing.safetensors", weight_dtype="default") == "missing"
    # a linked name (ComfyUI passes None for a link while it computes the cache key) falls back to the dropdown;
    # a name given as a widget value wins over it
    assert cls.IS_CHANGED(unet_name="m.safetensors", weight_dtype="default", unet_name_override=None) != "missing"
    assert cls.IS_CHANGED(unet_name="m.safetensors", unet_name_override="missing.safetensors") == "missing"
    # the dual loader follows both of its files
    dual = pack.NODE_CLASS_MAPPINGS["ScaledFP16DualCLIPLoader"]
    te = [write_model(os.path.join(models(pack.base, "text_encoders"), f"t{i}.safetensors"), small_t5_specs(),
                      torch.float32, seed=i) for i in (1, 2)]
    pair = dual.IS_CHANGED(clip_name1="t1.safetensors", clip_name2="t2.safetensors", type="flux")
    os.utime(te[1], ns=(1, 1))
    assert dual.IS_CHANGED(clip_name1="t1.safetensors", clip_name2="t2.safetensors", type="flux") not in (pair,
                                                                                                          "missing")


# --- save nodes ---------------------------------------------------------------------------------------------------

class StandInPatcher:
    """Just what the save nodes use of ComfyUI's ModelPatcher: get_key_patches / model_state_dict / model."""

    def __init__(self, sd, patches):
        self.sd, self.patches = sd, patches
        self.model = torch.nn.Module()

    def model_state_dict(self):
        return dict(self.sd)

    def get_key_patches(self, prefix):
        identity = lambda a, **kw: a  # noqa: E731
        return {k: [(w, identity)] + self.patches.get(k, []) for k, w in self.sd.items() if k.startswith(prefix)}


def test_save_model_applies_patches_streams_and_cleans_up(comfy):
    pack, rec = comfy
    gen = torch.Generator().manual_seed(0)
    sd = {"diffusion_model." + k: (0.02 * torch.randn(s, generator=gen)).to(torch.bfloat16)
          for k, s in small_flux_specs()}
    key = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    delta = 0.01 * torch.randn(sd[key].shape, generator=gen)
    patcher = StandInPatcher(sd, {key: [(0.5, delta)]})
    out = node(pack, "ScaledFP16SaveModel").save(model=patcher, unique_id="9",
                                                 **convert_kwargs(output_name="lora-merged"))
    assert out["result"] == ("lora-merged.safetensors",)
    folder = os.path.join(pack.base, "output", "diffusion_models")
    assert os.listdir(folder) == ["lora-merged.safetensors"]  # nothing else was written
    saved = read(os.path.join(folder, "lora-merged.safetensors"))
    assert "double_blocks.0.img_attn.qkv.weight" in saved and not any(k.startswith("diffusion_model.") for k in saved)
    expected = sd[key].float() + 0.5 * delta
    got = saved["double_blocks.0.img_attn.qkv.weight"].float() * saved["double_blocks.0.img_attn.qkv.scale_weight"]
    assert torch.allclose(got, expected, rtol=2 ** -10, atol=2 ** -24)
    n = len(sd)
    assert rec.progress[-1][:2] == (n, n)  # one bar, one step per tensor
    meta = safe_open_metadata(os.path.join(folder, "lora-merged.safetensors"))
    assert meta["scaled_fp16.source"] == "ComfyUI graph (model)"
    (report,) = rec.of("fp16lr.report")
    # the size in is the graph's weights in memory: bf16 as held, the patched weight in float32
    assert report["report"]["source_in_memory"] == ["BF16", "F32"]
    assert out["ui"]["fp16lr_report"][0]["source_in_memory"] == ["BF16", "F32"]
    cls = pack.NODE_CLASS_MAPPINGS["ScaledFP16SaveModel"]
    before = cls.IS_CHANGED(output_name="lora-merged")
    os.unlink(os.path.join(folder, "lora-merged.safetensors"))
    assert cls.IS_CHANGED(output_name="lora-merged") != before  # a deleted output makes the node run again


def test_save_model_cancel_during_conversion_leaves_nothing(comfy):
    pack, rec = comfy
    sd = {"diffusion_model." + k: torch.zeros(s, dtype=torch.bfloat16) for k, s in small_flux_specs()}
    rec.interrupt_after = 3
    with pytest.raises(sys.modules["comfy.model_management"].InterruptProcessingException):
        node(pack, "ScaledFP16SaveModel").save(model=StandInPatcher(sd, {}), **convert_kwargs(output_name="x"))
    assert os.listdir(os.path.join(pack.base, "output", "diffusion_models")) == []
    assert rec.of("fp16lr.error")[0]["cancelled"] is True


def test_save_clip_writes_one_file_per_encoder(comfy):
    pack, _ = comfy
    gen = torch.Generator().manual_seed(0)
    sd = {"t5xxl.transformer." + k: 0.02 * torch.randn(s, generator=gen) for k, s in small_t5_specs(decoder_layers=0,
                                                                                                    lm_head=False)}
    sd["clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"] = 0.02 * torch.randn(32, 16, generator=gen)

    class Clip:
        patcher = StandInPatcher(sd, {})

    out = node(pack, "ScaledFP16SaveCLIP").save(clip=Clip(), **convert_kwargs(output_name="te", t5xxl=True))
    assert out["result"] == ("te_clip_l.safetensors, te_t5xxl.safetensors",)
    assert len(out["ui"]["fp16lr_report"]) == 2
    folder = os.path.join(pack.base, "output", "clip")
    t5 = read(os.path.join(folder, "te_t5xxl.safetensors"))
    clip_l = read(os.path.join(folder, "te_clip_l.safetensors"))
    assert t5["scaled_fp16"].shape == (0,) and "encoder.block.0.layer.0.SelfAttention.q.weight" in t5
    assert clip_l["scaled_fp16"].shape == (2,) and "text_model.encoder.layers.0.mlp.fc1.weight" in clip_l


def test_progress_payloads_are_plain_json(comfy):
    progress = sys.modules[stand_ins.PACK_MODULE + ".nodes.progress"]
    out = progress._json_safe({"a": float("nan"), "b": torch.tensor(2.5), "c": (1, float("inf")), "d": True})
    assert out == {"a": None, "b": 2.5, "c": [1, None], "d": True}
