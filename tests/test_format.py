"""Output files read back with plain safetensors match the scaled-FP16 format: layout, T5XXL and keep-distillation
modes, scales, dequantized read-back, reproducibility."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import small_flux_specs
from quant_core import ConvertOptions, convert_file, load_dequantized_state_dict
from quant_core.demo import write_model
from quant_core.format import DISTILL_KEEP


def read_all(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_flux_bf16_layout(flux_bf16, tmp_path):
    out = str(tmp_path / "out.safetensors")
    report = convert_file(flux_bf16, out, ConvertOptions(num_iter=0))
    src, _ = read_all(flux_bf16)
    dst, meta = read_all(out)
    assert dst["scaled_fp16"].dtype == torch.float16 and tuple(dst["scaled_fp16"].shape) == (2,)
    n_quant = 0
    for key, w in src.items():
        if key.endswith(".weight") and w.dim() >= 2:
            n_quant += 1
            layer = key[:-7]
            assert dst[key].dtype == torch.float16 and dst[key].shape == w.shape, key
            s = dst[layer + ".scale_weight"]
            assert s.dtype == torch.float32 and tuple(s.shape) == (1,), key
            assert layer + ".scale_input" not in dst
            deq = dst[key].float() * s
            assert torch.allclose(deq, w.float(), rtol=1e-3, atol=1e-6), key
        else:
            assert dst[key].dtype == w.dtype and torch.equal(dst[key], w), key  # copied unchanged
    assert report["counts"] == {"quantized": n_quant, "kept": len(src) - n_quant, "removed": 0}
    assert set(dst) == set(src) | {k[:-7] + ".scale_weight" for k in src if k in dst and dst[k].dtype ==
                                   torch.float16 and src[k].dim() >= 2} | {"scaled_fp16"}
    assert meta["scaled_fp16.format"] == "scaled_fp16" and meta["scaled_fp16.format_version"] == "1"
    settings = json.loads(meta["scaled_fp16.settings"])
    assert settings["num_iter"] == 0 and settings["top_k"] == 1 and settings["calib_samples"] == 3072
    assert meta["scaled_fp16.source"] == "flux-small.safetensors"
    assert meta["scaled_fp16.converter"].startswith("comfyui-scaled-fp16 ")


def test_t5_fp32_t5xxl_mode(t5_fp32, tmp_path):
    out = str(tmp_path / "t5.safetensors")
    convert_file(t5_fp32, out, ConvertOptions(t5xxl=True, num_iter=0))
    src, _ = read_all(t5_fp32)
    dst, meta = read_all(out)
    assert any("decoder" in k for k in src) and "lm_head.weight" in src and "shared.weight" in src
    assert not any("decoder" in k or "lm_head" in k for k in dst)
    assert tuple(dst["scaled_fp16"].shape) == (0,) and dst["scaled_fp16"].dtype == torch.float16
    for key, w in src.items():
        if "decoder" in key or "lm_head" in key:
            continue
        layer = key[:-7]
        if any(s in key for s in ("norm", "bias", "embed_tokens", "shared")) or w.dim() < 2:
            assert torch.equal(dst[key], w) and layer + ".scale_weight" not in dst, key
        else:
            assert dst[key].dtype == torch.float16
            assert torch.equal(dst[layer + ".scale_input"], dst[layer + ".scale_weight"]), key
            assert dst[layer + ".scale_input"].dtype == torch.float32
    assert json.loads(meta["scaled_fp16.settings"])["t5xxl"] is True
    # relative_attention_bias is a 2-D ".weight" but contains "bias": kept unquantized, like the reference
    rab = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert dst[rab].dtype == torch.float32


def test_keep_distillation(tmp_path):
    specs = small_flux_specs() + [("distilled_guidance_layer.in_proj.weight", (64, 32)),
                                  ("distilled_guidance_layer.in_proj.bias", (64,))]
    src_path = write_model(str(tmp_path / "chroma.safetensors"), specs, torch.bfloat16, seed=3)
    out = str(tmp_path / "out.safetensors")
    report = convert_file(src_path, out, ConvertOptions(keep_distillation=True, num_iter=0))
    src, _ = read_all(src_path)
    dst, _ = read_all(out)
    kept = [k for k in src if k.endswith(".weight") and src[k].dim() >= 2 and any(s in k for s in DISTILL_KEEP)]
    assert set(kept) >= {"img_in.weight", "txt_in.weight", "final_layer.linear.weight",
                         "distilled_guidance_layer.in_proj.weight"}
    for key in kept:
        assert dst[key].dtype == torch.bfloat16 and torch.equal(dst[key], src[key]), key
        assert float(dst[key[:-7] + ".scale_weight"]) == 1.0
    assert dst["double_blocks.0.img_attn.qkv.weight"].dtype == torch.float16
    kept_events = {t["key"] for t in report["tensors"]}
    assert not set(kept) & kept_events  # reported as kept, not quantized


def test_bf16_pow2_policy_is_bit_exact(flux_bf16, tmp_path):
    out = str(tmp_path / "out.safetensors")
    report = convert_file(flux_bf16, out, ConvertOptions(num_iter=0, scale="pow2"))
    assert report["bit_exact_fraction_bf16"] == 1.0
    src, _ = read_all(flux_bf16)
    dst, _ = read_all(out)
    scales = []
    for key, w in src.items():
        if key.endswith(".weight") and w.dim() >= 2:
            s = dst[key[:-7] + ".scale_weight"]
            scales.append(float(s))
            assert torch.equal(dst[key].float() * s, w.float()), key  # 100% of elements bit-exact
            m, e = torch.frexp(s)
            assert float(m) == 0.5  # a power of two
            assert 2 ** 14 <= float(dst[key].float().abs().max()) < 2 ** 15
    assert all(s != 1.0 for s in scales)


def test_bf16_default_policy_keeps_scale_one(flux_bf16, tmp_path):
    out = str(tmp_path / "out.safetensors")
    report = convert_file(flux_bf16, out, ConvertOptions(num_iter=0))
    dst, _ = read_all(out)
    scales = {k: float(v) for k, v in dst.items() if k.endswith(".scale_weight")}
    assert scales and all(s == 1.0 for s in scales.values())
    assert report["rel_error"] <= 1e-7
    assert all(t["rel_error"] <= 1e-7 for t in report["tensors"])


@pytest.mark.parametrize("max_abs", [7e4, 1e6])
def test_fp32_large_values_do_not_overflow(tmp_path, max_abs):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 48, generator=g)
    w = w / w.abs().max() * max_abs
    src = str(tmp_path / "big.safetensors")
    save_file({"layer.weight": w, "small.weight": torch.randn(32, 32, generator=g) * 0.02}, src)
    out = str(tmp_path / "out.safetensors")
    report = convert_file(src, out, ConvertOptions(num_iter=0))
    dst, _ = read_all(out)
    s = float(dst["layer.scale_weight"])
    assert s > 1.0 and torch.isfinite(dst["layer.weight"]).all()
    deq = dst["layer.weight"].float() * s
    assert torch.isfinite(deq).all()
    assert float((deq - w).norm() / w.norm()) < 5e-4
    assert float(dst["small.scale_weight"]) == 1.0
    assert report["tensors"][0]["nonfinite"] == 0


def test_tiny_fp32_weights_are_scaled_by_default(tmp_path):
    # sigma 3e-5: at scale 1 most values are fp16 subnormals (rounding.md: relF 5.7e-4 unscaled, 2.07e-4 scaled)
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)) * 3e-5
    src = str(tmp_path / "tiny.safetensors")
    save_file({"layer.weight": w}, src)
    report = convert_file(src, str(tmp_path / "out.safetensors"), ConvertOptions(num_iter=0))
    t = report["tensors"][0]
    assert t["scale"] < 1.0 and t["rel_error"] < 2.5e-4
    unscaled = float(((w.half().float() - w).norm() / w.norm()))
    assert unscaled > 2 * t["rel_error"]


def test_dequantized_state_dict_roundtrip(flux_bf16, tmp_path):
    out = str(tmp_path / "out.safetensors")
    convert_file(flux_bf16, out, ConvertOptions(num_iter=0, scale="pow2"))
    sd = load_dequantized_state_dict(out)
    src, _ = read_all(flux_bf16)
    assert set(sd) == set(src)
    for k, v in src.items():
        assert torch.equal(sd[k].float(), v.float()), k
    sd32 = load_dequantized_state_dict(out, torch.float32)
    assert all(v.dtype == torch.float32 for v in sd32.values())


def test_same_input_same_bytes(flux_bf16, tmp_path):
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    convert_file(flux_bf16, a, ConvertOptions())
    convert_file(flux_bf16, b, ConvertOptions())
    data = open(a, "rb").read()
    assert data == open(b, "rb").read()
    with safe_open(a, "pt") as f:  # and it is a complete scaled-FP16 file, not two equal empty ones
        assert f.metadata()["scaled_fp16.format"] == "scaled_fp16" and "scaled_fp16" in f.keys()
        with safe_open(flux_bf16, "pt") as src:
            assert set(src.keys()) < set(f.keys())
