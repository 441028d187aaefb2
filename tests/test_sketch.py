"""Calibration statistics in bounded memory, on real MiniLM activations: the sketch's error bound against the exact
second moment, the writer's memory budget, the version 4 file (round trip, lazy per-group reading), version 2 files
read as before, and a calibrated conversion from a sketched file end to end."""

import json
import os
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import ROOT, minilm_dir, run_cli
from quant_core import ConvertOptions, convert_file
from quant_core import capture as capture_mod
from quant_core.calibration import (FORMAT_KEY, CalibrationError, CalibrationWriter, LayerCalibration,
                                    load_calibration)
from quant_core import sketch as sketch_mod
from quant_core.sketch import MomentSketch

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import calib_shift  # noqa: E402

INPUTS = ("encoder.layer.1.attention.self.query", "encoder.layer.1.output.dense")  # 384 and 1536 wide


@pytest.fixture(scope="module")
def activations():
    """{module: [tokens, in] float64} real inputs of two MiniLM layers on 120 licence sentences."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    model = AutoModel.from_pretrained(minilm_dir(), use_safetensors=True).eval()
    sentences = calib_shift.splits(0)["prose"][0][:120]
    got = {name: [] for name in INPUTS}
    hooks = []
    mask = None
    for name, mod in model.named_modules():
        if name in INPUTS:
            hooks.append(mod.register_forward_pre_hook(
                lambda m, a, name=name: got[name].append(a[0].detach()[mask].double())))
    with torch.no_grad():
        for i in range(0, len(sentences), 40):
            batch = tok(sentences[i:i + 40], padding=True, truncation=True, max_length=128, return_tensors="pt")
            mask = batch["attention_mask"].bool()
            model(**batch)
    for h in hooks:
        h.remove()
    return {name: torch.cat(v) for name, v in got.items()}


@pytest.mark.parametrize("name", INPUTS)
@pytest.mark.parametrize("rows", [16, 96])
def test_sketch_error_bound_on_real_activations(activations, name, rows):
    x = activations[name]
    n, d = x.shape
    assert n > 3000
    exact = x.T @ x
    sk = MomentSketch(d, rows)
    for i in range(0, n, 700):  # uneven blocks, as a capture delivers them
        sk.add(x[i:i + 700])
    assert sk.count == n and not sk.exact and sk.b.shape[0] <= rows
    assert torch.allclose(sk.sum, x.sum(0), rtol=1e-5) and torch.allclose(sk.sq, torch.diagonal(exact), rtol=1e-5)
    assert sk.b.dtype == torch.bfloat16  # twice the rows per byte of float32
    b = sk.b.double()
    residual = exact - b.T @ b
    s2 = torch.linalg.eigvalsh(exact).flip(0).clamp_min(0.0)  # squared singular values of x, descending
    top = float(s2[0])
    # H - B^T B is PSD up to the tracked rounding of B to bfloat16, and its norm is at most what the cuts dropped
    # plus that rounding (worst-case bounds, tracked)
    assert sk.rounded > 0
    assert float(torch.linalg.eigvalsh(residual)[0]) >= -sk.rounded * (1 + 1e-4) - 1e-5 * top
    assert float(torch.linalg.matrix_norm(residual, 2)) <= (sk.discarded + sk.rounded) * (1 + 1e-4) + 1e-5 * top
    # the estimate used (diagonal raised to the exact one where short) obeys `bound` and is positive semi-definite
    est = sk.second_moment(torch.float64)
    lift = torch.diagonal(est) - torch.diagonal(exact)
    assert float(lift.min()) >= -1e-6 * top and float(lift.max()) <= sk.rounded * (1 + 1e-4) + 1e-6 * top
    assert float(torch.linalg.eigvalsh(est)[0]) >= -1e-9 * top
    assert float(torch.linalg.matrix_norm(exact - est, 2)) <= sk.bound * (1 + 1e-4) + 1e-5 * top
    # the kept directions are near the best possible: the best rank-`rows` approximation leaves s2[rows]
    print(f"rows {rows}: ||H - B^T B|| / best {float(torch.linalg.matrix_norm(residual, 2)) / float(s2[rows]):.3f}")
    assert float(torch.linalg.matrix_norm(residual, 2)) <= 1.5 * float(s2[rows])
    # and it is a useful estimate: far better than the diagonal alone
    diag_only = torch.diag(torch.diagonal(exact))
    err = float(torch.linalg.matrix_norm(exact - est, 2))
    assert err < 0.5 * float(torch.linalg.matrix_norm(exact - diag_only, 2))
    # in the bytes of `rows` float32 rows, the bfloat16 sketch holds 2 * rows: better than float32 at `rows`
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sketch_mod, "STORE_DTYPE", torch.float32)
        half = MomentSketch(d, rows // 2)
        for i in range(0, n, 700):
            half.add(x[i:i + 700])
        assert half.b.dtype == torch.float32
    assert err < float(torch.linalg.matrix_norm(exact - half.second_moment(torch.float64), 2))


def test_rows_at_the_width_are_exact(activations):
    x = activations[INPUTS[0]]
    sk = MomentSketch(x.shape[1], x.shape[1])
    sk.add(x[:1000])
    sk.add(x[1000:])
    assert sk.exact and sk.bound == 0.0
    exact = x.T @ x
    assert torch.allclose(sk.second_moment(torch.float64), exact, rtol=1e-5, atol=1e-5 * float(exact.abs().max()))


def write_v4(path, x, rows, budget=None, eval_rows=None):
    w = CalibrationWriter(rows=rows, budget_bytes=budget)
    w.add_layer("a.weight", "a", True)
    w.add_layer("b.weight", "a", False)
    n = x.shape[0]
    w.add("a", x[: n // 2], fit=True)
    w.add("a", x[n // 2:])
    if eval_rows is not None:
        w.add("a", eval_rows, held_out=True)
    w.save(str(path), {"model": "test"})
    return w


def test_v4_round_trip(activations, tmp_path):
    x = activations[INPUTS[1]]
    n, d = x.shape
    ev = x[:500] * 0.5
    w = write_v4(tmp_path / "c.safetensors", x.float(), rows=64, eval_rows=ev.float())
    cs = load_calibration(str(tmp_path / "c.safetensors"))
    assert cs.version == 4 and cs.keys() == ["a.weight", "b.weight"]
    info = cs.groups["a"]
    assert (info["count"], info["fit_count"], info["rest_count"], info["eval_count"]) == (n, n // 2, n - n // 2, 500)
    assert info["rows"] == {"fit": 64, "rest": 64, "eval": 64} and info["exact"]["fit"] is False
    cal = cs.get("a.weight")
    assert cal.sketched and cal.has_bias and not cs.get("b.weight").has_bias
    assert cal.has_split and cal.count == n and cal.fit_count == n // 2 and cal.eval_count == 500
    assert torch.allclose(cal.mean.double(), x.mean(0), rtol=1e-4, atol=1e-6)
    exact = x.T @ x / n
    g = cal.gram.double()
    top = float(exact.diagonal().max())
    assert bool((torch.diagonal(g).double() >= torch.diagonal(exact) - 1e-5 * top).all())
    # the file's bound (per part, in E[x x^T] units) covers the whole-set estimate: it is a count-weighted mix
    nf = n // 2
    bound = (nf * info["error_bound"]["fit"] + (n - nf) * info["error_bound"]["rest"]) / n
    assert float(torch.linalg.matrix_norm(exact - g, 2)) <= bound * (1 + 1e-3) + 1e-6 * float(exact.diagonal().max())
    assert 0 < info["error_bound"]["fit"] and 0 < w.errors()["a"]["rest"] < 1
    (fm, fg), (rm, rg) = cal.halves()
    assert torch.allclose(fm, x[:nf].mean(0), rtol=1e-4, atol=1e-6)
    assert torch.allclose(rm, x[nf:].mean(0), rtol=1e-4, atol=1e-6)
    # each half's estimate (the shared basis, its own weight, its diagonal raised to the exact one) within its own
    # recorded bound, positive semi-definite, its diagonal at least the exact one
    for est, rows, part in ((fg, x[:nf], "fit"), (rg, x[nf:], "rest"), (cal.eval_gram, ev, "eval")):
        truth = rows.T @ rows / rows.shape[0]
        top = float(truth.diagonal().max())
        assert bool((torch.diagonal(est).double() >= truth.diagonal() - 1e-5 * top).all())
        assert float(torch.linalg.eigvalsh(est.double())[0]) >= -1e-5 * top
        err = float(torch.linalg.matrix_norm(truth - est.double(), 2))
        assert err <= info["error_bound"][part] * (1 + 1e-3) + 1e-6 * float(truth.diagonal().max())
        assert err < 0.5 * float(torch.linalg.matrix_norm(truth - torch.diag(truth.diagonal()), 2))
    assert cs.get("b.weight").gram is cal.gram  # one matrix built per group, shared by its layers
    # compact: one basis of 64 rows for both halves and one for the held-out text, in bfloat16, and the fit half's
    # 64 x 64 weight (float16); not 3 matrices of 1536^2
    assert os.path.getsize(tmp_path / "c.safetensors") < 2 * 64 * d * 2 + 64 * 64 * 2 + 64 * d * 4
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        assert tuple(f.get_slice("a.basis").get_shape()) == (64, d) and f.get_slice("a.basis").get_dtype() == "BF16"
        assert tuple(f.get_slice("a.fit_weight").get_shape()) == (64, 64) and f.get_slice("a.fit_weight").get_dtype() == "F16"
        assert tuple(f.get_slice("a.eval_sketch").get_shape()) == (64, d)
        assert not any(k.endswith(("fit_sketch", "rest_sketch")) for k in f.keys())
        assert json.loads(f.metadata()[FORMAT_KEY])["statistics"]["rows"] == 64


def test_a_shared_basis_beats_two_half_sketches_of_the_same_bytes(activations):
    """The whole-text estimate from one basis of `rows` rows shared by the halves is better than the sum of two
    sketches of rows / 2 each (the previous layout, same bytes of rows), and each half stays within its bound."""
    for name in INPUTS:
        x = activations[name]
        n, d = x.shape
        exact = x.T @ x
        shared = MomentSketch(d, 64, parts=("fit", "rest"))
        halves = [MomentSketch(d, 32), MomentSketch(d, 32)]
        for i in range(0, n, 300):  # alternate blocks, as sequences of the two halves arrive
            part = (i // 300) % 2
            shared.add(x[i:i + 300], ("fit", "rest")[part])
            halves[part].add(x[i:i + 300])
        err_shared = float(torch.linalg.matrix_norm(exact - shared.second_moment(torch.float64), 2))
        two = halves[0].second_moment(torch.float64) + halves[1].second_moment(torch.float64)
        err_two = float(torch.linalg.matrix_norm(exact - two, 2))
        print(f"{name}: ||H - estimate|| shared 64 rows {err_shared:.4g}, two sketches of 32 {err_two:.4g}")
        assert err_shared < 0.8 * err_two
        for k, part in enumerate(("fit", "rest")):
            xs = torch.cat([x[i:i + 300] for i in range(k * 300, n, 600)])
            truth = xs.T @ xs
            err = float(torch.linalg.matrix_norm(truth - shared.second_moment(torch.float64, part=part), 2))
            assert err <= shared.part_bound(part) * (1 + 1e-4) + 1e-5 * float(truth.diagonal().max())
            assert shared.counts[part] == xs.shape[0]


def test_v4_exact_when_rows_reach_the_width(activations, tmp_path):
    x = activations[INPUTS[0]].float()
    write_v4(tmp_path / "c.safetensors", x, rows=3072)
    cs = load_calibration(str(tmp_path / "c.safetensors"))
    cal = cs.get("a.weight")
    assert not cal.sketched and cs.groups["a"]["exact"] == {"fit": True, "rest": True}
    exact = x.double().T @ x.double() / x.shape[0]
    assert torch.allclose(cal.gram.double(), exact, rtol=1e-4, atol=1e-5 * float(exact.abs().max()))


def test_budget_lowers_the_rows_with_a_line_or_refuses(activations, tmp_path):
    x = activations[INPUTS[1]].float()
    d = x.shape[1]
    # a plan that fits the budget exactly at some rows < the requested: the writer keeps those and says so
    lines = []
    w = CalibrationWriter(rows=3072, budget_bytes=30_000_000, on_note=lines.append)
    rows = w.plan({"a": d, "b": 384}, parts=2)
    assert 8 <= rows < d and w.rows == rows
    assert CalibrationWriter.bytes_needed([(d, 2), (384, 2)], rows) <= 30_000_000
    assert CalibrationWriter.bytes_needed([(d, 2), (384, 2)], rows + 1) > 30_000_000
    assert len(lines) == 1 and f"keep {rows} rows per layer (asked 3072)" in lines[0] and "0.03 GB budget" in lines[0]
    w.add("a", x[:2000], fit=True)
    w.add("a", x[2000:])
    w.add("b", activations[INPUTS[0]][:3000].float())
    assert w.bytes_held() <= 30_000_000
    # unplanned groups: the rows come down (every earlier sketch with them) instead of the budget being exceeded
    u_lines = []
    u = CalibrationWriter(rows=3072, budget_bytes=30_000_000, on_note=u_lines.append)
    for i, g in enumerate("abcd"):
        u.add(g, x[i * 500:(i + 1) * 500])
        assert u.bytes_needed([(s.dim, len(s.parts)) for s in u._sketches.values()], u.rows) <= 30_000_000
    assert u.rows < 3072 and u_lines and all(s.rows == u.rows for s in u._sketches.values())
    u.save(str(tmp_path / "u.safetensors"))
    assert os.path.getsize(tmp_path / "u.safetensors") <= 30_000_000
    # a budget below MIN_ROWS rows per layer: refused in one line that says what would be needed
    with pytest.raises(CalibrationError) as e:
        CalibrationWriter(budget_bytes=100_000).plan({"a": d}, parts=2)
    msg = str(e.value)
    assert "budget of 0.00 GB" in msg and "raise the budget" in msg and "\n" not in msg


def test_capture_budget_on_the_command_line(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\nA second line of calibration text.\n" * 8)
    out = tmp_path / "c.safetensors"
    p = run_cli("capture", "--model", minilm_dir(), "--text", str(text), "--output", str(out), "--budget-gb", "0.0001")
    ours = [line for line in p.stderr.strip().splitlines() if not line.startswith("Loading weights")]  # transformers'
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(ours) == 1, p.stderr
    assert ours[0].startswith("error: ") and "raise the budget" in ours[0] and not out.exists()
    p = run_cli("capture", "--model", minilm_dir(), "--text", str(text), "--output", str(out), "--budget-gb", "0.05")
    assert p.returncode == 0, p.stderr
    assert "note: calibration statistics keep" in p.stderr
    cs = load_calibration(str(out))
    rows = json.loads(safe_open(str(out), "pt").metadata()[FORMAT_KEY])["statistics"]["rows"]
    assert 8 <= rows < 384 and os.path.getsize(out) <= 50_000_000
    assert cs.get("encoder.layer.0.output.dense.weight").sketched


def test_v2_files_are_read_as_before(activations, tmp_path):
    """A version 2 file (whole-set and fit-half matrices): the tensors come back as stored, the other half is derived
    from the totals as before, and a conversion from it equals one from the same statistics held in memory."""
    x = activations[INPUTS[0]].float()
    n, d = x.shape
    nf = n // 2
    t = {"g.mean": x.mean(0), "g.gram": x.T @ x / n, "g.fit_mean": x[:nf].mean(0),
         "g.fit_gram": x[:nf].T @ x[:nf] / nf}
    meta = {"version": 2, "layers": {"encoder.layer.1.attention.self.query.weight": {"group": "g", "has_bias": True}},
            "groups": {"g": {"in_features": d, "count": n, "fit_count": nf, "eval_count": 0}}, "source": {}}
    path = str(tmp_path / "v2.safetensors")
    save_file(t, path, metadata={FORMAT_KEY: json.dumps(meta)})
    cs = load_calibration(path)
    cal = cs.get("encoder.layer.1.attention.self.query.weight")
    assert cs.version == 2 and not cal.sketched
    assert all(torch.equal(a, b) for a, b in ((cal.mean, t["g.mean"]), (cal.gram, t["g.gram"]),
                                              (cal.fit_mean, t["g.fit_mean"]), (cal.fit_gram, t["g.fit_gram"])))
    (_, fg), (rm, rg) = cal.halves()
    assert torch.equal(fg, t["g.fit_gram"].double())
    assert torch.equal(rg, (n * t["g.gram"].double() - nf * t["g.fit_gram"].double()) / (n - nf))
    mem = LayerCalibration(cal.weight_key, t["g.mean"], t["g.gram"], n, True, fit_mean=t["g.fit_mean"],
                           fit_gram=t["g.fit_gram"], fit_count=nf)
    from quant_core.rounding import round_to_fp16
    from safetensors.torch import load_file
    w = load_file(os.path.join(minilm_dir(), "model.safetensors"))[cal.weight_key].float()
    a = round_to_fp16(w, top_k=1, num_iter=256, calibration=cal)
    b = round_to_fp16(w, top_k=1, num_iter=256, calibration=mem)
    assert torch.equal(a.q.view(torch.int16), b.q.view(torch.int16)) and a.info == b.info


def test_unsupported_version_is_refused_in_one_line(activations, tmp_path):
    path = tmp_path / "c.safetensors"
    write_v4(path, activations[INPUTS[0]][:400].float(), rows=16)
    with safe_open(str(path), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        m = json.loads(f.metadata()[FORMAT_KEY])
    m["version"] = 5
    save_file(t, str(path), metadata={FORMAT_KEY: json.dumps(m)})
    with pytest.raises(CalibrationError) as e:
        load_calibration(str(path))
    assert "version 5 is not supported" in str(e.value) and "1, 2, 3, 4" in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_calibrated_conversion_from_a_sketched_file(tmp_path, one_thread):
    """MiniLM captured with 24 rows per layer (the rows/width FLUX-dev's widest input gets under the default budget
    is 0.015; 24/1536 = 0.016), converted end to end: the report states the calibrated figures on the held-out half
    and the converted model is better than RTN on other sentences of the same text."""
    mini = calib_shift.MiniLM(minilm_dir())
    calib, use = calib_shift.splits(0)["prose"]
    cal_path = str(tmp_path / "c.safetensors")
    src = capture_mod.capture(mini.dir, calib[:150], cal_path, max_length=128, batch_size=32, rows=24)
    assert src["rows"] == 24
    cs = load_calibration(cal_path)
    assert cs.version == 4 and cs.get("encoder.layer.0.output.dense.weight").sketched
    out = str(tmp_path / "out.safetensors")
    report = convert_file(mini.src, out, ConvertOptions(calibration=cal_path))
    learned = report["learned"]
    assert learned["output_error_on"] == "held-out half" and learned["calibrated_tensors"] >= 30, learned
    assert 0 < learned["output_error_ratio_mean"] < 1
    kept = [t for t in report["tensors"] if t.get("method") == "gptq"]
    assert all(t["output_error_ratio"] < 1 and t["held_out_tokens"] > 0 for t in kept)
    rtn = str(tmp_path / "rtn.safetensors")
    convert_file(mini.src, rtn, ConvertOptions(num_iter=0))
    assert mini.error(out, use) < 0.9 * mini.error(rtn, use)


def test_v3_files_are_read_as_before(activations, tmp_path):
    """A version 3 file (fit and rest each with a sketch of its own): each half is its own sketch's estimate, the
    whole set their count-weighted sum, diagonals raised to the exact ones."""
    x = activations[INPUTS[1]]
    n, d = x.shape
    nf = n // 2
    t, groups = {}, {"in_features": d, "count": n, "fit_count": nf, "rest_count": n - nf, "eval_count": 0,
                     "rows": {}, "exact": {"fit": False, "rest": False}, "error_bound": {"fit": 1.0, "rest": 1.0}}
    ests = {}
    for part, rows in (("fit", x[:nf]), ("rest", x[nf:])):
        sk = MomentSketch(d, 32)
        sk.add(rows)
        c = rows.shape[0]
        t[f"a.{part}_mean"], t[f"a.{part}_diag"] = (sk.sum / c).float(), (sk.sq / c).float()
        t[f"a.{part}_sketch"] = (sk.b.double() / c ** 0.5).to(torch.bfloat16)
        groups["rows"][part] = 32
        s = t[f"a.{part}_sketch"].double()
        est = s.T @ s
        est.diagonal().copy_(torch.maximum(est.diagonal(), t[f"a.{part}_diag"].double()))
        ests[part] = est
    meta = {"version": 3, "layers": {"l.weight": {"group": "a", "has_bias": False}}, "groups": {"a": groups},
            "source": {}}
    path = str(tmp_path / "v3.safetensors")
    save_file(t, path, metadata={FORMAT_KEY: json.dumps(meta)})
    cs = load_calibration(path)
    cal = cs.get("l.weight")
    assert cs.version == 3 and cal.sketched and cal.has_split
    (_, fg), (_, rg) = cal.halves()
    assert torch.allclose(fg.double(), ests["fit"], rtol=1e-4, atol=1e-6)
    assert torch.allclose(rg.double(), ests["rest"], rtol=1e-4, atol=1e-6)
    raw = {p: t[f"a.{p}_sketch"].double().T @ t[f"a.{p}_sketch"].double() for p in ("fit", "rest")}
    whole = (nf * raw["fit"] + (n - nf) * raw["rest"]) / n
    diag = (nf * t["a.fit_diag"].double() + (n - nf) * t["a.rest_diag"].double()) / n
    whole.diagonal().copy_(torch.maximum(whole.diagonal(), diag))
    assert torch.allclose(cal.gram.double(), whole, rtol=1e-4, atol=1e-6)


def test_caps_give_the_budget_to_the_inputs_that_can_use_it(activations, tmp_path):
    """A group the caller knows receives few rows (a modulation input: one row per model call) keeps at most that
    many, and the budget it no longer reserves goes to the other groups' rows; everything stays within the budget."""
    x = activations[INPUTS[1]].float()
    d = x.shape[1]
    widths = {"tok": d, "vec": d}
    plain = CalibrationWriter(rows=3072, budget_bytes=20_000_000).plan(widths)
    w = CalibrationWriter(rows=3072, budget_bytes=20_000_000)
    capped = w.plan(widths, caps={"vec": 12})
    assert plain < capped < d
    w.add("tok", x[:2000], fit=True)
    w.add("tok", x[2000:])
    w.add("vec", x[:6], fit=True)
    w.add("vec", x[6:12])
    assert w.bytes_held() <= 20_000_000
    assert w._sketches["vec", "cal"].rows == 12 and w._sketches["tok", "cal"].rows == capped
    w.save(str(tmp_path / "c.safetensors"))
    info = load_calibration(str(tmp_path / "c.safetensors")).groups
    assert info["vec"]["rows"]["fit"] == 12 and info["tok"]["rows"]["fit"] == capped


