"""Glue tests of the capture nodes over stand-in ComfyUI modules (tests/comfy_test_pack/stand_ins.py): real torch
modules with ComfyUI's shapes of a CLIP and a MODEL, real calibration files read back by the converter's reader.
The real servers are exercised by tests/e2e/test_capture.py."""

import json
import os
import sys

import pytest
import torch

from conftest import load_stand_ins
from quant_core.calibration import DEFAULT_BUDGET_BYTES, DEFAULT_ROWS, MIN_ROWS, CalibrationWriter, load_calibration
from quant_core.safetensors_io import read_header

stand_ins = load_stand_ins("fp16lr_stand_ins_capture")


@pytest.fixture
def comfy(tmp_path):
    pack, rec = stand_ins.install(str(tmp_path))
    pack.base = str(tmp_path)
    yield pack, rec
    stand_ins.uninstall()


def calib_dir(base):
    return os.path.join(base, "models", "scaled_fp16_calibration")


class Block(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q, self.k, self.o = torch.nn.Linear(d, d), torch.nn.Linear(d, d), torch.nn.Linear(d, d, bias=False)

    def forward(self, x):
        return x + self.o(torch.tanh(self.q(x) * self.k(x)))


class Transformer(torch.nn.Module):
    """Called as ComfyUI's SDClipModel calls its transformer: (None, attention mask or None, embeds=...)."""

    def __init__(self, d):
        super().__init__()
        self.encoder = torch.nn.Sequential(Block(d), Block(d))

    def forward(self, input_ids, attention_mask, embeds=None, **kwargs):
        return (self.encoder(embeds),)


class Encoder(torch.nn.Module):
    def __init__(self, d, masked):
        super().__init__()
        self.transformer = Transformer(d)
        self.enable_attention_masks = self.zero_out_masked = masked
        self.d = d

    def forward(self, tokens):
        ids = torch.tensor(tokens, dtype=torch.long)
        embeds = torch.sin(ids[..., None].float() * torch.arange(1, self.d + 1))
        mask = (ids != 0).long()
        return self.transformer(None, mask if self.enable_attention_masks else None, embeds=embeds)


class Patcher:
    def __init__(self, model, patches=None):
        self.model, self.patches = model, patches or {}

    def model_state_dict(self, prefix=None):
        return self.model.state_dict()


class FakeCLIP:
    """Two encoders like FLUX's clip_l + t5xxl; each word becomes a token id, padded with 0 to 8 tokens."""

    def __init__(self, masked=True):
        self.cond_stage_model = torch.nn.Module()
        self.cond_stage_model.clip_l = Encoder(8, masked=False)
        self.cond_stage_model.t5xxl = Encoder(12, masked=masked)
        self.patcher = Patcher(self.cond_stage_model)
        self.calls = 0

    def tokenize(self, text):
        ids = [sum(map(ord, w)) % 97 + 1 for w in text.split()][:8]
        return [ids + [0] * (8 - len(ids))]

    def encode_from_tokens(self, tokens, return_pooled=False):
        self.calls += 1
        return [m(tokens) for m in (self.cond_stage_model.clip_l, self.cond_stage_model.t5xxl)]


def capture_prompts(pack, clip, prompts, name="cal", held="", overwrite=True, rows=4096, **kw):
    node = pack.NODE_CLASS_MAPPINGS["ScaledFP16CapturePrompts"]()
    return node.capture(clip, prompts, rows, name, overwrite, held_out_prompts=held, unique_id="7", **kw)


def statistics_of(path):
    """The file's own record of its rows and budget (`statistics` in the calibration metadata)."""
    return json.loads(read_header(path).metadata["fp16lr_calibration"])["statistics"]


def check_summary(summary, path, name):
    """Every figure of a capture's panel summary against the file it describes."""
    cal = load_calibration(path)
    groups = cal.groups.values()
    stats = statistics_of(path)
    assert summary["kind"] == "capture" and summary["output_name"] == name
    assert summary["bytes"] == os.path.getsize(path)
    assert summary["layers"] == len(cal.layers) and summary["groups"] == len(cal.groups)
    assert summary["exact_groups"] == sum(all(g["exact"].values()) for g in groups)
    rows = [r for g in groups for r in g["rows"].values()]
    assert (summary["rows_kept_min"], summary["rows_kept_max"]) == (min(rows), max(rows))
    assert summary["tokens_fit"] == max(g["fit_count"] for g in groups)
    assert summary["tokens_check"] == max(g["count"] - g["fit_count"] for g in groups)
    assert summary["tokens_held_out"] == max(g["eval_count"] for g in groups)
    assert summary["notes"] == stats["notes"] and summary["budget_bytes"] == stats["budget_bytes"]
    assert summary["rows"] == stats["rows"] and summary["rows_requested"] == stats["rows_requested"]


PROMPTS = "\n".join(f"thing {i} in snow" for i in range(10))


def test_prompts_capture_writes_one_file_per_encoder_with_fit_and_held_out_halves(comfy):
    pack, rec = comfy
    clip = FakeCLIP()
    out = capture_prompts(pack, clip, PROMPTS + "\n\n", held="a cat on a mat\na dog in a fog")
    assert out["result"] == ("cal_clip_l.safetensors, cal_t5xxl.safetensors",)
    assert rec.progress[-1] == (12, 12, "7") and clip.calls == 12
    t5 = load_calibration(os.path.join(calib_dir(pack.base), "cal_t5xxl.safetensors"))
    # q and k read the same tensor: one group; o its own
    assert t5.layers["transformer.encoder.0.q.weight"]["group"] == t5.layers["transformer.encoder.0.k.weight"]["group"]
    assert t5.layers["transformer.encoder.0.o.weight"]["has_bias"] is False
    g = t5.groups[t5.layers["transformer.encoder.0.q.weight"]["group"]]
    # padding is masked and zeroed in this encoder: only the 4 real tokens of each prompt count
    assert g["count"] == 40 and g["fit_count"] == 20 and g["eval_count"] == 10
    clip_l = load_calibration(os.path.join(calib_dir(pack.base), "cal_clip_l.safetensors"))
    g = clip_l.groups[clip_l.layers["transformer.encoder.1.q.weight"]["group"]]
    assert g["count"] == 80  # no attention mask: every computed row, padding included
    # names resolve against checkpoint keys with or without the transformer prefix
    assert t5.resolve("encoder.1.o.weight") == "transformer.encoder.1.o.weight"
    assert t5.resolve("text_encoders.t5xxl.transformer.encoder.1.q.weight") == "transformer.encoder.1.q.weight"


def test_prompts_capture_means_match_the_inputs(comfy):
    pack, _ = comfy
    clip = FakeCLIP()
    capture_prompts(pack, clip, PROMPTS)
    rows = []
    enc = clip.cond_stage_model.t5xxl
    h = enc.transformer.encoder[0].q.register_forward_pre_hook(lambda m, a: rows.append(a[0][a[0].abs().sum(-1) > 0]))
    try:
        for line in PROMPTS.splitlines():
            enc(clip.tokenize(line))
    finally:
        h.remove()
    x = torch.cat([r.reshape(-1, 12) for r in rows]).double()
    cal = load_calibration(os.path.join(calib_dir(pack.base), "cal_t5xxl.safetensors")).get("encoder.0.q.weight")
    assert torch.allclose(cal.mean.double(), x.mean(0), atol=1e-5)
    assert torch.allclose(cal.gram.double(), x.T @ x / x.shape[0], atol=1e-5)


def test_rows_per_layer_are_capped_and_spread(comfy):
    """calib_samples is the number of rows the statistics keep per layer: below the input width (12 here) each part
    holds a sketch of at most that many rows, while every token of both halves is counted."""
    pack, _ = comfy
    capture_prompts(pack, FakeCLIP(), PROMPTS, rows=8)
    cal = load_calibration(os.path.join(calib_dir(pack.base), "cal_t5xxl.safetensors"))
    for g in cal.groups.values():
        assert g["fit_count"] > 0 and g["count"] - g["fit_count"] > 0
        assert all(0 < r <= 8 for r in g["rows"].values()), g
        assert not any(g["exact"].values()), g


def test_cancel_and_failure_leave_no_file(comfy):
    pack, rec = comfy
    rec.interrupt_after = 3
    with pytest.raises(Exception) as e:
        capture_prompts(pack, FakeCLIP(), PROMPTS)
    assert type(e.value).__name__ == "InterruptProcessingException"
    assert not os.listdir(calib_dir(pack.base))
    # the panel hears of it: cancelled after prompt 3 of 10, no report
    (err,) = rec.of("fp16lr.error")
    assert err["cancelled"] is True and (err["unit"], err["index"], err["total"]) == ("prompt", 3, 10), err
    assert len(rec.of("fp16lr.progress")) == 3 and not rec.of("fp16lr.report")
    rec.interrupt_after = None
    clip = FakeCLIP()
    clip.encode_from_tokens = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        capture_prompts(pack, clip, PROMPTS)
    assert not os.listdir(calib_dir(pack.base))
    # and the hooks are gone: a later forward records nothing
    assert not clip.cond_stage_model.t5xxl.transformer.encoder[0].q._forward_pre_hooks


def test_bad_inputs_are_one_line_user_errors(comfy):
    pack, _ = comfy
    with pytest.raises(Exception, match="no prompts"):
        capture_prompts(pack, FakeCLIP(), " \n\n")
    with pytest.raises(Exception, match="no CLIP"):
        capture_prompts(pack, None, PROMPTS)
    with pytest.raises(Exception, match="outside|'..'"):
        capture_prompts(pack, FakeCLIP(), PROMPTS, name="../x")
    capture_prompts(pack, FakeCLIP(), PROMPTS, name="same")
    with pytest.raises(Exception, match="already exists"):
        capture_prompts(pack, FakeCLIP(), PROMPTS, name="same", overwrite=False)


def test_prompts_capture_panel_gets_live_progress_and_a_summary_of_each_file(comfy):
    pack, rec = comfy
    out = capture_prompts(pack, FakeCLIP(), PROMPTS, held="a cat on a mat\na dog in a fog", rows=10)
    events = [e["event"] for e in rec.of("fp16lr.progress")]
    assert [e["index"] for e in events] == list(range(1, 13)) and {e["total"] for e in events} == {12}
    assert {e["type"] for e in events} == {"capture"} and {e["unit"] for e in events} == {"prompt"}
    assert [e["held_out"] for e in events] == [False] * 10 + [True] * 2
    assert events[0]["what"] == "clip_l, t5xxl" and events[0]["layers"] == 12  # 2 encoders x 2 blocks x q, k, o
    t5 = [next(p for p in e["tokens"] if p["name"] == "t5xxl") for e in events]
    # 4 real tokens a prompt (padding masked): calibration tokens grow, then the held-out ones
    assert [p["tokens"] for p in t5] == [4 * i for i in range(1, 11)] + [40, 40]
    assert [p["held_out"] for p in t5] == [0] * 10 + [5, 10]  # "a cat on a mat": 5 tokens
    reports = [e["report"] for e in rec.of("fp16lr.report")]
    assert [r["output_name"] for r in reports] == ["cal_clip_l.safetensors", "cal_t5xxl.safetensors"]
    for r in reports:
        check_summary(r, os.path.join(calib_dir(pack.base), r["output_name"]), r["output_name"])
        assert r["source"]["prompts"] == 10 and r["source"]["held_out_prompts"] == 2
    t5_report = reports[1]
    assert (t5_report["tokens_fit"], t5_report["tokens_check"], t5_report["tokens_held_out"]) == (20, 20, 10)
    # 10 rows asked: the 8-wide clip_l layers are exact, the 12-wide t5xxl ones sketched
    assert reports[0]["exact_groups"] == reports[0]["groups"] and t5_report["exact_groups"] == 0
    assert out["ui"]["fp16lr_report"] == reports and out["ui"]["text"] == [out["result"][0]]


def test_budget_widget_bounds_the_statistics_and_its_notes_reach_the_summary(comfy):
    pack, rec = comfy
    info = pack.NODE_CLASS_MAPPINGS["ScaledFP16CapturePrompts"].INPUT_TYPES()
    assert info["required"]["calib_samples"][1]["default"] == DEFAULT_ROWS
    budget = info["optional"]["budget_gb"][1]
    assert budget["default"] == DEFAULT_BUDGET_BYTES / 1e9 and budget["min"] == 0.05 and "file" in budget["tooltip"]
    sampling = pack.NODE_CLASS_MAPPINGS["ScaledFP16CaptureSampling"].INPUT_TYPES()
    assert sampling["optional"]["budget_gb"] == info["optional"]["budget_gb"]
    assert sampling["required"]["calib_samples"][1]["default"] == DEFAULT_ROWS
    # each encoder's statistics get the budget: one that holds t5xxl's 6 layer inputs (width 12; fit half and rest
    # sharing a basis) at 10 rows but not at 12, and clip_l's (width 8) exactly
    need = CalibrationWriter.bytes_needed
    gb = need([(12, 2)] * 6, 10) / 1e9
    assert need([(8, 2)] * 6, 8) <= gb * 1e9 < need([(12, 2)] * 6, 12)
    capture_prompts(pack, FakeCLIP(), PROMPTS, rows=12, budget_gb=gb)
    path = os.path.join(calib_dir(pack.base), "cal_t5xxl.safetensors")
    stats = statistics_of(path)
    assert stats["budget_bytes"] == round(gb * 1e9) and stats["rows_requested"] == 12
    assert MIN_ROWS <= stats["rows"] < 12 and stats["notes"], stats
    assert os.path.getsize(path) < gb * 1e9  # the file within the budget too
    (t5_report,) = [e["report"] for e in rec.of("fp16lr.report") if e["report"]["output_name"] == "cal_t5xxl.safetensors"]
    check_summary(t5_report, path, "cal_t5xxl.safetensors")
    assert t5_report["notes"] == stats["notes"] and "budget" in t5_report["notes"][0]


def test_a_budget_too_small_is_one_clean_line_and_no_file(comfy):
    pack, rec = comfy
    with pytest.raises(Exception) as e:
        capture_prompts(pack, FakeCLIP(), PROMPTS, budget_gb=1e-7)
    paths = sys.modules[pack.__name__ + ".nodes.paths"]
    assert isinstance(e.value, paths.UserError) and type(e.value).__name__ == "SettingError"
    message = str(e.value)
    assert "\n" not in message and "budget of 0.00 GB cannot hold" in message and "raise the budget" in message
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no chained traceback
    assert not os.listdir(calib_dir(pack.base)) and not rec.of("fp16lr.report")
    model = FakeModel()
    with pytest.raises(paths.SettingError, match="raise the budget"):
        capture_sampling(pack, model, budget_gb=1e-7)
    assert not os.listdir(calib_dir(pack.base))
    assert not model.model.diffusion_model._forward_pre_hooks  # nothing left hooked


# --- sampling --------------------------------------------------------------------------------------------------

class Diffusion(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.img_in = torch.nn.Linear(4, 6)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(6, 6), torch.nn.Linear(6, 6)])
        self.out = torch.nn.Linear(6, 4)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g).to(torch.bfloat16).float())
            self.blocks[1].weight.add_(1e-5)  # not exact in fp16

    def forward(self, x):
        h = self.img_in(x)
        for b in self.blocks:
            h = h + torch.tanh(b(h))
        return x - 0.1 * self.out(h)


