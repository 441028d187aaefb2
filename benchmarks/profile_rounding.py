"""Where the time of the default (top-k) rounding goes on one tensor: stage times with the device synchronised
around each stage, and the top kernels/operators from torch.profiler. A diagnosis tool for the rounding's speed.

    python benchmarks/profile_rounding.py --shape 3072 12288
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import quant_core.rounding as R  # noqa: E402
from quant_core.rounding import grid, topk_basis, topk_search  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=2, default=[3072, 12288])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    w = (0.02 * torch.randn(*args.shape, generator=g)).to(dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    stage: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            sync()
            t0 = time.perf_counter()
            out = fn(*a, **k)
            sync()
            stage[name] = stage.get(name, 0.0) + time.perf_counter() - t0
            return out
        return wrapper

    orig_basis, orig_pool = topk_search.principal_basis, topk_search.candidate_pool
    for _ in range(2):  # warm-up
        R.round_to_fp16(w, top_k=1, num_iter=256)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.runs):
        R.round_to_fp16(w, top_k=1, num_iter=256)
    sync()
    total = (time.perf_counter() - t0) / args.runs * 1e3
    topk_search.principal_basis, topk_search.candidate_pool = timed("basis", orig_basis), timed("pool", orig_pool)
    stage.clear()
    for _ in range(args.runs):
        R.round_to_fp16(w, top_k=1, num_iter=256)
    topk_search.principal_basis, topk_search.candidate_pool = orig_basis, orig_pool
    print(f"shape {tuple(args.shape)} on {dev}: total {total:.1f} ms per tensor")
    for k, v in stage.items():
        print(f"  {k:8s} {v / args.runs * 1e3:7.2f} ms")
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        R.round_to_fp16(w, top_k=1, num_iter=256)
        sync()
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))
    if dev.type == "cuda":
        evs = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        print(f"device kernels: {sum(e.count for e in evs)} launches, "
              f"{sum(e.self_device_time_total for e in evs) / 1e3:.2f} ms of device time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    if dev.type == "cuda":
        def count(fn):
            with torch.profiler.profile(activities=acts) as p:
                fn()
                sync()
            evs = [e for e in p.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
            return sum(e.count for e in evs), sum(e.self_device_time_total for e in evs) / 1e3
        for name, fn in [("basis", lambda: R.principal_basis(w, 1)),
                         ("pool", lambda: grid.candidate_pool(w, grid.RtnChunks(w), topk_search._pool_cost(1))),
                         ("all", lambda: R.round_to_fp16(w, top_k=1, num_iter=256)),
                         ("1 pass", lambda: R.round_to_fp16(w, top_k=1, num_iter=1))]:
            n, ms = count(fn)
            print(f"  launches {name:8s} {n:5d}  device {ms:6.2f} ms")
    with torch.profiler.profile(activities=acts) as prof:
        R.principal_basis(w, 1)
        sync()
    print("principal_basis only:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))
    # step by step
    w64 = w.double()
    for name, fn in [("double()", lambda: w.double()),
                     ("W @ x", lambda: w64 @ torch.ones(w.shape[1], 7, dtype=torch.float64, device=dev)),
                     ("(y^T W)^T", lambda: (torch.ones(w.shape[0], 7, dtype=torch.float64, device=dev).T @ w64).T),
                     ("orth block", lambda: topk_basis._orthonormalize_block(torch.randn(w.shape[0], 7, dtype=torch.float64,
                                                                                 device=dev))),
                     ("orth final", lambda: topk_basis._orthonormalize(torch.randn(w.shape[0], 63, dtype=torch.float64,
                                                                           device=dev))),
                     ("basis", lambda: R.principal_basis(w, 1))]:
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(5):
            fn()
        sync()
        print(f"  {name:12s} {(time.perf_counter() - t0) / 5 * 1e3:8.3f} ms")


if __name__ == "__main__":
    main()
