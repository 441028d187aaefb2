"""Signals cancel a conversion cleanly, and a conversion killed where no handler runs leaves nothing for long.

Real subprocesses, real signals, a file large enough that the signal arrives while the temporary output is being
written: SIGINT, SIGTERM and SIGHUP (Ctrl-C, `kill` / `docker stop`, a closed terminal) and a burst of Ctrl-C end
in one line and exit status 2 with no output and no temporary file; after SIGKILL the next conversion into that
folder removes the orphan, and never the temporary file of a conversion that is still running.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from quant_core import ConvertOptions, convert_file
from quant_core.safetensors_io import StreamingWriter

ROWS, COLS, COUNT = 512, 1024, 32  # 64 MB of FP32 weights, each through the learned rounding


@pytest.fixture(scope="module")
def big_fp32(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("big") / "big.safetensors")
    g = torch.Generator().manual_seed(0)
    entries = [(f"blocks.{i}.lin.weight", "F32", (ROWS, COLS)) for i in range(COUNT)]
    with StreamingWriter(path, entries) as w:
        for key, _, shape in entries:
            w.write(key, torch.randn(*shape, generator=g) * 0.02)
        w.commit()
    return path


def _start(src, out, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-m", "quant_core", "--input", src, "--output", out, "--quiet",
                             "--device", "cpu", *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _temps(folder):
    """Temporary files: hidden, beside the output."""
    return [f for f in os.listdir(folder) if f.startswith(".")]


def _wait_mid_write(proc, folder, min_bytes=1 << 18, timeout=300):
    """Until the temporary output exists and holds more than its header (tensors are being written)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()
        for f in _temps(folder):
            try:
                if os.path.getsize(os.path.join(folder, f)) > min_bytes:
                    return os.path.join(folder, f)
            except FileNotFoundError:
                pass
        time.sleep(0.02)
    raise AssertionError("the conversion never got to writing tensors")


@pytest.mark.parametrize("signals", [[signal.SIGINT], [signal.SIGTERM], [signal.SIGHUP], [signal.SIGINT] * 8],
                         ids=["SIGINT", "SIGTERM", "SIGHUP", "burst of 8 SIGINT"])
def test_signal_cancels_cleanly(tmp_path, big_fp32, signals):
    out = str(tmp_path / "out.safetensors")
    proc = _start(big_fp32, out)
    _wait_mid_write(proc, str(tmp_path))
    for sig in signals:
        proc.send_signal(sig)
        time.sleep(0.8 / len(signals))  # a burst: 8 within 0.8 s, going on while the cancel runs
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, (proc.returncode, stderr)
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("cancelled at tensor ") and "no file written" in lines[0], stderr
    assert signal.Signals(signals[0]).name in lines[0]
    assert "Traceback" not in stderr and "terminate called" not in stderr
    assert os.listdir(tmp_path) == []  # no output, no temporary file


def test_killed_conversion_leaves_an_orphan_that_the_next_one_removes(tmp_path, big_fp32):
    out = str(tmp_path / "out.safetensors")
    proc = _start(big_fp32, out)
    orphan = _wait_mid_write(proc, str(tmp_path))
    proc.kill()  # SIGKILL: no handler runs
    proc.communicate(timeout=60)
    assert os.path.exists(orphan)
    # a live conversion's temporary file is never taken: start one, then convert something else into the folder
    live = _start(big_fp32, str(tmp_path / "live.safetensors"))
    try:
        live_tmp = None
        t0 = time.monotonic()
        while live_tmp is None and time.monotonic() - t0 < 300:
            live_tmp = next((os.path.join(tmp_path, f) for f in _temps(tmp_path)
                             if os.path.join(tmp_path, f) != orphan and ".live." in f), None)
            time.sleep(0.02)
        assert live_tmp is not None
        small = str(tmp_path / "small.safetensors")
        from safetensors.torch import save_file
        save_file({"a.weight": torch.randn(8, 8)}, small)
        convert_file(small, str(tmp_path / "small_out.safetensors"), ConvertOptions(num_iter=0))
        assert not os.path.exists(orphan)  # removed: older than this conversion and no process holds it
        assert os.path.exists(live_tmp)    # held by the running conversion: left alone
    finally:
        live.send_signal(signal.SIGTERM)
        _, stderr = live.communicate(timeout=300)
    assert live.returncode == 2 and "cancelled" in stderr
    assert sorted(os.listdir(tmp_path)) == ["small.safetensors", "small_out.safetensors"]