class FakeModel:
    def __init__(self):
        self.model = torch.nn.Module()
        self.model.diffusion_model = Diffusion()
        self.patches = {"diffusion_model.out.weight": [(1.0, torch.zeros(4, 6))]}


def capture_sampling(pack, model, steps=4, name="samp", rows=4096, **kw):
    node = pack.NODE_CLASS_MAPPINGS["ScaledFP16CaptureSampling"]()
    latent = {"samples": torch.randn(1, 5, 4, generator=torch.Generator().manual_seed(1))}
    return node.capture(model, 0, steps, 1.0, "euler", "simple", "pos", "neg", latent, 1.0, rows, name, True,
                        unique_id="3", **kw)


def test_sampling_capture_records_layers_to_round_and_returns_the_latent(comfy):
    pack, _ = comfy
    model = FakeModel()
    out = capture_sampling(pack, model)
    name, latent = out["result"]
    assert name == "samp.safetensors" and latent["samples"].shape == (1, 5, 4)
    cal = load_calibration(os.path.join(calib_dir(pack.base), name))
    # blocks.1: not exact in fp16; out: patched (a LoRA); img_in and blocks.0 hold bf16 values: nothing to round
    assert sorted(cal.keys()) == ["blocks.1.weight", "out.weight"]
    assert cal.source["model_calls"] == 4 and cal.source["layers_recorded"] == 2
    assert cal.source["layers_total"] == 4
    g = cal.groups[cal.layers["out.weight"]["group"]]
    assert g["count"] == 20 and g["fit_count"] == 10
    assert cal.resolve("model.diffusion_model.blocks.1.weight") == "blocks.1.weight"
    assert not model.model.diffusion_model._forward_pre_hooks and not model.model.diffusion_model.out._forward_pre_hooks


