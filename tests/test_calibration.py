"""Calibrated rounding with real MiniLM activations, end to end, when the calibration text is and is not the text
of use.

Texts (benchmarks/calib_shift.py): "prose" = sentences of the licence texts in /usr/share/common-licenses,
"everyday" = tests/data/everyday.txt (everyday sentences written for this check). Statistics are recorded with
`quant_core.capture`, the model file is converted by the converter and loaded into the transformers model; the
figure is the relative error of the final hidden state against FP32, calibrated / RTN.

The multi-seed variant (three splits, four cases) takes several minutes on a CPU:
    python -m pytest tests/test_calibration.py -m slow
"""

import json
import os
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import ROOT, minilm_dir, run_cli
from quant_core import ConvertOptions, convert_file
from quant_core import capture as capture_mod
from quant_core import rounding
from quant_core.calibration import bias_correction, load_calibration, output_errors
from quant_core.report import format_summary
from quant_core.rounding import neighbours, round_to_fp16

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import calib_shift  # noqa: E402

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The calibrated mode runs many small column operations; on a shared 2-core machine one intra-op thread is
    several times faster than two fighting other processes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def mini():
    os.environ["HF_HUB_OFFLINE"] = "1"
    return calib_shift.MiniLM(minilm_dir())


@pytest.fixture(scope="module")
def texts():
    return calib_shift.splits(0)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("calib")


@pytest.fixture(scope="module")
def calibration_files(mini, texts, workdir):
    """{"prose"|"everyday": calibration file} recorded on the calibration part of each register."""
    out = {}
    for reg in ("prose", "everyday"):
        path = str(workdir / f"{reg}.calib.safetensors")
        src = capture_mod.capture(mini.dir, texts[reg][0], path, max_length=128, batch_size=32)
        assert src["tokens"] > (8000 if reg == "prose" else 1500), src
        out[reg] = path
    return out


@pytest.fixture(scope="module")
def converted(mini, calibration_files, workdir):
    """{"rtn"|"prose"|"everyday": (file, report)}: RTN and the file calibrated on each register (default settings)."""
    out = {"rtn": (str(workdir / "rtn.safetensors"), None)}
    out["rtn"] = (out["rtn"][0], convert_file(mini.src, out["rtn"][0], ConvertOptions(num_iter=0)))
    for reg, cal in calibration_files.items():
        path = str(workdir / f"{reg}.out.safetensors")
        out[reg] = (path, convert_file(mini.src, path, ConvertOptions(calibration=cal)))
    return out


@pytest.fixture(scope="module")
def weights():
    return load_file(os.path.join(minilm_dir(), "model.safetensors"))


@pytest.mark.parametrize("case, limit", [("matched", 0.8), ("p2e", 1.0), ("e2p", 1.0)])
def test_end_to_end_ratio_to_rtn(mini, texts, converted, case, limit):
    """Matched text: clearly below RTN. Shifted text (both directions): never above RTN. The report's figure (held-out
    half of the calibration text) says "better" and the model is better."""
    cal_reg, use_reg = calib_shift.CASES[case]
    use = texts[use_reg][1]
    path, report = converted[cal_reg]
    e_rtn, e_cal = mini.error(converted["rtn"][0], use), mini.error(path, use)
    ratio = e_cal / e_rtn
    learned = report["learned"]
    print(f"{case}: end-to-end {e_cal:.3e} / {e_rtn:.3e} = {ratio:.3f}; report {learned['output_error_ratio_mean']:.3f}"
          f" on {learned['output_error_on']}, {learned['calibrated_fallbacks']} fallbacks")
    assert ratio <= limit, (case, ratio)
    assert learned["output_error_on"] == "held-out half"
    assert (learned["output_error_ratio_mean"] < 1) == (ratio < 1)


