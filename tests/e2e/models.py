"""Random models with real key names and shapes that ComfyUI's own detection recognises, written streaming.

A few tensors are made tiny (fp16 subnormals) or huge (beyond fp16's range) on purpose, so that the converter gives
them a scale other than 1: that is where a loader that ignores `scale_weight` goes wrong.
"""

from __future__ import annotations

import os
import subprocess

import torch

from quant_core.demo import flux_specs, t5_specs
from quant_core.safetensors_io import TORCH_TO_ST, StreamingWriter

# FLUX: real width 3072 (ComfyUI's FLUX config is fixed), 1 double + 1 single block: ~0.54e9 parameters
FLUX_SMALL = dict(hidden=3072, double_blocks=1, single_blocks=1)
FLUX_TINY = {"txt_in.weight": 1e-4}           # std 2e-6: mostly fp16 subnormals -> auto scale < 1
FLUX_HUGE = {"double_blocks.0.txt_mlp.2.weight": 2.0 ** 22}  # max ~4e5 > 65504 -> scale > 1

# T5-base as in ComfyUI's t5_config_base.json (CLIPLoader type stable_audio)
T5_BASE = dict(d_model=768, d_ff=3072, layers=12, heads=12, d_kv=64, vocab=32128, gated=False)
T5_TINY = {"encoder.block.0.layer.1.DenseReluDense.wi.weight": 1e-4}


def clip_l_specs() -> list[tuple[str, tuple[int, ...]]]:
    """CLIP-L text model key names (as ComfyUI's clip_l files have them)."""
    w, layers, mlp = 768, 12, 3072
    s = [("text_model.embeddings.token_embedding.weight", (49408, w)),
         ("text_model.embeddings.position_embedding.weight", (77, w))]
    for i in range(layers):
        p = f"text_model.encoder.layers.{i}"
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s += [(f"{p}.self_attn.{n}.weight", (w, w)), (f"{p}.self_attn.{n}.bias", (w,))]
        s += [(f"{p}.layer_norm1.weight", (w,)), (f"{p}.layer_norm1.bias", (w,)),
              (f"{p}.mlp.fc1.weight", (mlp, w)), (f"{p}.mlp.fc1.bias", (mlp,)),
              (f"{p}.mlp.fc2.weight", (w, mlp)), (f"{p}.mlp.fc2.bias", (w,)),
              (f"{p}.layer_norm2.weight", (w,)), (f"{p}.layer_norm2.bias", (w,))]
    s += [("text_model.final_layer_norm.weight", (w,)), ("text_model.final_layer_norm.bias", (w,)),
          ("text_projection.weight", (w, w))]
    return s


def _value(key: str, shape: tuple[int, ...], gen: torch.Generator, factor: float) -> torch.Tensor:
    if key.endswith(".scale") or ("norm" in key and len(shape) == 1 and key.endswith("weight")):
        t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
    elif key.endswith(".bias") or "norm" in key:
        t = 0.01 * torch.randn(shape, generator=gen)
    else:
        t = 0.02 * torch.randn(shape, generator=gen)
    return t * factor


def write(path: str, specs, dtype: torch.dtype, seed: int = 0, factors: dict[str, float] | None = None) -> str:
    factors = factors or {}
    gen = torch.Generator().manual_seed(seed)
    with StreamingWriter(path, [(k, TORCH_TO_ST[dtype], tuple(s)) for k, s in specs], overwrite=True) as w:
        for key, shape in specs:
            w.write(key, _value(key, shape, gen, factors.get(key, 1.0)).to(dtype))
        w.commit()
    return path


def write_flux(path: str, **overrides) -> str:
    return write(path, flux_specs(**{**FLUX_SMALL, **overrides}), torch.bfloat16, seed=1,
                 factors={**FLUX_TINY, **FLUX_HUGE})


def write_t5_base(path: str) -> str:
    return write(path, t5_specs(**T5_BASE), torch.float32, seed=2, factors=T5_TINY)


def write_t5xxl(path: str) -> str:
    """Full-size T5XXL v1.1 encoder keys (24 blocks, d_model 4096, d_ff 10240), BF16: ~9.5 GB."""
    return write(path, t5_specs(), torch.bfloat16, seed=3, factors={"encoder.block.0.layer.1.DenseReluDense.wo.weight": 1e-4})


def write_clip_l(path: str) -> str:
    return write(path, clip_l_specs(), torch.float16, seed=4)


FLUX_LORA_LAYERS = ("double_blocks.0.img_attn.qkv", "double_blocks.0.img_mlp.0", "single_blocks.0.linear1")


def write_flux_lora(path: str, rank: int = 4) -> str:
    """A LoRA for the FLUX test model in ComfyUI's generic key format (`diffusion_model.<layer>.lora_up/down`)."""
    shapes = dict(flux_specs(**FLUX_SMALL))
    gen = torch.Generator().manual_seed(5)
    tensors = {}
    for layer in FLUX_LORA_LAYERS:
        out_dim, in_dim = shapes[layer + ".weight"]
        tensors[f"diffusion_model.{layer}.lora_up.weight"] = (0.05 * torch.randn(out_dim, rank, generator=gen)).to(
            torch.bfloat16)
        tensors[f"diffusion_model.{layer}.lora_down.weight"] = (0.05 * torch.randn(rank, in_dim, generator=gen)).to(
            torch.bfloat16)
        tensors[f"diffusion_model.{layer}.alpha"] = torch.tensor(float(rank))
    from safetensors.torch import save_file
    save_file(tensors, path)
    return path


# Run by the ComfyUI host's own Python: every Linear weight quantized to fp8 by ComfyUI's own quantization code
# (comfy.quant_ops, comfy-kitchen layouts) and stored in ComfyUI's checkpoint format (QUANTIZATION.md): the layout's
# own state-dict tensors (`weight`, `weight_scale`) and `_quantization_metadata` naming each layer's format.
_HOST_FP8_SCRIPT = r"""
import json, sys
import torch
from safetensors.torch import load_file, save_file
from comfy.quant_ops import QuantizedTensor
src, dst, dst_values = sys.argv[1:4]
out, values, layers = {}, {}, {}
for key, t in load_file(src).items():
    if key.endswith(".weight") and t.ndim == 2:  # FLUX: every 2-D weight belongs to a Linear layer
        # from float32, so that dequantize() gives the exact products fp8 value x scale, as ComfyUI computes them
        # on the CPU (in bf16 they would be rounded to bf16)
        q = QuantizedTensor.from_float(t.float(), "TensorCoreFP8E4M3Layout", scale="recalculate")
        out.update(q.state_dict(key))
        values[key] = q.dequantize()
        layers[key[: -len(".weight")]] = {"format": "float8_e4m3fn"}
    else:
        out[key] = values[key] = t
meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
save_file(out, dst, metadata=meta)
save_file(values, dst_values)
print(len(layers), "layers quantized to fp8")
"""


def write_fp8_with_host(comfy_dir: str, src: str, dst: str, dst_values: str) -> str:
    """`src` quantized to fp8 by the ComfyUI host in `comfy_dir` (its .venv Python and its comfy package) into
    `dst`; the values the fp8 weights stand for (dequantized by the host, float32) into the plain file
    `dst_values`."""
    python = os.path.join(comfy_dir, ".venv", "bin", "python")
    p = subprocess.run([python, "-c", _HOST_FP8_SCRIPT, src, dst, dst_values], cwd=comfy_dir, capture_output=True,
                       text=True, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"fp8 quantization by the host failed:\n{p.stdout}\n{p.stderr}")
    return dst
