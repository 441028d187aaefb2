"""What current ComfyUI needs from the library: no `scaled_fp8` marker any more (and a command that removes it from
files of earlier versions), weights that can stay fp16 with their scale applied at run time, and the GPU memory
of a conversion given back under whatever name the package was imported."""

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import load_stand_ins, run_cli, small_flux_specs
from quant_core import ConvertOptions, convert_file, load_dequantized_state_dict
from quant_core.demo import write_model
from quant_core.errors import ConversionError
from quant_core.format import strip_fp8_marker


def read_all(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture
def legacy_file(flux_bf16, tmp_path):
    """A scaled-FP16 file as earlier versions wrote it with --scaled_fp8_marker: our marker plus ComfyUI's."""
    out = str(tmp_path / "scaled.safetensors")
    convert_file(flux_bf16, out, ConvertOptions(num_iter=0, scale="pow2"))
    tensors, meta = read_all(out)
    tensors["scaled_fp8"] = torch.zeros(2, dtype=torch.float16)
    legacy = str(tmp_path / "legacy.safetensors")
    save_file(tensors, legacy, metadata=meta)
    return legacy, out


def test_converter_never_writes_the_fp8_marker(flux_bf16, tmp_path):
    with pytest.raises(TypeError):
        ConvertOptions(scaled_fp8_marker=True)
    out = str(tmp_path / "out.safetensors")
    p = run_cli("--input", flux_bf16, "--output", out, "--num_iter", "0", "--scaled_fp8_marker")
    assert p.returncode == 2 and not os.path.exists(out)
    assert "0.8.0" in p.stderr and "strip-fp8-marker" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_legacy_marker_file_loads_like_the_clean_one(legacy_file):
    legacy, clean = legacy_file
    a, b = load_dequantized_state_dict(legacy), load_dequantized_state_dict(clean)
    assert "scaled_fp8" not in a and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_strip_fp8_marker_to_output_keeps_everything_else(legacy_file, tmp_path):
    legacy, clean = legacy_file
    before = open(legacy, "rb").read()
    out = str(tmp_path / "stripped.safetensors")
    p = run_cli("strip-fp8-marker", legacy, "--output", out)
    assert p.returncode == 0, p.stderr
    assert open(legacy, "rb").read() == before  # the input is left as it is
    got, meta = read_all(out)
    want, want_meta = read_all(legacy)
    del want["scaled_fp8"]
    assert list(got) == list(want) and meta == want_meta
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".partial")]
    # an existing output is refused unless --overwrite
    p = run_cli("strip-fp8-marker", legacy, "--output", out)
    assert p.returncode == 2 and "already exists" in p.stderr
    assert run_cli("strip-fp8-marker", legacy, "--output", out, "--overwrite").returncode == 0


def test_strip_fp8_marker_in_place(legacy_file):
    legacy, _ = legacy_file
    want, _ = read_all(legacy)
    assert strip_fp8_marker(legacy) == legacy
    got, _ = read_all(legacy)
    assert "scaled_fp8" not in got and len(got) == len(want) - 1
    assert not [f for f in os.listdir(os.path.dirname(legacy)) if f.endswith(".partial")]