def test_report_of_a_calibrated_conversion(converted, calibration_files):
    path, report = converted["prose"]
    rows = {t["key"]: t for t in report["tensors"]}
    assert rows["embeddings.word_embeddings.weight"]["method"] == "topk"  # no activations recorded
    kept = [t for t in report["tensors"] if t.get("method") == "gptq"]
    fallbacks = [t for t in report["tensors"] if t.get("calibrated_fallback")]
    assert len(kept) + len(fallbacks) == 36  # the encoder layers (the file has no pooler)
    assert report["learned"]["calibrated_tensors"] == len(kept) >= 30
    # every layer kept lowered the output error on calibration rows it was not fitted on; the others fell back
    assert all(t["output_error_ratio"] < 1 and t["output_error_on"] == "held-out half" for t in kept)
    assert all(t["calibrated_held_out_ratio"] >= 1 and t["method"] == "topk" for t in fallbacks)
    assert report["learned"]["output_error_ratio_mean"] == pytest.approx(
        sum(t["output_error_ratio"] for t in kept) / len(kept))
    # bias correction is off by default: every bias is the original
    assert report["biases_corrected"] == 0 and report["bias_correction"].startswith("none: off by default")
    with safe_open(path, "pt") as f, safe_open(os.path.join(minilm_dir(), "model.safetensors"), "pt") as g:
        for key in g.keys():
            if key.endswith(".bias"):
                assert torch.equal(f.get_tensor(key), g.get_tensor(key)), key
    summary = format_summary(report)
    assert "calibrated rounding: output error" in summary and "on the held-out half" in summary, summary
    # every stored element is one of its two fp16 neighbours
    key = "encoder.layer.1.intermediate.dense.weight"
    with safe_open(path, "pt") as f, safe_open(os.path.join(minilm_dir(), "model.safetensors"), "pt") as g:
        q, w = f.get_tensor(key), g.get_tensor(key).float()
        scale = float(f.get_tensor(key.replace(".weight", ".scale_weight")))
    r16, other, _, _ = neighbours(w / scale)  # exact: the scale is a power of two
    assert bool(((q == r16) | (q == other)).all())


def test_capture_file_format(calibration_files):
    cs = load_calibration(calibration_files["prose"])
    assert cs.version == 4 and len(cs.keys()) == 37  # 36 encoder layers + pooler
    q = cs.layers["encoder.layer.0.attention.self.query.weight"]
    # q, k and v read the same tensor: one shared group
    assert cs.layers["encoder.layer.0.attention.self.key.weight"]["group"] == q["group"]
    assert cs.layers["encoder.layer.0.attention.self.value.weight"]["group"] == q["group"]
    cal = cs.get("encoder.layer.0.output.dense.weight")
    assert cal.has_bias and cal.gram.shape == (1536, 1536) and cal.mean.shape == (1536,)
    assert torch.allclose(cal.gram, cal.gram.T) and bool((torch.diagonal(cal.gram) >= cal.mean ** 2 * 0.999).all())
    # the fit half: the even-numbered sequences, about half the tokens; the other half follows from the totals
    assert cal.has_split and 0.3 < cal.fit_count / cal.count < 0.7
    (fm, fg), (rm, rg) = cal.halves()  # each half from its own statistics, matrices float32
    fg, rg = fg.double(), rg.double()
    n, nf = cal.count, cal.fit_count
    assert torch.allclose((nf * fg + (n - nf) * rg) / n, cal.gram.double(), rtol=1e-5, atol=1e-6)
    assert bool((torch.diagonal(rg) > 0).any()) and not torch.allclose(fg, rg, rtol=1e-2)
    # a checkpoint that prefixes keys still finds its layers
    assert cs.get("bert.encoder.layer.0.output.dense.weight") is not None
    assert cs.get("encoder.layer.0.output.dense.bias") is None


def test_held_out_check_falls_back_to_the_default_mode(calibration_files, weights):
    """A layer whose rounding does not lower the output error on the held-out half of the calibration sequences is
    rounded as without calibration (the default mode)."""
    cs = load_calibration(calibration_files["everyday"])
    key = "encoder.layer.5.output.dense.weight"
    w = weights[key].float()
    res = round_to_fp16(w, top_k=1, num_iter=256, calibration=cs.get(key))
    if res.info["method"] == "gptq":
        assert res.info["output_error_ratio"] < 1 and res.info["output_error_on"] == "held-out half"
    else:
        assert res.info["calibrated_held_out_ratio"] >= 1 and res.info["method"] == "topk"
    # a fit half whose statistics have nothing to do with the layer's inputs (a random Gram matrix, tiny, so the
    # other half stays the real one): what is learnt from it does not carry over, and the check must see that
    bad = cs.get(key)
    d = bad.gram.shape[0]
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64) / d ** 0.5
    bad.fit_gram = (a @ a.T * 1e-6 * float(torch.diagonal(bad.gram).mean())).float()
    res = round_to_fp16(w, top_k=1, num_iter=256, calibration=bad)
    assert res.info["method"] == "topk" and res.info["calibrated_held_out_ratio"] >= 1, res.info
    assert res.info["calibrated_fallback"].startswith("no gain on the held-out half")
    assert torch.equal(res.q, round_to_fp16(w, top_k=1, num_iter=256).q)  # exactly the default mode's bytes


