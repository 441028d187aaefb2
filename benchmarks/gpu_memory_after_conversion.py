"""GPU memory before and after conversions run through the converter node's code, in one process, with the pack
imported the way ComfyUI imports it (a package named after its folder path). Needs a CUDA GPU; ComfyUI's modules
are the test suite's stand-ins (tests/comfy_test_pack/stand_ins.py) with the device set to CUDA.

    python benchmarks/gpu_memory_after_conversion.py [--pack DIR] [--tensors 4] [--conversions 2]

Prints torch.cuda.memory_allocated / memory_reserved at the baseline (CUDA initialised, nothing converted) and
after each conversion, and the largest difference to the baseline. Targets: allocated within 16 MiB of the
baseline, reserved within 64 MiB.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
MIB = 2 ** 20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pack", default=os.path.dirname(HERE), help="pack folder (default: this checkout)")
    p.add_argument("--tensors", type=int, default=4, help="FP32 3072x12288 weights in the file (default 4)")
    p.add_argument("--conversions", type=int, default=2)
    p.add_argument("--num_iter", type=int, default=256)
    p.add_argument("--cpu-dry-run", action="store_true", help="check the script on a machine without a GPU "
                   "(converts on the CPU; every memory figure is 0)")
    args = p.parse_args()
    if args.cpu_dry_run:
        zero = lambda *a, **k: 0  # noqa: E731
        for name in ("init", "synchronize", "reset_peak_memory_stats"):
            setattr(torch.cuda, name, lambda *a, **k: None)
        for name in ("memory_allocated", "memory_reserved", "max_memory_reserved"):
            setattr(torch.cuda, name, zero)
        torch.cuda.get_device_name = lambda *a: "cpu (dry run)"
    elif not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    pack_dir = os.path.abspath(args.pack)
    spec = importlib.util.spec_from_file_location(
        "fp16lr_stand_ins", os.path.join(pack_dir, "tests", "comfy_test_pack", "stand_ins.py"))
    stand_ins = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stand_ins)
    base = tempfile.mkdtemp(prefix="fp16lr-gpu-mem-")
    # ComfyUI's nodes.py: the module name of a pack folder is its path with '.' replaced by '_x_'
    stand_ins.PACK_ROOT = pack_dir
    stand_ins.PACK_MODULE = os.path.join(base, "custom_nodes", "comfyui-scaled-fp16").replace(".", "_x_")
    pack, _ = stand_ins.install(base)
    device = torch.device("cpu" if args.cpu_dry_run else "cuda")
    sys.modules["comfy.model_management"].get_torch_device = lambda: device

    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(0)
    folder = os.path.join(base, "models", "diffusion_models")
    os.makedirs(folder, exist_ok=True)
    save_file({f"blocks.{i}.linear.weight": 0.02 * torch.randn(3072, 12288, generator=gen)
               for i in range(args.tensors)}, os.path.join(folder, "m.safetensors"))

    torch.cuda.init()
    torch.cuda.synchronize()
    rows = [("baseline", torch.cuda.memory_allocated(), torch.cuda.memory_reserved(), None)]
    node = pack.NODE_CLASS_MAPPINGS["ScaledFP16Convert"]()
    peak = 0
    for i in range(args.conversions):
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        node.convert("diffusion_models/m.safetensors", num_iter=args.num_iter, top_k=1, calib_samples=3072,
                     t5xxl=False, keep_distillation=False, output_name=f"out{i}", overwrite=True)
        torch.cuda.synchronize()
        peak = max(peak, torch.cuda.max_memory_reserved())
        rows.append((f"after conversion {i + 1} ({time.perf_counter() - t:.1f} s)", torch.cuda.memory_allocated(),
                     torch.cuda.memory_reserved(), torch.cuda.max_memory_reserved()))
    rounding = sys.modules.get(stand_ins.PACK_MODULE + ".quant_core.rounding")
    b_alloc, b_res = rows[0][1], rows[0][2]
    for label, alloc, res, pk in rows:
        print(f"{label:34s} allocated {alloc / MIB:9.1f} MiB  reserved {res / MIB:9.1f} MiB"
              + (f"  (peak reserved during it {pk / MIB:.0f} MiB)" if pk is not None else ""))
    d_alloc = max(r[1] for r in rows[1:]) - b_alloc
    d_res = max(r[2] for r in rows[1:]) - b_res
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "pack_module": stand_ins.PACK_MODULE, "rounding_module": getattr(rounding, "__name__", None),
                      "tensors": args.tensors, "allocated_over_baseline_mib": d_alloc / MIB,
                      "reserved_over_baseline_mib": d_res / MIB, "peak_reserved_mib": peak / MIB,
                      "allocated_target_met": d_alloc <= 16 * MIB, "reserved_target_met": d_res <= 64 * MIB}))
    stand_ins.uninstall()
    return 0


if __name__ == "__main__":
    sys.exit(main())