def test_strip_fp8_marker_refuses_what_it_must_not_touch(flux_bf16, legacy_file, tmp_path):
    legacy, clean = legacy_file
    with pytest.raises(ConversionError, match="nothing to strip"):
        strip_fp8_marker(clean, str(tmp_path / "x.safetensors"))
    # a real scaled-fp8 model (no scaled_fp16 marker) needs its marker
    fp8 = str(tmp_path / "fp8.safetensors")
    save_file({"a.weight": torch.ones(4, 4).to(torch.float8_e4m3fn), "a.scale_weight": torch.ones(1),
               "scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)}, fp8)
    before = open(fp8, "rb").read()
    p = run_cli("strip-fp8-marker", fp8, "--in-place")
    assert p.returncode == 2 and "fp8.safetensors" in p.stderr and "not a scaled-FP16 file" in p.stderr
    assert open(fp8, "rb").read() == before
    p = run_cli("strip-fp8-marker", legacy)  # neither --output nor --in-place: usage error, nothing written
    assert p.returncode == 2 and "scaled_fp8" in read_all(legacy)[0]


def test_scale_modes(tmp_path):
    """pow2 file from FP32 weights: "load" widens what fp16 cannot hold, "run" keeps the stored fp16 weight and its
    scale, "auto" keeps only where the product does not fit fp16; all stand for the same real weights."""
    src = write_model(str(tmp_path / "f32.safetensors"), small_flux_specs(), torch.float32, seed=3)
    out = str(tmp_path / "pow2.safetensors")
    convert_file(src, out, ConvertOptions(num_iter=0, scale="pow2"))
    stored, _ = read_all(out)
    load = load_dequantized_state_dict(out, scale_at="load")
    kept_run, kept_auto = [], []
    run = load_dequantized_state_dict(out, scale_at="run", kept_scaled=kept_run)
    auto = load_dequantized_state_dict(out, scale_at="auto", kept_scaled=kept_auto)
    scaled = [k for k in stored if k.endswith(".weight") and k[:-7] + ".scale_weight" in stored
              and float(stored[k[:-7] + ".scale_weight"][0]) != 1.0]
    assert scaled and sorted(kept_run) == sorted(scaled)
    assert set(kept_auto) <= set(kept_run) and kept_auto  # FP32 weights at a pow2 scale: most do not fit fp16
    for k in scaled:
        real = stored[k].float() * stored[k[:-7] + ".scale_weight"]
        assert torch.equal(load[k].float(), real)
        assert run[k].dtype == torch.float16 and torch.equal(run[k], stored[k])
        assert torch.equal(run[k[:-7] + ".scale_weight"], stored[k[:-7] + ".scale_weight"])
        if k in kept_auto:
            assert auto[k].dtype == torch.float16 and load[k].dtype == torch.float32
        else:
            assert auto[k].dtype == torch.float16 and torch.equal(auto[k].float(), real)
    assert not any(k.endswith(".scale_weight") for k in load) and "scaled_fp16" not in run
    with pytest.raises(ValueError):
        load_dequantized_state_dict(out, scale_at="later")


def test_conversion_releases_device_memory_under_a_path_like_package_name(tmp_path, monkeypatch):
    """ComfyUI imports a pack under its folder path (nodes.py: the module name is the path, '.' replaced by '_x_'),
    so the rounding module is '<path>.quant_core.rounding'. Each conversion through the node must call that module's
    release (captured CUDA graphs and buffers), not look for a module of another name."""
    import sys

    stand_ins = load_stand_ins("fp16lr_stand_ins_compat")
    name = os.path.join(str(tmp_path), "custom_nodes", "comfyui-scaled-fp16").replace(".", "_x_")
    monkeypatch.setattr(stand_ins, "PACK_MODULE", name)
    pack, _ = stand_ins.install(str(tmp_path))
    try:
        write_model(os.path.join(str(tmp_path), "models", "diffusion_models", "m.safetensors"), small_flux_specs(),
                    torch.float32, seed=4)  # FP32: the learned rounding runs, so its module is imported
        calls = []
        top_level = sys.modules.get("quant_core.rounding")
        if top_level is not None:  # imported by other tests under the plain name: must not be what is released
            monkeypatch.setattr(top_level, "release_device_memory", lambda: calls.append("top-level"))
        node = pack.NODE_CLASS_MAPPINGS["ScaledFP16Convert"]()
        for i in range(2):
            node.convert("diffusion_models/m.safetensors", num_iter=4, top_k=1, calib_samples=0, t5xxl=False,
                         keep_distillation=False, output_name=f"out{i}", overwrite=False)
            rounding = sys.modules[name + ".quant_core.rounding"]
            assert rounding.__name__.startswith(name)
            if i == 0:
                monkeypatch.setattr(rounding, "release_device_memory", lambda: calls.append("pack"))
        assert calls == ["pack"]  # the second conversion released through the pack's own module
    finally:
        stand_ins.uninstall()