def test_bias_correction_sign_and_opt_in(calibration_files, weights):
    """The correction (off by default) has the right sign: on the calibration tokens it lowers RTN's output error,
    the reference's sign raises it."""
    cs = load_calibration(calibration_files["prose"])
    key = "encoder.layer.2.output.dense.weight"
    cal, w = cs.get(key), weights[key].float()
    rtn = w.half().float()
    plain, _ = output_errors(w, rtn, cal.mean, cal.gram)
    right, _ = output_errors(w, rtn, cal.mean, cal.gram, bias_correction(rtn, w, cal))
    wrong, _ = output_errors(w, rtn, cal.mean, cal.gram, -bias_correction(rtn, w, cal))
    assert right < plain < wrong


def test_synthetic_calibration_changes_no_bias(tmp_path):
    """Without real activations (calib_samples of synthetic rows only) no bias may change."""
    src = os.path.join(minilm_dir(), "model.safetensors")
    out = str(tmp_path / "synthetic.safetensors")
    report = convert_file(src, out, ConvertOptions(calib_samples=512))
    assert report.get("biases_corrected", 0) == 0
    assert report["bias_correction"].startswith("none: no calibration file")
    assert "bias correction: none" in format_summary(report)
    with safe_open(out, "pt") as f, safe_open(src, "pt") as g:
        for key in g.keys():
            if key.endswith(".bias"):
                assert torch.equal(f.get_tensor(key), g.get_tensor(key)), key


def test_bf16_sources_keep_every_exact_element(calibration_files, weights):
    cs = load_calibration(calibration_files["prose"])
    for key in ("encoder.layer.0.attention.self.query.weight", "encoder.layer.3.output.dense.weight"):
        cal = cs.get(key)
        bf = weights[key].bfloat16().float()
        q = round_to_fp16(bf, top_k=1, num_iter=256, calibration=cal).q
        normal = bf.abs() >= 2.0 ** -14
        assert torch.equal(q.float()[normal], bf[normal])


def test_calibrated_rounding_is_deterministic(calibration_files, weights):
    cs = load_calibration(calibration_files["prose"])
    key = "encoder.layer.4.attention.self.value.weight"
    cal = cs.get(key)
    a = round_to_fp16(weights[key].float(), top_k=1, num_iter=256, calibration=cal)
    b = round_to_fp16(weights[key].float(), top_k=1, num_iter=256, calibration=cs.get(key))
    assert torch.equal(a.q.view(torch.int16), b.q.view(torch.int16)) and a.info == b.info
    assert torch.isfinite(a.q.float()).all()


def test_capture_command_line(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n\nA second line of calibration text.\n")
    out = tmp_path / "c.safetensors"
    assert capture_mod.main(["--model", minilm_dir(), "--text", str(text), "--output", str(out)]) == 0
    cs = load_calibration(str(out))
    assert cs.source["tokens"] > 10 and cs.get("encoder.layer.5.output.dense.weight").count == cs.source["tokens"]
    assert capture_mod.main(["--model", minilm_dir(), "--text", str(tmp_path / "missing.txt"),
                             "--output", str(out)]) == 2


def test_cli_bias_correction_flag():
    """`--bias_correction` is accepted and recorded; off by default."""
    p = run_cli("--help")
    assert "--bias_correction" in p.stdout


@pytest.mark.slow
def test_end_to_end_over_seeds_and_cases(mini, workdir):
    """Three splits x four cases (matched prose, matched everyday, prose->everyday, everyday->prose)."""
    ratios = {}
    for seed in (0, 1, 2):
        parts = calib_shift.splits(seed)
        rtn_cache: dict = {}
        for case, (cal_reg, use_reg) in calib_shift.CASES.items():
            r = calib_shift.run_case(mini, str(workdir), parts[cal_reg][0], parts[use_reg][1],
                                     f"slow-s{seed}-{cal_reg}", rtn_cache)
            ratios[seed, case] = r["ratio"]
            assert (r["report"]["ratio"] < 1) == (r["ratio"] < 1), (seed, case, r)
    print(json.dumps({f"{s}-{c}": round(v, 4) for (s, c), v in ratios.items()}))
    for (seed, case), ratio in ratios.items():
        assert ratio <= (0.8 if case in ("matched", "everyday") else 1.0), (seed, case, ratio)
