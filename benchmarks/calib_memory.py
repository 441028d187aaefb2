"""Calibration statistics of full FLUX-dev and T5XXL shapes in bounded memory: capture and calibrated-conversion
cost, sketched against exact.

    python benchmarks/calib_memory.py                          # everything (a CUDA GPU: about 5 minutes on an H200)
    python benchmarks/calib_memory.py --parts plan             # the budget arithmetic only (no rows, any machine)
    python benchmarks/calib_memory.py --parts capture --models t5xxl --steps 2
    python benchmarks/calib_memory.py --parts gptq --shapes 3072x3072 3072x15360
    python benchmarks/calib_memory.py --parts model --models t5xxl --blocks 2

plan: for the default budget (`calibration.DEFAULT_BUDGET_BYTES`), the rows per layer the writer keeps for every
input group of the model (the widths below), the file size that gives, and the exact-Gram size for comparison.

capture: synthetic activations of realistic shape (FLUX-dev: 4096 image + 512 text tokens per step, the double
blocks' image stream sees 4096 rows, the text stream 512, the single blocks 4608, modulation layers one row;
T5XXL: `--t5-tokens` tokens per step) are generated on the device and fed through `CalibrationWriter` for EVERY
input group of the model, alternating steps between the fit half and the rest, then the file is written. No weights
are needed for statistics. Printed: wall time per step, file write time and size, peak RSS of the process, peak
device memory (torch's allocator), and what the writer held. Each capture runs in its own process (peak RSS is a
per-process maximum).

gptq: per weight shape (out x in) one synthetic layer and activations with a decaying spectrum and a few outlier
features; statistics captured twice (sketched at the rows the FLUX budget allows, and exact), written as version 3
files, read back with `load_calibration` and rounded by `round_to_fp16` (the converter's path, calibrated mode, on
the device): wall time, peak RSS, peak device memory, and the held-out figure each reports, plus the output error of
both results measured on fresh rows from the same distribution (exact statistics, not the sketch).

model: the converter's whole path on the first `--blocks` blocks of a full-shaped model (T5XXL: one encoder block;
FLUX-dev: one double block and one single block per "block"): an FP32 safetensors file of those blocks (random
weights), its calibration file captured as above at the rows the FULL model's plan allows, then `convert_file` with
`calibration=` on the device. Printed: conversion wall time, peak RSS, peak device memory, sizes, calibrated tensors
and fallbacks, and for T5XXL the whole model's conversion time scaled from these blocks (an extrapolation, labelled
so).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from quant_core.calibration import DEFAULT_BUDGET_BYTES, CalibrationWriter  # noqa: E402
from quant_core.sketch import STORE_DTYPE, WEIGHT_DTYPE  # noqa: E402


def flux_groups() -> list[tuple[str, int, str]]:
    """(group, input width, row kind) for every Linear input of FLUX-dev (19 double, 38 single blocks)."""
    g = [("img_in", 64, "img"), ("txt_in", 4096, "txt"), ("time_in.in_layer", 256, "vec"),
         ("time_in.out_layer", 3072, "vec"), ("guidance_in.in_layer", 256, "vec"),
         ("guidance_in.out_layer", 3072, "vec"), ("vector_in.in_layer", 768, "vec"),
         ("vector_in.out_layer", 3072, "vec"), ("final_layer.adaLN_modulation.1", 3072, "vec"),
         ("final_layer.linear", 3072, "img")]
    for i in range(19):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}_"
            g += [(p + "mod.lin", 3072, "vec"), (p + "attn.qkv", 3072, s), (p + "attn.proj", 3072, s),
                  (p + "mlp.0", 3072, s), (p + "mlp.2", 12288, s)]
    for i in range(38):
        p = f"single_blocks.{i}."
        g += [(p + "modulation.lin", 3072, "vec"), (p + "linear1", 3072, "all"), (p + "linear2", 15360, "all")]
    return g


def t5xxl_groups() -> list[tuple[str, int, str]]:
    """T5XXL encoder: per block q/k/v (one input), o, wi_0/wi_1 (one input), wo."""
    g = []
    for i in range(24):
        p = f"encoder.block.{i}.layer."
        g += [(p + "0.SelfAttention.qkv", 4096, "all"), (p + "0.SelfAttention.o", 4096, "all"),
              (p + "1.DenseReluDense.wi", 4096, "all"), (p + "1.DenseReluDense.wo", 10240, "all")]
    return g


MODELS = {"flux": flux_groups, "t5xxl": t5xxl_groups}


def rows_per_step(kind: str, model: str, t5_tokens: int) -> int:
    if model == "t5xxl":
        return t5_tokens
    return {"img": 4096, "txt": 512, "all": 4608, "vec": 1}[kind]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


SAMPLING_STEPS = 20  # the FLUX sampling run the plans assume: the capture node caps a modulation input at 4 calls
# per step x its rows per call


def flux_caps(model: str, steps: int = SAMPLING_STEPS) -> dict[str, int]:
    """{group: most rows} the sampling capture node gives the writer for FLUX-dev (none for T5XXL's prompts)."""
    if model != "flux":
        return {}
    return {g: 4 * steps * rows_per_step(k, model, 0) for g, _, k in MODELS[model]() if k == "vec"}


def plan(budget: int, steps: int = SAMPLING_STEPS) -> None:
    print(f"budget {budget / 1e9:.2f} GB (statistics held + one cut's transient; per group one basis shared by the "
          f"fit half and the rest, and the fit half's weight)")
    per_value = torch.empty(0, dtype=STORE_DTYPE).element_size()  # the basis rows (exact matrices: float32)
    per_weight = torch.empty(0, dtype=WEIGHT_DTYPE).element_size()  # the fit half's [rows, rows] weight
    for name, fn in MODELS.items():
        groups = fn()
        widths = [d for _, d, _ in groups]
        # a sampling run (the capture node): the modulation inputs ("vec") see one row per model call, and the node
        # tells the writer there are at most 4 calls per step; prompts see tokens everywhere (no caps)
        capped = name == "flux"
        cap_of = flux_caps(name, steps)
        caps = [cap_of.get(g, 1 << 40) for g, _, _ in groups]
        entries = [(d, 2, c) for d, c in zip(widths, caps)]
        rows = CalibrationWriter(budget_bytes=budget).rows_for(entries)
        uncapped = CalibrationWriter(budget_bytes=budget).rows_for([(d, 2) for d in widths])
        exact = sum(8 * d * d for d in widths)  # fit + rest, float32
        file_bytes = sum((per_value * r * d + per_weight * r * r if r < d else 8 * d * d) + 16 * d
                         for d, r in ((d, min(rows, c)) for d, c in zip(widths, caps)))
        how = (f"sampling run of {steps} steps: {sum(c < rows for c in caps)} modulation inputs capped at "
               f"{4 * steps} rows; {uncapped} rows per layer without that knowledge" if capped else "prompts")
        print(f"  {name}: {len(widths)} groups, sum of widths {sum(widths)}, widest {max(widths)}: {rows} rows per "
              f"layer (rows/width of the widest {rows / max(widths):.4f}; {how}); statistics held "
              f"{CalibrationWriter.bytes_needed(entries, rows) / 1e9:.2f} GB, file <= {file_bytes / 1e9:.2f} GB; "
              f"exact second moments would hold {exact / 1e9:.1f} GB (fit + rest, float32; the float64 "
              f"accumulators twice that)")


def synthetic(n: int, d: int, gen: torch.Generator, device, dtype=torch.bfloat16, rank: int = 64) -> torch.Tensor:
    """Rows with a decaying spectrum (rank-`rank` structure plus noise) and a few large outlier features."""
    z = torch.randn(n, rank, generator=gen, device=device)
    basis = torch.randn(rank, d, generator=gen, device=device) / rank ** 0.5
    basis *= (torch.arange(rank, device=device) + 1.0).pow(-0.7)[:, None]
    x = z @ basis + 0.05 * torch.randn(n, d, generator=gen, device=device)
    x[:, :: max(1, d // 8)] *= 20.0
    return x.to(dtype)


def run_capture(model: str, steps: int, budget: int, device: str, t5_tokens: int, out_dir: str,
                limit: int | None = None) -> dict:
    groups = MODELS[model]()[:limit]
    w = CalibrationWriter(budget_bytes=budget)
    w.plan({g: d for g, d, _ in groups}, parts=2, caps=flux_caps(model))
    for g, _, _ in groups:
        w.add_layer(f"{g}.weight", g, True)
    gen = torch.Generator(device=device).manual_seed(0)
    bases: dict[int, torch.Tensor] = {}
    torch.zeros(1, device=device)
    rss0 = peak_rss_gb()  # the process with torch (and its CUDA context) loaded, before any statistics
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    step_s = []
    for step in range(steps):
        t0 = time.perf_counter()
        for g, d, kind in groups:
            n = rows_per_step(kind, model, t5_tokens)
            if d not in bases:  # one structure per width, new noise per call: cheap realistic-looking rows
                bases[d] = synthetic(256, d, gen, device, torch.float32)
            idx = torch.randint(0, 256, (n,), generator=gen, device=device)
            x = (bases[d][idx] + 0.05 * torch.randn(n, d, generator=gen, device=device)).to(torch.bfloat16)
            w.add(g, x, fit=step % 2 == 0)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        step_s.append(time.perf_counter() - t0)
        print(f"    {model} step {step}: {step_s[-1]:.1f} s, rows {w.rows}", file=sys.stderr, flush=True)
    path = os.path.join(out_dir, f"{model}.calib.safetensors")
    t0 = time.perf_counter()
    w.save(path, {"model": f"synthetic {model}"})
    save_s = time.perf_counter() - t0
    res = {"model": model, "groups": len(groups), "rows": w.rows, "steps": steps,
           "step_s": [round(s, 2) for s in step_s], "save_s": round(save_s, 2),
           "file_gb": os.path.getsize(path) / 1e9, "held_gb": w.bytes_held() / 1e9,
           "peak_rss_gb": peak_rss_gb(), "rss_before_gb": rss0, "notes": w.notes}
    if device.startswith("cuda"):
        res["peak_vram_gb"] = torch.cuda.max_memory_allocated() / 1e9
    os.remove(path)
    return res


def run_gptq(shape: str, rows: int | None, tokens: int, device: str, out_dir: str, build_on_device: bool = False
             ) -> dict:
    from quant_core.calibration import load_calibration
    from quant_core.rounding import round_to_fp16

    m, n = map(int, shape.split("x"))
    gen = torch.Generator(device=device).manual_seed(1)
    basis = synthetic(256, n, gen, device, torch.float32)
    w = CalibrationWriter(rows=rows, budget_bytes=None)
    w.add_layer("layer.weight", "layer", False)
    for i in range(0, tokens, 4608):
        k = min(4608, tokens - i)
        idx = torch.randint(0, 256, (k,), generator=gen, device=device)
        w.add("layer", basis[idx] + 0.05 * torch.randn(k, n, generator=gen, device=device), fit=(i // 4608) % 2 == 0)
    path = os.path.join(out_dir, f"{shape}-{rows}.calib.safetensors")
    w.save(path)
    file_gb = os.path.getsize(path) / 1e9
    del w
    weight = (0.02 * torch.randn(m, n, generator=gen, device=device)).float()
    # fresh rows of the same distribution: the error both results make on data neither saw (exact statistics)
    idx = torch.randint(0, 256, (8192,), generator=gen, device=device)
    fresh = basis[idx] + 0.05 * torch.randn(8192, n, generator=gen, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = peak_rss_gb()
    t0 = time.perf_counter()
    cal = load_calibration(path, device=device if build_on_device else None).get("layer.weight")
    r = round_to_fp16(weight, top_k=1, num_iter=256, calibration=cal)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    res = {"shape": shape, "rows": rows, "tokens": tokens, "seconds": round(secs, 2), "file_gb": file_gb,
           "peak_rss_gb": peak_rss_gb(), "rss_before_gb": rss0, "method": r.info.get("method"),
           "held_out_ratio": r.info.get("output_error_ratio", r.info.get("calibrated_held_out_ratio"))}
    if device.startswith("cuda"):
        res["peak_vram_gb"] = torch.cuda.max_memory_allocated() / 1e9
    e = (r.q.float() - weight) @ fresh.T
    e_rtn = (weight.half().float() - weight) @ fresh.T
    res["fresh_ratio"] = float(e.norm() / e_rtn.norm())
    os.remove(path)
    return res


def model_weights(model: str, blocks: int) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """({weight key: (out, in)}, {weight key: calibration group}) of the first `blocks` blocks of the model."""
    shapes, groups = {}, {}
    if model == "t5xxl":
        for i in range(blocks):
            p = f"encoder.block.{i}.layer."
            for name, shape, g in (("0.SelfAttention.q", (4096, 4096), "0.SelfAttention.qkv"),
                                   ("0.SelfAttention.k", (4096, 4096), "0.SelfAttention.qkv"),
                                   ("0.SelfAttention.v", (4096, 4096), "0.SelfAttention.qkv"),
                                   ("0.SelfAttention.o", (4096, 4096), "0.SelfAttention.o"),
                                   ("1.DenseReluDense.wi_0", (10240, 4096), "1.DenseReluDense.wi"),
                                   ("1.DenseReluDense.wi_1", (10240, 4096), "1.DenseReluDense.wi"),
                                   ("1.DenseReluDense.wo", (4096, 10240), "1.DenseReluDense.wo")):
                shapes[f"{p}{name}.weight"], groups[f"{p}{name}.weight"] = shape, p + g
        return shapes, groups
    for i in range(blocks):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}_"
            for name, shape in (("mod.lin", (18432, 3072)), ("attn.qkv", (9216, 3072)), ("attn.proj", (3072, 3072)),
                                ("mlp.0", (12288, 3072)), ("mlp.2", (3072, 12288))):
                shapes[f"{p}{name}.weight"], groups[f"{p}{name}.weight"] = shape, p + name
        p = f"single_blocks.{i}."
        for name, shape in (("modulation.lin", (9216, 3072)), ("linear1", (21504, 3072)), ("linear2", (3072, 15360))):
            shapes[f"{p}{name}.weight"], groups[f"{p}{name}.weight"] = shape, p + name
    return shapes, groups


def run_model(model: str, blocks: int, steps: int, budget: int, device: str, t5_tokens: int, out_dir: str) -> dict:
    from safetensors.torch import save_file

    from quant_core import ConvertOptions, convert_file

    shapes, layer_groups = model_weights(model, blocks)
    kinds = {g: (d, kind) for g, d, kind in MODELS[model]()}
    src = os.path.join(out_dir, f"{model}-{blocks}.safetensors")
    gen = torch.Generator().manual_seed(2)
    save_file({k: torch.randn(*shape, generator=gen) * 0.02 for k, shape in shapes.items()}, src)
    w = CalibrationWriter(budget_bytes=budget)
    w.plan({g: d for g, d, _ in MODELS[model]()}, parts=2, caps=flux_caps(model))  # the full model's rows
    for k, g in layer_groups.items():
        w.add_layer(k, g, False)
    dgen = torch.Generator(device=device).manual_seed(0)
    bases = {g: synthetic(4096, kinds[g][0], dgen, device, torch.float32) for g in set(layer_groups.values())}
    for step in range(steps):  # the same distribution in every step (as run_capture), so the held-out check can pass
        for g in sorted(bases):
            d, kind = kinds[g]
            n = rows_per_step(kind, model, t5_tokens)
            idx = torch.randint(0, bases[g].shape[0], (n,), generator=dgen, device=device)
            x = bases[g][idx] + 0.05 * torch.randn(n, d, generator=dgen, device=device)
            w.add(g, x.to(torch.bfloat16), fit=step % 2 == 0)
    cal = os.path.join(out_dir, f"{model}-{blocks}.calib.safetensors")
    w.save(cal, {"model": f"synthetic {model}, {blocks} blocks"})
    rows = w.rows
    del w
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    rss0 = peak_rss_gb()
    dst = os.path.join(out_dir, f"{model}-{blocks}.fp16.safetensors")
    t0 = time.perf_counter()
    report = convert_file(src, dst, ConvertOptions(calibration=cal, device=device))
    secs = time.perf_counter() - t0
    learned = report["learned"]
    res = {"model": model, "blocks": blocks, "rows": rows, "seconds": round(secs, 1),
           "params": sum(a * b for a, b in shapes.values()), "src_gb": os.path.getsize(src) / 1e9,
           "calib_gb": os.path.getsize(cal) / 1e9, "out_gb": os.path.getsize(dst) / 1e9,
           "peak_rss_gb": peak_rss_gb(), "rss_before_gb": rss0,
           "calibrated": learned.get("calibrated_tensors"), "fallbacks": learned.get("calibrated_fallbacks", 0),
           "held_out_ratio": learned.get("output_error_ratio_mean")}
    if device.startswith("cuda"):
        res["peak_vram_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return res


def child(args) -> int:
    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        if args.child == "capture":
            res = run_capture(args.model, args.steps, args.budget, args.device, args.t5_tokens, d, args.limit_groups)
        elif args.child == "model":
            res = run_model(args.model, args.blocks, args.steps, args.budget, args.device, args.t5_tokens, d)
        else:
            res = run_gptq(args.shape, None if args.rows == 0 else args.rows, args.tokens, args.device, d,
                           args.build_on_device)
    print("RESULT " + json.dumps(res))
    return 0


def spawn(extra: list[str], args) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--device", args.device, "--budget", str(args.budget),
           "--tmp", args.tmp or tempfile.gettempdir(), *extra] + (["--build-on-device"] if args.build_on_device else [])
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # progress lines go straight to stderr
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    print(f"  failed ({p.returncode})")
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", default=["plan", "capture", "gptq"], choices=["plan", "capture", "gptq", "model"])
    p.add_argument("--models", nargs="+", default=["flux", "t5xxl"], choices=list(MODELS))
    p.add_argument("--steps", type=int, default=4, help="capture steps (FLUX: denoising steps of 4608 tokens)")
    p.add_argument("--t5-tokens", type=int, default=4096, help="T5XXL tokens per capture step")
    p.add_argument("--shapes", nargs="+", default=["3072x3072", "3072x12288", "12288x3072", "3072x15360"])
    p.add_argument("--tokens", type=int, default=4 * 4608, help="activation rows behind each gptq layer")
    p.add_argument("--gptq-rows", type=int, help="sketch rows for the gptq part (default: what the FLUX budget allows)")
    p.add_argument("--budget", type=int, default=DEFAULT_BUDGET_BYTES)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--build-on-device", action="store_true",
                   help="gptq: load_calibration(device=...): the [in, in] matrices are built on the device")
    p.add_argument("--limit-groups", type=int, help="capture only the first N groups (a smoke run)")
    p.add_argument("--tmp", help="folder for the files written (default: the system's temp folder)")
    p.add_argument("--blocks", type=int, default=1, help="model: blocks of the model converted")
    p.add_argument("--child", choices=["capture", "gptq", "model"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--rows", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device {args.device} ({dev}), torch {torch.__version__}, {os.cpu_count()} CPUs")
    if "plan" in args.parts:
        plan(args.budget)
    if "capture" in args.parts:
        print(f"capture: {args.steps} steps, synthetic bf16 activations on {args.device}, every input group")
        for model in args.models:
            r = spawn(["--child", "capture", "--model", model, "--steps", str(args.steps), "--t5-tokens",
                       str(args.t5_tokens)] + (["--limit-groups", str(args.limit_groups)] if args.limit_groups else []),
                      args)
            if r:
                print(f"  {model}: {r['groups']} groups, {r['rows']} rows per layer; per step {r['step_s']} s; "
                      f"file {r['file_gb']:.2f} GB written in {r['save_s']:.1f} s; statistics held "
                      f"{r['held_gb']:.2f} GB; peak RSS {r['peak_rss_gb']:.2f} GB ({r['rss_before_gb']:.2f} before); "
                      f"peak device memory "
                      f"{r.get('peak_vram_gb', float('nan')):.2f} GB", flush=True)
                for line in r["notes"]:
                    print(f"    note: {line}")
    if "gptq" in args.parts:
        caps = flux_caps("flux")
        flux_widths = [(d, 2, caps.get(g, 1 << 40)) for g, d, _ in flux_groups()]
        rows = args.gptq_rows or CalibrationWriter(budget_bytes=args.budget).rows_for(flux_widths)
        print(f"gptq (calibrated rounding of one layer, {args.tokens} rows of statistics, fresh-row figure on 8192 "
              f"new rows): sketch of {rows} rows vs exact")
        for shape in args.shapes:
            for r_ in (rows, 0):
                r = spawn(["--child", "gptq", "--shape", shape, "--rows", str(r_), "--tokens", str(args.tokens)],
                          args)
                if r:
                    print(f"  {shape:>11} {'exact' if r_ == 0 else f'rows {r_}':>10}: {r['seconds']:6.1f} s, peak "
                          f"RSS {r['peak_rss_gb']:.2f} GB (process; {r['rss_before_gb']:.2f} before the layer), peak "
                          f"device memory {r.get('peak_vram_gb', float('nan')):.2f} GB, file {r['file_gb']:.3f} GB;"
                          f" {r['method']}, held-out ratio {r['held_out_ratio']}, fresh rows {r['fresh_ratio']:.4f}",
                          flush=True)
    if "model" in args.parts:
        for model in args.models:
            r = spawn(["--child", "model", "--model", model, "--blocks", str(args.blocks), "--steps", str(args.steps),
                       "--t5-tokens", str(args.t5_tokens)], args)
            if r:
                scale = (24 / r["blocks"]) if model == "t5xxl" else None
                print(f"  {model}, first {r['blocks']} block(s), {r['params'] / 1e9:.2f} B parameters ({r['src_gb']:.2f} GB"
                      f" FP32): calibrated conversion {r['seconds']} s, peak RSS {r['peak_rss_gb']:.2f} GB "
                      f"({r['rss_before_gb']:.2f} before), peak device memory {r.get('peak_vram_gb', float('nan')):.2f} "
                      f"GB; output {r['out_gb']:.2f} GB, calibration file {r['calib_gb']:.3f} GB ({r['rows']} rows per "
                      f"layer, the full model's); {r['calibrated']} calibrated tensors, {r['fallbacks']} fallbacks, "
                      f"held-out ratio {r['held_out_ratio']}", flush=True)
                if scale:
                    print(f"    whole model (24 blocks), scaled from these blocks (extrapolated, not "
                          f"measured): {r['seconds'] * scale / 60:.0f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
