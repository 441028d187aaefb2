"""The GPU path (pinned buffers, device compute) writes the same bytes as the CPU path. Needs CUDA."""

import pytest
import torch

from conftest import small_flux_specs, small_t5_specs
from quant_core import ConvertOptions, convert_file
from quant_core.demo import write_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("kind", ["flux-bf16", "t5-fp32", "wide-fp32"])
@pytest.mark.parametrize("settings", [dict(num_iter=0), dict(), dict(scale="pow2", top_k=3)])
def test_cpu_and_gpu_write_identical_bytes(tmp_path, kind, settings):
    if kind == "flux-bf16":
        src = write_model(str(tmp_path / "m.safetensors"), small_flux_specs(hidden=256), torch.bfloat16, seed=5)
    elif kind == "t5-fp32":
        src = write_model(str(tmp_path / "m.safetensors"), small_t5_specs(d_model=256, d_ff=512), torch.float32,
                          seed=6)
    else:  # both sides above 512: the top-k basis comes from the Krylov iteration, not the exact small-side SVD
        specs = [("blocks.0.mlp.weight", (640, 1536)), ("blocks.0.mlp.bias", (640,)), ("blocks.1.proj.weight", (1536, 640))]
        src = write_model(str(tmp_path / "m.safetensors"), specs, torch.float32, seed=7)
    outs, reports = [], []
    for device in ("cpu", "cuda"):
        out = str(tmp_path / f"{device}.safetensors")
        reports.append(convert_file(src, out, ConvertOptions(device=device, t5xxl=kind.startswith("t5"), **settings)))
        outs.append(open(out, "rb").read())
    assert outs[0] == outs[1]
    # the out(randn) report figure: the same tensors on both devices, other random rows (drawn on each device)
    cpu, gpu = (r["learned"] for r in reports)
    assert cpu["out_randn_tensors"] == gpu["out_randn_tensors"]
    if cpu["out_randn_tensors"]:
        assert abs(cpu["out_randn_ratio_mean"] - gpu["out_randn_ratio_mean"]) < 0.01


def test_tensor_source_on_gpu_writes_the_same_bytes(tmp_path):
    """Tensors from memory (the save nodes' path: a graph model's weights) on the GPU: same bytes as the CPU."""
    from quant_core import StateDictSource, convert
    g = torch.Generator().manual_seed(8)
    tensors = {k: (0.02 * torch.randn(s, generator=g)) for k, s in small_flux_specs(hidden=256)}
    outs = []
    for device in ("cpu", "cuda"):
        out = str(tmp_path / f"{device}.safetensors")
        convert(StateDictSource.from_tensors("graph", tensors), out, ConvertOptions(device=device))
        outs.append(open(out, "rb").read())
    assert outs[0] == outs[1]


def test_cuda_graph_replays_store_the_same_bytes_as_eager_and_cpu():
    """The default mode captures its Krylov basis and flip search as CUDA graphs on a shape's second use and replays
    them (pool padded to a bucket) for later tensors: every tensor's bytes equal the eager GPU run's and the CPU's,
    across shape changes that grow the shared buffers (dropping and recapturing the graphs)."""
    from quant_core import rounding

    g = torch.Generator().manual_seed(11)
    shapes = [(640, 1536)] * 3 + [(1536, 640)] * 2 + [(1024, 2048)] * 3 + [(640, 1536)] * 2 + [(300, 700)] * 2
    weights = [(0.02 * torch.randn(s, generator=g)) * (1 + 4 * torch.rand(s, generator=g) ** 8) for s in shapes]
    for w in weights:  # three strong directions (a spectral gap after each of the top two, as trained layers have)
        for strength in (3.0, 2.0, 1.5):
            u, v = torch.randn(w.shape[0], 1, generator=g), torch.randn(1, w.shape[1], generator=g)
            w += strength * 0.03 * (w.shape[0] ** 0.5 + w.shape[1] ** 0.5) * (u / u.norm()) @ (v / v.norm())
    rounding.release_device_memory()
    try:
        rounding.USE_CUDA_GRAPHS = False
        eager = [rounding.round_to_fp16(w.cuda(), top_k=2, num_iter=256) for w in weights]
        rounding.USE_CUDA_GRAPHS = True
        graphed = [rounding.round_to_fp16(w.cuda(), top_k=2, num_iter=256) for w in weights]
        captures = rounding.device_graphs(torch.device("cuda")).captures
    finally:
        rounding.USE_CUDA_GRAPHS = True
        rounding.release_device_memory()
    assert captures >= 6  # Krylov + setup + pass for at least two shapes
    for w, a, b in zip(weights, eager, graphed):
        cpu = rounding.round_to_fp16(w, top_k=2, num_iter=256)
        assert torch.equal(a.q.cpu().view(torch.int16), b.q.cpu().view(torch.int16))
        assert torch.equal(cpu.q.view(torch.int16), b.q.cpu().view(torch.int16))
        assert b.info["flips"] > 0 and b.info["topk_ratio"] < 0.5, b.info
        assert a.info["flips"] == b.info["flips"] == cpu.info["flips"]
        # the same kind of check and the same decision; its stated bounds are float noise apart across devices
        kinds = {x.info["topk_check"].split(" (")[0] for x in (a, b, cpu)}
        assert len(kinds) == 1 and not kinds.pop().startswith("withheld"), (a.info, cpu.info)
        assert a.info["passes_used"] == b.info["passes_used"] == cpu.info["passes_used"]
        assert b.info["topk_ratio"] == pytest.approx(cpu.info["topk_ratio"], rel=1e-6, abs=1e-9)


def test_a_failed_graph_capture_falls_back_to_eager_with_a_warning(monkeypatch):
    from quant_core import rounding

    g = torch.Generator().manual_seed(12)
    weights = [0.02 * torch.randn(640, 1536, generator=g) for _ in range(3)]
    cpu = [rounding.round_to_fp16(w, top_k=1, num_iter=256).q for w in weights]

    def broken(*args, **kwargs):
        raise RuntimeError("capture not supported here")

    rounding.release_device_memory()
    monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_begin", broken)
    try:
        with pytest.warns(RuntimeWarning, match="CUDA graph capture failed"):
            got = [rounding.round_to_fp16(w.cuda(), top_k=1, num_iter=256).q.cpu() for w in weights]
        assert rounding.device_graphs(torch.device("cuda")).disabled
    finally:
        rounding.release_device_memory()
    for a, b in zip(cpu, got):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_gpu_stores_the_same_bytes():
    """Graphs, streams and buffers belong to the tensor's own GPU, whatever the current device is."""
    from quant_core import rounding

    g = torch.Generator().manual_seed(13)
    weights = [0.02 * torch.randn(640, 1536, generator=g) for _ in range(3)]
    try:
        for w in weights:
            q = rounding.round_to_fp16(w.to("cuda:1"), top_k=1, num_iter=256).q
            assert q.device == torch.device("cuda:1")
            cpu = rounding.round_to_fp16(w, top_k=1, num_iter=256).q
            assert torch.equal(q.cpu().view(torch.int16), cpu.view(torch.int16))
        assert rounding.device_graphs(torch.device("cuda:1")).captures >= 3
    finally:
        rounding.release_device_memory()
