"""What becomes of each input tensor (`format.classify`, `format.plan`), what is written for it
(`output_entries`, `markers`), and the default output name; checked against the rules and against the files a real
conversion writes."""

import os

import pytest
import torch
from safetensors.torch import save_file

from conftest import small_flux_specs, small_t5_specs
from quant_core import ConversionError, ConvertOptions, convert_file
from quant_core import format as fmt
from quant_core.demo import write_model
from quant_core.safetensors_io import read_header

Q, K, R, U = fmt.QUANTIZE, fmt.KEEP, fmt.REMOVE, fmt.KEEP_UNSCALED
PLAIN, T5, DISTILL = fmt.Rules(), fmt.Rules(t5xxl=True), fmt.Rules(keep_distillation=True)

CASES = [
    # key, dtype, shape, plain, t5xxl, keep_distillation
    ("double_blocks.0.img_attn.qkv.weight", "BF16", (384, 128), Q, Q, Q),
    ("double_blocks.0.img_attn.qkv.bias", "BF16", (384,), K, K, K),
    ("double_blocks.0.img_attn.norm.query_norm.scale", "BF16", (32,), K, K, K),
    ("conv.weight", "F32", (8, 4, 3, 3), Q, Q, Q),                   # kernels: 2+ dims are weights
    ("vec.weight", "F32", (16,), K, K, K),                            # 1-D: a norm's weight
    ("idx.weight", "I64", (4, 4), K, K, K),                           # not floating
    ("f64.weight", "F64", (4, 4), Q, Q, Q),
    ("f16.weight", "F16", (4, 4), Q, Q, Q),
    ("fp8.weight", "F8_E4M3", (4, 4), K, K, K),
    ("weight_only", "F32", (4, 4), K, K, K),                          # not a ".weight" key
    # T5: decoder and lm_head dropped; norms, biases and embeddings kept; other weights quantized
    ("decoder.block.0.layer.0.SelfAttention.q.weight", "F32", (64, 64), Q, R, Q),
    ("decoder.final_layer_norm.weight", "F32", (64,), K, R, K),
    ("lm_head.weight", "F32", (100, 64), Q, R, Q),
    ("shared.weight", "F32", (100, 64), Q, K, Q),
    ("encoder.embed_tokens.weight", "F32", (100, 64), Q, K, Q),
    ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "F32", (32, 4), Q, K, Q),
    ("encoder.block.0.layer.0.layer_norm.weight", "F32", (64,), K, K, K),
    ("encoder.block.0.layer.1.DenseReluDense.wi_0.weight", "F32", (128, 64), Q, Q, Q),
    # FLUX distillation/in/out layers: kept in their dtype with keep_distillation, their biases kept either way
    ("img_in.weight", "BF16", (128, 64), Q, Q, U),
    ("img_in.bias", "BF16", (128,), K, K, K),
    ("txt_in.weight", "BF16", (128, 256), Q, Q, U),
    ("final_layer.linear.weight", "BF16", (64, 128), Q, Q, U),
    ("final_layer.adaLN_modulation.1.weight", "BF16", (256, 128), Q, Q, U),
    ("distilled_guidance_layer.in_proj.weight", "BF16", (64, 32), Q, Q, U),
    ("distilled_guidance_layer.norms.0.scale", "BF16", (64,), K, K, K),
]


@pytest.mark.parametrize("key,dtype,shape,plain,t5,distill", CASES, ids=[c[0] for c in CASES])
def test_classify(key, dtype, shape, plain, t5, distill):
    assert fmt.classify(key, dtype, shape, PLAIN) == plain
    assert fmt.classify(key, dtype, shape, T5) == t5
    assert fmt.classify(key, dtype, shape, DISTILL) == distill


def _header(tmp_path, tensors, name="m.safetensors"):
    path = str(tmp_path / name)
    save_file(tensors, path)
    return read_header(path)


