"""Whole-file conversion of a synthetic FLUX-dev-size BF16 model on a GPU with default settings, against a plain
streaming read -> cast -> write of the same file and against what a user would otherwise run
(`safetensors.torch.load_file` -> `.half()` -> `save_file`, flush to disk counted), in the same run.

    python benchmarks/bench_flux_gpu.py --dir /tmp/flux-bench            # full FLUX-dev shapes (~12e9 params)
    python benchmarks/bench_flux_gpu.py --dir /tmp/flux-bench --blocks 1 1 --device cpu   # small smoke run

The input is generated here (weights std 0.02 drawn on the GPU when there is one, then BF16), so nothing is
downloaded. Each contender runs in its own process; a sampler polls its RssAnon every 10 ms. Contenders alternate
over --rounds so page-cache state hits them alike; the best time of each is reported.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# the baseline: safetensors read, cast 2-D+ weights to fp16 on the CPU, stream the bytes out with the same writer
PLAIN_LOOP = r"""
import sys, torch
from safetensors import safe_open
from quant_core.safetensors_io import StreamingWriter
src, dst = sys.argv[1], sys.argv[2]
with safe_open(src, "pt") as f:
    entries = []
    for k in f.keys():
        t = f.get_slice(k)
        shape = tuple(t.get_shape())
        entries.append((k, "F16" if (k.endswith(".weight") and len(shape) >= 2) else t.get_dtype(), shape))
    with StreamingWriter(dst, entries, overwrite=True) as w:
        for k, st, shape in entries:
            t = f.get_tensor(k)
            w.write(k, t.to(torch.float16) if st == "F16" else t)
        w.commit()
"""


# the converter's CLI, printing the process's peak GPU memory (allocated through torch) to stderr when it exits
OURS = r"""
import sys, torch
from quant_core.cli import main
rc = main(sys.argv[1:])
if torch.cuda.is_available():
    print(f"    peak GPU memory allocated: {torch.cuda.max_memory_allocated() / 1e9:.2f} GB", file=sys.stderr)
sys.exit(rc)
"""

# what a user would otherwise run (load_file -> .half() -> save_file, flush counted): the same script as the CPU bench
from bench_stream import PLAIN_CAST  # noqa: E402


def rss_anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(cmd: list[str]) -> tuple[float, float]:
    """Run `cmd`; (seconds, peak RssAnon in GB)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.DEVNULL)
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_anon_kb(p.pid))
            time.sleep(0.01)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rc = p.wait()
    done.set()
    th.join()
    if rc != 0:
        raise SystemExit(f"{cmd} failed with exit {rc}")
    return time.perf_counter() - t0, peak * 1024 / 1e9