def test_sampling_capture_panel_gets_each_step_and_the_summary(comfy):
    pack, rec = comfy
    utils = sys.modules["comfy.utils"]
    server_hook = utils.PROGRESS_BAR_HOOK
    out = capture_sampling(pack, FakeModel(), steps=4)
    assert utils.PROGRESS_BAR_HOOK is server_hook  # the server's own progress hook is back
    events = [e["event"] for e in rec.of("fp16lr.progress")]
    assert [(e["unit"], e["index"], e["total"]) for e in events] == [("step", i, 4) for i in range(1, 5)]
    assert [e["tokens"][0]["tokens"] for e in events] == [5, 10, 15, 20]  # 5 latent rows a model call
    assert {e["layers"] for e in events} == {2} and {e["node"] for e in rec.of("fp16lr.progress")} == {"3"}
    (report,) = [e["report"] for e in rec.of("fp16lr.report")]
    check_summary(report, os.path.join(calib_dir(pack.base), "samp.safetensors"), "samp.safetensors")
    assert report["source"] == {"steps": 4, "sampler": "euler", "scheduler": "simple", "model_calls": 4,
                                "layers_total": 4}
    assert (report["tokens_fit"], report["tokens_check"], report["layers"]) == (10, 10, 2)
    assert out["ui"]["fp16lr_report"] == [report]