def test_plan_entries_and_order(tmp_path):
    z = torch.zeros
    header = _header(tmp_path, {
        "a.bias": z(4), "a.weight": z(4, 3), "b.weight": z(2, 2, dtype=torch.bfloat16), "b.norm": z(2),
        "img_in.weight": z(4, 2, dtype=torch.bfloat16), "img_in.bias": z(4, dtype=torch.bfloat16),
        "decoder.x.weight": z(3, 3)})
    for rules in (PLAIN, T5, DISTILL):
        items = fmt.plan(header, rules)
        by_key = {i.key: i for i in items}
        assert set(by_key) == set(header.tensors)  # every input tensor is planned once (removed ones too)
        for item in items:
            info = header.tensors[item.key]
            assert item.action == fmt.classify(item.key, info.dtype, info.shape, rules)
            assert (item.dtype, item.shape, item.nbytes) == (info.dtype, info.shape, info.nbytes)
            layer = item.key[: -len(".weight")]
            expected = {
                Q: [(item.key, "F16", info.shape), (layer + ".scale_weight", "F32", (1,))]
                + ([(layer + ".scale_input", "F32", (1,))] if rules.t5xxl else []),
                U: [(item.key, info.dtype, info.shape), (layer + ".scale_weight", "F32", (1,))],
                K: [(item.key, info.dtype, info.shape)],
                R: [],
            }[item.action]
            assert item.outputs == expected, (rules, item)
        keys = [i.key for i in items]
        # a quantized layer's bias comes right after its weight (bias correction streams); others keep file order
        if by_key["a.weight"].action == Q:
            assert keys.index("a.bias") == keys.index("a.weight") + 1
        if by_key["img_in.weight"].action == Q:
            assert keys.index("img_in.bias") == keys.index("img_in.weight") + 1
        others = [k for k in keys if k not in ("a.bias", "img_in.bias")]
        assert others == [k for k in header.tensors if k in others]
    assert by_key["img_in.weight"].action == U  # DISTILL was the last one planned
    assert [i.action for i in fmt.plan(header, T5) if i.key == "decoder.x.weight"] == [R]


def test_markers_and_output_entries():
    for rules, shape in ((PLAIN, (2,)), (DISTILL, (2,)), (T5, (0,))):
        m = fmt.markers(rules)
        assert list(m) == ["scaled_fp16"] and m["scaled_fp16"].dtype == torch.float16
        assert tuple(m["scaled_fp16"].shape) == shape
        items = [fmt.PlanItem("l.weight", "F32", (3, 2), Q, 24, [("l.weight", "F16", (3, 2)),
                                                                  ("l.scale_weight", "F32", (1,))]),
                 fmt.PlanItem("gone", "F32", (1,), R, 4, [])]
        assert fmt.output_entries(items, rules) == [("l.weight", "F16", (3, 2)), ("l.scale_weight", "F32", (1,)),
                                                    ("scaled_fp16", "F16", shape)]


@pytest.mark.parametrize("mode", ["flux", "flux-keep-distillation", "t5xxl"])
def test_written_file_is_the_planned_one(tmp_path, mode):
    """The output file holds exactly `output_entries(plan(...))`: same keys, dtypes and shapes, in that order."""
    if mode == "t5xxl":
        src = write_model(str(tmp_path / "t5.safetensors"), small_t5_specs(), torch.float32, seed=2)
        options, rules = ConvertOptions(t5xxl=True, num_iter=0), T5
    else:
        src = write_model(str(tmp_path / "flux.safetensors"), small_flux_specs(), torch.bfloat16, seed=1)
        keep = mode == "flux-keep-distillation"
        options, rules = ConvertOptions(keep_distillation=keep, num_iter=0), fmt.Rules(keep_distillation=keep)
    out = str(tmp_path / "out.safetensors")
    report = convert_file(src, out, options)
    planned = fmt.output_entries(fmt.plan(read_header(src), rules), rules)
    written = read_header(out).tensors.values()  # in data order
    assert [(t.key, t.dtype, t.shape) for t in written] == planned
    actions = [i.action for i in fmt.plan(read_header(src), rules)]
    assert report["counts"] == {"quantized": actions.count(Q), "kept": actions.count(K) + actions.count(U),
                                "removed": actions.count(R)}
    assert (mode == "t5xxl") == (actions.count(R) > 0) and (mode == "flux-keep-distillation") == (U in actions)


@pytest.mark.parametrize("key", ["scaled_fp16", "scaled_fp8", "blk.scale_weight", "blk.scale_input"])
def test_plan_refuses_scaled_files_naming_file_and_tensor(tmp_path, key):
    header = _header(tmp_path, {"blk.weight": torch.zeros(2, 2), key: torch.zeros(1)}, name="already.safetensors")
    with pytest.raises(ConversionError) as exc:
        fmt.plan(header, PLAIN)
    assert "already.safetensors" in str(exc.value) and f"'{key}'" in str(exc.value)


@pytest.mark.parametrize("path,keep,expected", [
    ("/m/flux1-dev.safetensors", False, "/m/flux1-dev_float16_scaled_learned_svd.safetensors"),
    ("/m/flux1-dev.safetensors", True, "/m/flux1-dev_float16_scaled_learned_nodistill_svd.safetensors"),
    ("rel/t5.v1.1.safetensors", False, "rel/t5.v1.1_float16_scaled_learned_svd.safetensors"),
    ("noext", False, "noext_float16_scaled_learned_svd.safetensors"),
])
def test_default_output_path(path, keep, expected):
    assert fmt.default_output_path(path, keep) == expected
    assert os.path.dirname(fmt.default_output_path(path, keep)) == os.path.dirname(path)
