"""The converter needs nothing but torch, safetensors and tqdm: numpy is not a dependency.

torch wheels need not bring numpy, and `pip install -e .` does not; a conversion that touched numpy would fail
there with "Numpy is not available". Here numpy is made unimportable in a fresh interpreter (as if it were not
installed) and the README's first command, the demo, runs through (both models converted), as does a conversion
of FP32 weights with default settings (the learned rounding at work).
"""

import json
import os
import subprocess
import sys

import torch
from safetensors import safe_open

from conftest import ROOT

BLOCK_NUMPY = """
import sys
class _NoNumpy:
    def find_spec(self, name, path=None, target=None):
        if name == "numpy" or name.startswith("numpy."):
            raise ModuleNotFoundError("No module named 'numpy' (blocked by the test)")
        return None
sys.meta_path.insert(0, _NoNumpy())
for m in [m for m in sys.modules if m == "numpy" or m.startswith("numpy.")]:
    del sys.modules[m]
from quant_core.cli import main
rc = main(sys.argv[1:])
assert "numpy" not in sys.modules, "numpy was imported"
sys.exit(rc)
"""


def _run_without_numpy(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", BLOCK_NUMPY, *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Numpy is not available" not in p.stderr and "Traceback" not in p.stderr
    return p


def test_demo_runs_without_numpy(tmp_path):
    # the demo's conversions with --num_iter 0 here (the machine-independent part: reading, writing, metrics);
    # the learned rounding without numpy is the next test
    _run_without_numpy("--demo", "--num_iter", "0", "--output", str(tmp_path / "demo.safetensors"),
                       "--report", str(tmp_path / "r.json"), cwd=str(tmp_path))
    fp32_out = tmp_path / "scaled-fp16-demo" / "demo-flux-small-f32_float16_scaled_learned_svd.safetensors"
    counts = []
    for path in (tmp_path / "demo.safetensors", fp32_out):
        with safe_open(str(path), "pt") as f:
            assert "scaled_fp16" in f.keys()
            counts.append(sum(f.get_tensor(k).dtype == torch.float16 for k in f.keys()) - 1)
    r = json.loads((tmp_path / "r.json").read_text())  # the report of the first (BF16) conversion
    assert counts[0] == counts[1] == r["counts"]["quantized"] > 0


def test_learned_rounding_runs_without_numpy(tmp_path, t5_fp32):
    out = tmp_path / "o.safetensors"
    _run_without_numpy("--input", t5_fp32, "--output", str(out), "--report", str(tmp_path / "r.json"))
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["learned"]["topk_tensors"] > 0 and r["changed_vs_rtn"] > 0
    with safe_open(str(out), "pt") as f:
        assert sum(f.get_tensor(k).dtype == torch.float16 for k in f.keys()) - 1 == r["counts"]["quantized"]