def make_input(path: str, double_blocks: int, single_blocks: int, device: str, dtype: str = "bf16") -> int:
    import torch

    from quant_core.demo import flux_specs
    from quant_core.safetensors_io import StreamingWriter

    specs = flux_specs(double_blocks=double_blocks, single_blocks=single_blocks)
    params = sum(math.prod(s) for _, s in specs)
    if os.path.exists(path):
        return params
    t0 = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(0)
    st = {"bf16": "BF16", "fp32": "F32"}[dtype]
    with StreamingWriter(path, [(k, st, tuple(s)) for k, s in specs], None, True) as w:
        for key, shape in specs:
            std = 0.01 if key.endswith(".bias") else 0.02
            t = std * torch.randn(shape, generator=gen, device=device)
            if key.endswith("scale"):
                t += 1.0
            w.write(key, (t.bfloat16() if dtype == "bf16" else t.float()).cpu())
        w.commit()
    print(f"generated {path}: {params / 1e9:.2f}e9 parameters, {os.path.getsize(path) / 1e9:.1f} GB in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return params


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/flux-bench")
    ap.add_argument("--blocks", type=int, nargs=2, default=(19, 38), metavar=("DOUBLE", "SINGLE"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                    help="fp32: every weight inexact in fp16, so the learned rounding works on each (per-tensor "
                         "times by shape are printed; the <= 1.3x target is for the BF16 file)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    src = os.path.join(args.dir, f"flux-{args.blocks[0]}d{args.blocks[1]}s-{args.dtype}.safetensors")
    params = make_input(src, *args.blocks, args.device, args.dtype)
    size = os.path.getsize(src)
    out = os.path.join(args.dir, "out.safetensors")
    report = os.path.join(args.dir, "report.json")
    ours = [sys.executable, "-c", OURS, "--input", src, "--output", out, "--overwrite", "--quiet",
            "--device", args.device]
    contenders = {
        "load_file->.half()->save_file": [sys.executable, "-c", PLAIN_CAST, src, out],
        "plain read->cast->write (CPU)": [sys.executable, "-c", PLAIN_LOOP, src, out],
        "quant_core default settings": ours + ["--report", report],
        "quant_core --num_iter 0": ours + ["--num_iter", "0"],
    }
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in contenders}
    for _ in range(args.rounds):
        for name, cmd in contenders.items():
            results[name].append(measure(cmd))
            print(f"  {name}: {results[name][-1][0]:.1f} s", flush=True)
            os.remove(out)
    print(f"\ninput {os.path.basename(src)}: {size / 1e9:.2f} GB, {params / 1e9:.2f}e9 {args.dtype.upper()} parameters")
    print(f"| {'contender':32s} | {'best s':>7s} | {'GB/s':>5s} | {'peak RssAnon GB':>15s} |")
    print(f"|{'-' * 34}|{'-' * 9}|{'-' * 7}|{'-' * 17}|")
    best = {}
    for name, rs in results.items():
        t = min(r[0] for r in rs)
        best[name] = t
        print(f"| {name:32s} | {t:7.1f} | {size / t / 1e9:5.2f} | {max(r[1] for r in rs):15.2f} |")
    ratio = best["quant_core default settings"] / best["plain read->cast->write (CPU)"]
    rep = json.load(open(report))
    seconds = [t.get("seconds", 0.0) for t in rep["tensors"]]
    plain_cast = best["load_file->.half()->save_file"]
    print(f"\ndefault settings / load_file->.half()->save_file: "
          f"{best['quant_core default settings'] / plain_cast:.2f}; "
          f"--num_iter 0 / it: {best['quant_core --num_iter 0'] / plain_cast:.2f}")
    print(f"default settings / plain loop: {ratio:.2f} (target <= 1.3); peak RssAnon default "
          f"{max(r[1] for r in results['quant_core default settings']):.2f} GB (target <= 2)")
    print(f"report: error_ratio {rep['error_ratio']:.6f}, bit_exact_fraction {rep.get('bit_exact_fraction')}, "
          f"changed_vs_rtn {rep.get('changed_vs_rtn')}, sum of per-tensor seconds {sum(seconds):.1f} s")
    print(f"headline: {rep.get('headline')}")
    print(f"learned: {json.dumps(rep['learned'])}")
    by_shape: dict[str, list[float]] = {}
    for t in rep["tensors"]:
        if t.get("method") == "topk" and (t.get("iterations", 0) > 0 or t.get("topk_check")):
            by_shape.setdefault("x".join(map(str, t["shape"])), []).append(t["seconds"])
    if by_shape:
        print("per-tensor seconds of the learned rounding in this file (whole quantize(): upload, scale, round, "
              "measure), by shape:")
        for shape, ts in sorted(by_shape.items(), key=lambda kv: -len(kv[1])):
            ts = sorted(ts)
            print(f"  {shape:>12s}: {len(ts):3d} tensors, median {ts[len(ts) // 2] * 1e3:6.1f} ms, "
                  f"first {by_shape[shape][0] * 1e3:6.1f} ms, max {ts[-1] * 1e3:6.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"best_s": best, "results": results, "ratio": ratio, "bytes": size, "params": params,
                       "report": {k: v for k, v in rep.items() if k != "tensors"}}, f, indent=1)


if __name__ == "__main__":
    main()