def test_sampling_capture_cancel_leaves_no_file_and_tells_the_panel(comfy):
    pack, rec = comfy
    rec.interrupt_after = 2  # Cancel during step 3 (the stand-in sampler checks after each model call)
    mm = sys.modules["comfy.model_management"]
    with pytest.raises(mm.InterruptProcessingException):
        capture_sampling(pack, FakeModel(), steps=6)
    assert not os.listdir(calib_dir(pack.base))
    (err,) = rec.of("fp16lr.error")
    assert err["cancelled"] is True and (err["unit"], err["index"], err["total"]) == ("step", 2, 6)


def test_sampling_capture_with_nothing_to_round_writes_nothing(comfy):
    pack, _ = comfy
    model = FakeModel()
    model.patches = {}
    with torch.no_grad():
        model.model.diffusion_model.blocks[1].weight.sub_(1e-5).copy_(
            model.model.diffusion_model.blocks[1].weight.to(torch.bfloat16).float())
    with pytest.raises(Exception, match="nothing to round|anything to round"):
        capture_sampling(pack, model)
    assert not os.listdir(calib_dir(pack.base))


# --- linking into the converting nodes -------------------------------------------------------------------------

def test_linked_calibration_wins_and_each_encoder_takes_its_own(comfy):
    pack, _ = comfy
    paths = pack.nodes.paths if hasattr(pack, "nodes") else __import__(pack.__name__ + ".nodes.paths",
                                                                          fromlist=["x"])
    assert paths.linked_calibration("drop.safetensors", None) == "drop.safetensors"
    assert paths.linked_calibration("drop.safetensors", " a.safetensors ") == "a.safetensors"
    both = "c_clip_l.safetensors, c_t5xxl.safetensors"
    assert paths.linked_calibration("none", both, "t5xxl") == "c_t5xxl.safetensors"
    assert paths.linked_calibration("none", both, "clip_l") == "c_clip_l.safetensors"
    with pytest.raises(Exception, match="names 2 files"):
        paths.linked_calibration("none", both)
