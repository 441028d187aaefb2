"""Synthetic models with real key names and shapes, written streaming (no whole model in RAM).

Used by ``python -m quant_core --demo``, by the tests and by the benchmarks. Values are seeded Gaussian noise
(weights std 0.02, biases std 0.01, norm scales near 1), so every file is reproducible.
"""

from __future__ import annotations

import os
from typing import Iterator

import torch

from .safetensors_io import TORCH_TO_ST, StreamingWriter

Spec = tuple[str, tuple[int, ...]]


def flux_specs(hidden: int = 3072, double_blocks: int = 19, single_blocks: int = 38, head_dim: int = 128,
               in_channels: int = 64, context_dim: int = 4096, vec_dim: int = 768, mlp_ratio: int = 4,
               guidance: bool = True) -> list[Spec]:
    """Key names and shapes of a FLUX.1 diffusion transformer (FLUX-dev: the defaults)."""
    h, mlp = hidden, hidden * mlp_ratio
    s: list[Spec] = [("img_in.weight", (h, in_channels)), ("img_in.bias", (h,)),
                     ("txt_in.weight", (h, context_dim)), ("txt_in.bias", (h,))]
    embedders = [("time_in", 256), ("vector_in", vec_dim)] + ([("guidance_in", 256)] if guidance else [])
    for name, dim in embedders:
        s += [(f"{name}.in_layer.weight", (h, dim)), (f"{name}.in_layer.bias", (h,)),
              (f"{name}.out_layer.weight", (h, h)), (f"{name}.out_layer.bias", (h,))]
    for i in range(double_blocks):
        for side in ("img", "txt"):
            p = f"double_blocks.{i}.{side}"
            s += [(f"{p}_mod.lin.weight", (6 * h, h)), (f"{p}_mod.lin.bias", (6 * h,)),
                  (f"{p}_attn.qkv.weight", (3 * h, h)), (f"{p}_attn.qkv.bias", (3 * h,)),
                  (f"{p}_attn.norm.query_norm.scale", (head_dim,)), (f"{p}_attn.norm.key_norm.scale", (head_dim,)),
                  (f"{p}_attn.proj.weight", (h, h)), (f"{p}_attn.proj.bias", (h,)),
                  (f"{p}_mlp.0.weight", (mlp, h)), (f"{p}_mlp.0.bias", (mlp,)),
                  (f"{p}_mlp.2.weight", (h, mlp)), (f"{p}_mlp.2.bias", (h,))]
    for i in range(single_blocks):
        p = f"single_blocks.{i}"
        s += [(f"{p}.linear1.weight", (3 * h + mlp, h)), (f"{p}.linear1.bias", (3 * h + mlp,)),
              (f"{p}.linear2.weight", (h, h + mlp)), (f"{p}.linear2.bias", (h,)),
              (f"{p}.norm.query_norm.scale", (head_dim,)), (f"{p}.norm.key_norm.scale", (head_dim,)),
              (f"{p}.modulation.lin.weight", (3 * h, h)), (f"{p}.modulation.lin.bias", (3 * h,))]
    s += [("final_layer.adaLN_modulation.1.weight", (2 * h, h)), ("final_layer.adaLN_modulation.1.bias", (2 * h,)),
          ("final_layer.linear.weight", (in_channels, h)), ("final_layer.linear.bias", (in_channels,))]
    return s


def t5_specs(d_model: int = 4096, d_ff: int = 10240, layers: int = 24, heads: int = 64, d_kv: int = 64,
             vocab: int = 32128, decoder_layers: int = 0, lm_head: bool = False, gated: bool = True) -> list[Spec]:
    """Key names and shapes of a T5 encoder (T5XXL v1.1: the defaults), optionally with decoder and lm_head."""
    inner = heads * d_kv
    s: list[Spec] = [("shared.weight", (vocab, d_model)), ("encoder.embed_tokens.weight", (vocab, d_model))]
    ff = ["wi_0", "wi_1"] if gated else ["wi"]

    def block(stack: str, i: int, cross: bool) -> list[Spec]:
        p = f"{stack}.block.{i}.layer"
        b = [(f"{p}.0.SelfAttention.{n}.weight", (inner, d_model)) for n in ("q", "k", "v")]
        b += [(f"{p}.0.SelfAttention.o.weight", (d_model, inner)), (f"{p}.0.layer_norm.weight", (d_model,))]
        if i == 0:
            b.append((f"{p}.0.SelfAttention.relative_attention_bias.weight", (32, heads)))
        n = 1
        if cross:
            b += [(f"{p}.1.EncDecAttention.{x}.weight", (inner, d_model)) for x in ("q", "k", "v")]
            b += [(f"{p}.1.EncDecAttention.o.weight", (d_model, inner)), (f"{p}.1.layer_norm.weight", (d_model,))]
            n = 2
        b += [(f"{p}.{n}.DenseReluDense.{w}.weight", (d_ff, d_model)) for w in ff]
        b += [(f"{p}.{n}.DenseReluDense.wo.weight", (d_model, d_ff)), (f"{p}.{n}.layer_norm.weight", (d_model,))]
        return b

    for i in range(layers):
        s += block("encoder", i, False)
    s.append(("encoder.final_layer_norm.weight", (d_model,)))
    if decoder_layers:
        s.append(("decoder.embed_tokens.weight", (vocab, d_model)))
        for i in range(decoder_layers):
            s += block("decoder", i, True)
        s.append(("decoder.final_layer_norm.weight", (d_model,)))
    if lm_head:
        s.append(("lm_head.weight", (vocab, d_model)))
    return s


def _values(key: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if key.endswith(".scale") or "norm" in key and len(shape) == 1:
        t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
    elif key.endswith(".bias"):
        t = 0.01 * torch.randn(shape, generator=gen)
    else:
        t = 0.02 * torch.randn(shape, generator=gen)
    return t.to(dtype)


def iter_tensors(specs: list[Spec], dtype: torch.dtype, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    for key, shape in specs:
        yield key, _values(key, shape, dtype, gen)


def write_model(path: str, specs: list[Spec], dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                metadata: dict[str, str] | None = None, overwrite: bool = True) -> str:
    """Write a synthetic model file tensor by tensor; returns `path`."""
    st = TORCH_TO_ST[dtype]
    with StreamingWriter(path, [(k, st, tuple(shape)) for k, shape in specs], metadata, overwrite) as w:
        for key, t in iter_tensors(specs, dtype, seed):
            w.write(key, t)
        w.commit()
    return path


def demo_flux(folder: str, dtype: torch.dtype = torch.bfloat16) -> str:
    """A small FLUX-shaped model (hidden 256, 2 double + 2 single blocks; ~15 MB in BF16, ~30 MB in FP32)."""
    tag = "" if dtype == torch.bfloat16 else f"-{TORCH_TO_ST[dtype].lower()}"
    return write_model(os.path.join(folder, f"demo-flux-small{tag}.safetensors"),
                       flux_specs(hidden=256, double_blocks=2, single_blocks=2, head_dim=64, context_dim=512),
                       dtype, seed=0, metadata={"note": "synthetic demo model"})
