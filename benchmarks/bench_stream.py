"""Streaming conversion of a large FLUX-shaped BF16 file: time and peak anonymous memory.

Compares `python -m quant_core --num_iter 0` (and default settings) with what a user would otherwise run
(`safetensors.torch.load_file` -> `.half()` -> `save_file`, its flush to disk counted; whole file in RAM) and with
the project's own plain streaming loop that reads each tensor with safetensors, casts weights to fp16 and writes the
bytes, measured in the same run on the same file.
Each contender runs in its own process; a sampler polls its RssAnon (anonymous memory: what the process itself
allocated, without page cache or the memory-mapped input) every 10 ms.

    python benchmarks/bench_stream.py --gb 6 --dir /tmp/fp16-bench
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PLAIN_LOOP = r"""
import sys, torch
from safetensors import safe_open
from quant_core.safetensors_io import StreamingWriter, TORCH_TO_ST
src, dst = sys.argv[1], sys.argv[2]
with safe_open(src, "pt") as f:
    keys = list(f.keys())
    entries = []
    for k in keys:
        t = f.get_slice(k)
        shape = tuple(t.get_shape())
        st = t.get_dtype()
        entries.append((k, "F16" if (k.endswith(".weight") and len(shape) >= 2) else st, shape))
    with StreamingWriter(dst, entries, overwrite=True) as w:
        for k, st, shape in entries:
            t = f.get_tensor(k)
            w.write(k, t.to(torch.float16) if st == "F16" else t)
        w.commit()
"""

# what a user would otherwise run: the whole file into RAM with safetensors, .half() on 2-D+ weights, save_file,
# then fsync so that the flush to disk is counted as it is for the converter (which fsyncs before its rename);
# prints its own split (load+cast+save / flush) to stderr
PLAIN_CAST = r"""
import os, sys, time, torch
from safetensors.torch import load_file, save_file
src, dst = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
sd = load_file(src)
sd = {k: (v.half() if k.endswith(".weight") and v.dim() >= 2 else v) for k, v in sd.items()}
save_file(sd, dst)
t1 = time.perf_counter()
fd = os.open(dst, os.O_RDONLY)
os.fsync(fd)
os.close(fd)
print(f"    load_file/.half()/save_file {t1 - t0:.1f} s + flush {time.perf_counter() - t1:.1f} s", file=sys.stderr)
"""


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
    """Run `cmd`; return (seconds, peak RssAnon in GB)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.DEVNULL)
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_anon_kb(p.pid))
            time.sleep(0.01)

    th = threading.Thread(target=sample)
    th.start()
    rc = p.wait()
    done.set()
    th.join()
    if rc != 0:
        raise SystemExit(f"{cmd} failed with exit {rc}")
    return time.perf_counter() - t0, peak / 1e6 * 1.024


def make_input(path: str, gb: float) -> tuple[int, int]:
    import torch
    from quant_core.demo import flux_specs, write_model
    # FLUX-dev widths; enough blocks for the requested size (a double block ~0.68 GB, a single ~0.28 GB in BF16)
    n_double = max(1, int(gb / 2 / 0.68))
    n_single = max(1, int((gb - n_double * 0.68) / 0.283 + 0.5))
    specs = flux_specs(double_blocks=n_double, single_blocks=n_single)
    if not os.path.exists(path):
        print(f"writing {path}: {n_double} double + {n_single} single blocks ...", flush=True)
        write_model(path, specs, torch.bfloat16, seed=0)
    largest = max((s[0] * (s[1] if len(s) > 1 else 1) for _, s in specs))
    return sum(int(__import__("math").prod(s)) for _, s in specs), largest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=6.0)
    ap.add_argument("--dir", default="/tmp/fp16-bench")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--default-settings", action="store_true", help="also time default settings (num_iter 256)")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    src = os.path.join(args.dir, f"flux-shaped-{args.gb:g}gb-bf16.safetensors")
    params, largest = make_input(src, args.gb)
    size = os.path.getsize(src)
    out = os.path.join(args.dir, "out.safetensors")
    ours_cmd = [sys.executable, "-m", "quant_core", "--input", src, "--output", out, "--overwrite", "--quiet",
                "--device", "cpu"]
    contenders = {
        "load_file->.half()->save_file": [sys.executable, "-c", PLAIN_CAST, src, out],
        "plain read->cast->write": [sys.executable, "-c", PLAIN_LOOP, src, out],
        "quant_core --num_iter 0": ours_cmd + ["--num_iter", "0"],
    }
    if args.default_settings:
        contenders["quant_core default settings"] = ours_cmd
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in contenders}
    for _ in range(args.rounds):  # alternate so page-cache state and machine load hit both alike
        for name, cmd in contenders.items():
            results[name].append(measure(cmd))
            os.remove(out)
    limit = 1.5 + 3 * largest * 4 / 1e9
    print(f"\ninput: {src}: {size / 1e9:.2f} GB, {params / 1e9:.2f}e9 BF16 parameters, largest tensor "
          f"{largest / 1e6:.1f}M elements ({largest * 4 / 1e9:.3f} GB as fp32)")
    print(f"{'contender':32s} {'best s':>8s} {'GB/s':>6s} {'peak RssAnon GB':>16s}")
    best = {}
    for name, rs in results.items():
        t = min(r[0] for r in rs)
        peak = max(r[1] for r in rs)
        best[name] = t
        print(f"{name:32s} {t:8.2f} {size / t / 1e9:6.2f} {peak:16.2f}")
    ratio = best["quant_core --num_iter 0"] / best["plain read->cast->write"]
    for name in [n for n in best if n.startswith("quant_core")]:
        print(f"{name} / load_file->.half()->save_file: {best[name] / best['load_file->.half()->save_file']:.2f}")
    peak_ours = max(r[1] for r in results["quant_core --num_iter 0"])
    print(f"\ntime ratio quant_core(--num_iter 0) / plain loop: {ratio:.2f} (target <= 1.5)")
    print(f"peak RssAnon quant_core: {peak_ours:.2f} GB (limit 1.5 GB + 3 x largest fp32 = {limit:.2f} GB)")


if __name__ == "__main__":
    main()