def test_recorder_caps_inputs_by_their_rows_per_call():
    """`_Recorder(calls=n)`: after the first forward each group's cap is its rows in that forward times n."""

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mod = torch.nn.Linear(32, 32)  # one row per call, like FLUX's modulation
            self.tok = torch.nn.Linear(32, 32)  # a row per token

        def forward(self, vec, tokens):
            return self.mod(vec), self.tok(tokens)

    toy = Toy()
    w = CalibrationWriter(rows=3072, budget_bytes=None)
    rec = capture_mod._Recorder(toy, w, calls=5)
    gen = torch.Generator().manual_seed(0)
    for i in range(3):
        rec.new_batch(None, i % 2 == 0)
        toy(torch.randn(1, 32, generator=gen), torch.randn(40, 32, generator=gen))
    rec.new_batch(None)
    assert w._caps == {"mod": 5, "tok": 200}
    assert w.counts() == {"mod": 3, "tok": 120}


def test_few_tokens_per_half_give_positive_definite_halves(tmp_path, one_thread):
    """Regression (benchmarks/calib_shift.py seed 2, everyday -> prose, 90 rows): ~950 tokens per half, a sketch of
    90 rows. A half's estimate is its projection onto the shared basis, which can exceed its exact diagonal; with the
    diagonal replaced by the exact one it went indefinite and the conversion stopped in a Cholesky factorisation.
    Every half's matrix is positive semi-definite now and the conversion runs, calibrated."""
    mini = calib_shift.MiniLM(minilm_dir())
    calib = calib_shift.splits(2)["everyday"][0]
    cal_path = str(tmp_path / "c.safetensors")
    capture_mod.capture(mini.dir, calib, cal_path, max_length=128, batch_size=32, rows=90)
    cs = load_calibration(cal_path)
    for key in ("encoder.layer.0.output.dense.weight", "encoder.layer.5.output.dense.weight",
                "encoder.layer.3.attention.self.query.weight"):
        cal = cs.get(key)
        assert cal.sketched and cal.has_split
        for _, g in cal.halves():
            g = g.double()
            assert float(torch.linalg.eigvalsh(g)[0]) >= -1e-6 * float(g.diagonal().max()), key
    report = convert_file(mini.src, str(tmp_path / "out.safetensors"), ConvertOptions(calibration=cal_path))
    assert report["learned"]["calibrated_tensors"] >= 30, report["learned"]
