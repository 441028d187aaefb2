"""Calibrated rounding when the calibration text is not the text of use: end-to-end error of real MiniLM.

    python benchmarks/calib_shift.py                      # 3 seeds, the four cases below
    python benchmarks/calib_shift.py --seeds 0 --cases p2e e2p
    python benchmarks/calib_shift.py --shrink 0.3 --bias-correction --no-check   # other settings of the components
    python benchmarks/calib_shift.py --seeds 0 --rows 0 90 --cases matched p2e e2p   # sketched statistics

Texts: "prose" = sentences of the licence texts in /usr/share/common-licenses (GPL, LGPL, MPL, Apache, ...);
"everyday" = tests/data/everyday.txt (short everyday sentences written for this check). For each seed both are
shuffled and split into a calibration part and a part of use (disjoint):

    matched   calibrate on prose,    use prose (other sentences)
    everyday  calibrate on everyday, use everyday (other sentences)
    p2e       calibrate on prose,    use everyday
    e2p       calibrate on everyday, use prose

For each case: `python -m quant_core capture`'s function records the statistics of the calibration part (no
--eval-text, as a user would run it), the model file is converted twice with the converter (`--num_iter 0` = RTN,
and `--calibration`), and both are loaded into the transformers model. Printed: the relative error of the final
hidden state (all non-padding tokens of the sentences of use) against the FP32 model, calibrated / RTN ("e2e
ratio"); the mean over the Linear layers of each layer's output error / RTN's on the sentences of use, measured with
their exact second moments ("layers"); what the conversion report said about the calibrated layers (its figure and which statistics it was measured on), and
whether the report's direction (below / above 1) agrees with the end-to-end one.
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import re
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from quant_core import ConvertOptions, convert_file, load_dequantized_state_dict  # noqa: E402
from quant_core import capture as capture_mod  # noqa: E402

EVERYDAY = os.path.join(ROOT, "tests", "data", "everyday.txt")
LICENSES = "/usr/share/common-licenses"
CASES = {"matched": ("prose", "prose"), "everyday": ("everyday", "everyday"),
         "p2e": ("prose", "everyday"), "e2p": ("everyday", "prose")}


def license_sentences(folder: str = LICENSES) -> list[str]:
    """Distinct sentences of the licence texts (40-400 characters, mostly letters), in a fixed order."""
    seen, out = set(), []
    for path in sorted(glob.glob(os.path.join(folder, "*"))):
        if os.path.islink(path) or not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            text = " ".join(f.read().split())
        for s in re.split(r'(?<=[.;:])\s+(?=[A-Z"(])', text):
            if 40 <= len(s) <= 400 and sum(c.isalpha() for c in s) > 0.7 * len(s) and s not in seen:
                seen.add(s)
                out.append(s)
    return out


def everyday_sentences() -> list[str]:
    with open(EVERYDAY, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def splits(seed: int, prose_calib: int = 300, prose_use: int = 100, everyday_calib: int = 150
           ) -> dict[str, tuple[list[str], list[str]]]:
    """{"prose"|"everyday": (calibration sentences, sentences of use)} for one seed (disjoint within a register)."""
    rng = random.Random(seed)
    prose, everyday = license_sentences(), everyday_sentences()
    rng.shuffle(prose)
    rng.shuffle(everyday)
    return {"prose": (prose[:prose_calib], prose[prose_calib:prose_calib + prose_use]),
            "everyday": (everyday[:everyday_calib], everyday[everyday_calib:])}


def hidden(model, tok, sentences: list[str]) -> torch.Tensor:
    batch = tok(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    return h[batch["attention_mask"].bool()]


class MiniLM:
    """The real model, its tokenizer, and end-to-end error of converted files on given sentences."""

    def __init__(self, model_dir: str):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        self.dir = model_dir
        self.src = os.path.join(model_dir, "model.safetensors")
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir, use_safetensors=True).eval()
        self._ref: dict[tuple, torch.Tensor] = {}

    def error(self, path: str, sentences: list[str]) -> float:
        """Relative error of the final hidden state of the converted file `path` against FP32."""
        key = tuple(sentences)
        if key not in self._ref:
            self._ref[key] = hidden(self.model, self.tok, sentences)
        ref = self._ref[key]
        q = type(self.model)(self.model.config).eval()
        q.load_state_dict(load_dequantized_state_dict(path, torch.float32), strict=False)
        return float((hidden(q, self.tok, sentences) - ref).norm() / ref.norm())


def layer_ratio(mini: MiniLM, work: str, use: list[str], out: str, rtn: str, cache: dict) -> float:
    """Mean over the model's Linear layers of the output error of `out` / RTN's, measured with EXACT second moments
    of the sentences of use (captured here once per text): the per-layer figure on text the rounding never saw,
    independent of the statistics the conversion used."""
    from quant_core.calibration import load_calibration, output_errors

    key = ("use", tuple(use))
    if key not in cache:
        path = os.path.join(work, f"use{len([k for k in cache if k[0] == 'use'])}.calib.safetensors")
        capture_mod.capture(mini.dir, use, path, max_length=128, batch_size=32, rows=None, budget_bytes=None)
        cache[key] = load_calibration(path)
    cs = cache[key]
    if ("weights", out) not in cache:
        cache["weights", out] = load_dequantized_state_dict(out, torch.float32)
    if ("weights", rtn) not in cache:
        cache["weights", rtn] = load_dequantized_state_dict(rtn, torch.float32)
    q_all, r_all = cache["weights", out], cache["weights", rtn]
    orig = mini.model.state_dict()
    ratios = []
    for k in cs.keys():
        if k not in q_all or k not in orig:
            continue
        cal = cs.get(k)
        w = orig[k].float()
        e, _ = output_errors(w, q_all[k].float(), cal.mean, cal.gram)
        e_rtn, _ = output_errors(w, r_all[k].float(), cal.mean, cal.gram)
        ratios.append(e / e_rtn if e_rtn > 0 else 1.0)
    return sum(ratios) / len(ratios)


def report_prediction(report: dict) -> dict:
    learned = report["learned"]
    return {"ratio": learned.get("output_error_ratio_mean"),
            "ratio_bias": learned.get("output_error_ratio_bias_corrected_mean"),
            "kept": learned.get("calibrated_tensors"), "fallbacks": learned.get("calibrated_fallbacks", 0),
            "on": learned.get("output_error_on"), "relF_ratio": report.get("error_ratio")}


def run_case(mini: MiniLM, work: str, calib: list[str], use: list[str], tag: str, rtn_cache: dict,
             options: dict | None = None, rows: int | None = None) -> dict:
    """Capture (once per `tag`; `rows` per layer, None = exact second moments), convert (once per `tag`; RTN once
    per `rtn_cache`), measure on `use`."""
    cal = os.path.join(work, f"{tag}.calib.safetensors")
    if not os.path.exists(cal):
        capture_mod.capture(mini.dir, calib, cal, max_length=128, batch_size=32, rows=rows,
                            budget_bytes=None if rows is None else capture_mod.DEFAULT_BUDGET_BYTES)
    rtn = os.path.join(work, "rtn.safetensors")
    if "rtn" not in rtn_cache:
        convert_file(mini.src, rtn, ConvertOptions(num_iter=0, overwrite=True))
        rtn_cache["rtn"] = True
    out = os.path.join(work, f"{tag}.out.safetensors")
    if (tag, "report") not in rtn_cache:  # one conversion per calibration file, used for every text of use
        t0 = time.perf_counter()
        rtn_cache[tag, "report"] = convert_file(mini.src, out, ConvertOptions(calibration=cal, overwrite=True,
                                                                               **(options or {})))
        rtn_cache[tag, "seconds"] = time.perf_counter() - t0
    report, secs = rtn_cache[tag, "report"], rtn_cache[tag, "seconds"]
    e_rtn, e_cal = mini.error(rtn, use), mini.error(out, use)
    return {"rtn": e_rtn, "cal": e_cal, "ratio": e_cal / e_rtn, "report": report_prediction(report),
            "seconds": secs, "layer_ratio": layer_ratio(mini, work, use, out, rtn, rtn_cache)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bias-correction", action="store_true", help="convert with bias correction on")
    p.add_argument("--shrink", type=float, help="shrinkage towards the diagonal (default: rounding.SHRINK)")
    p.add_argument("--no-check", action="store_true", help="no held-out check (report figure in-sample)")
    p.add_argument("--rows", type=int, nargs="+", default=[0],
                   help="activation rows the statistics keep per layer (0 = exact second moments, the default; "
                        "below MiniLM's widths 384/1536 the statistics are sketches of their top directions)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from quant_core import rounding
    if args.shrink is not None:
        rounding.SHRINK = args.shrink
    if args.no_check:
        rounding.HELD_OUT_CHECK = False
    options = {"bias_correction": True} if args.bias_correction else None
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from conftest import minilm_dir

    mini = MiniLM(minilm_dir())
    print(f"{'seed':>4} {'rows':>5} {'case':>9} {'cal tok':>7} {'RTN err':>9} {'cal err':>9} {'e2e ratio':>9} "
          f"{'layers':>6} {'report':>7} {'report+b':>8} {'agrees':>6} {'kept':>4} {'fb':>3} {'relF x':>6} {'s':>5}  report on")
    rtn_cache: dict = {}
    with tempfile.TemporaryDirectory() as work:
        for seed in args.seeds:
            parts = splits(seed)
            for rows, case in [(rows, case) for rows in args.rows for case in args.cases]:
                cal_reg, use_reg = CASES[case]
                calib, use = parts[cal_reg][0], parts[use_reg][1]
                r = run_case(mini, work, calib, use, f"s{seed}-{cal_reg}-r{rows}", rtn_cache, options, rows or None)
                rep = r["report"]
                pred = rep["ratio_bias"] if rep["ratio_bias"] is not None else rep["ratio"]
                agree = (pred < 1) == (r["ratio"] < 1) if pred is not None else None
                ntok = sum(len(mini.tok(s)["input_ids"]) for s in calib)
                print(f"{seed:>4} {rows or 'exact':>5} {case:>9} {ntok:>7} {r['rtn']:>9.3e} {r['cal']:>9.3e} {r['ratio']:>9.3f} "
                      f"{r['layer_ratio']:>6.3f} {rep['ratio'] or float('nan'):>7.3f} {rep['ratio_bias'] or float('nan'):>8.3f} "
                      f"{str(agree):>6} {rep['kept']:>4} {rep['fallbacks']:>3} {rep['relF_ratio']:>6.3f} "
                      f"{r['seconds']:>5.0f}  {rep['on']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
