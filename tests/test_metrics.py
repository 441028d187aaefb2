"""The metrics of a conversion are what is stored, however they are computed.

BF16/FP16 sources on the CPU take a fast path (clamp trick, reused buffers, large chunks); the generic path measures
a given fp16 tensor element by element. Both must report the same figures on data with every hard case in it:
zeros, fp16 subnormals (exact and inexact), values that flush to zero, and power-of-two scales either way; and
the figures must equal this file's own elementwise computation. The stored tensor must be torch's own
round-to-nearest cast.
"""

import pytest
import torch

from quant_core.metrics import measure


def _get(m, name):
    """A figure of measure()'s result, whether it is a mapping or an object with attributes."""
    return m[name] if isinstance(m, dict) else getattr(m, name)


def _reference(w: torch.Tensor, q: torch.Tensor, scale: float) -> dict:
    """The figures computed here, elementwise in float64, from the weight and the stored fp16 values."""
    w64, back = w.double().reshape(-1), (q.float() * scale).double().reshape(-1)
    d = back - w64
    lim = scale * 2.0 ** -14
    return {
        "flushed_to_zero": int(((w64 != 0) & (back == 0)).sum()),
        "subnormal": int(((back != 0) & (back.abs() < lim)).sum()),
        "bit_exact_fraction": float((d == 0).double().mean()),
        "rel_error": float(d.norm() / w64.norm()),
        "max_rel_error": float((d.abs() / w64.abs().clamp(min=lim)).max()),
        "numel": w64.numel(),
    }


def _hard_weights(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3_000_017, generator=g) * 0.02  # several chunks of the fast path, plus a ragged tail
    w[::7] = 0.0
    w[5::11] *= 1e-4   # around fp16's smallest normal (6.1e-5): subnormals and round-ups
    w[3::13] *= 1e-6   # far below: flushed to zero
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 2.0 ** -4, 2.0 ** 3])
def test_fast_path_equals_generic_measurement(dtype, scale):
    w = _hard_weights(dtype)
    expected_q = (w.float() / scale).half()
    out = torch.empty(2 * w.numel() + 64, dtype=torch.uint8)  # a pooled buffer larger than needed
    q, fast = measure(w, scale, out=out)
    assert q.dtype == torch.float16 and q.shape == w.shape
    assert torch.equal(q.view(torch.int16), expected_q.view(torch.int16))
    assert q.untyped_storage().data_ptr() == out.data_ptr()  # written into the buffer, not fresh memory
    _, generic = measure(w, scale, expected_q.clone())  # generic path: measures a given q
    ref = _reference(w, expected_q, scale)
    for m in (fast, generic):
        for k in ("flushed_to_zero", "subnormal", "numel"):
            assert _get(m, k) == ref[k], k
        assert _get(m, "bit_exact_fraction") == pytest.approx(ref["bit_exact_fraction"], abs=1e-12)
        assert _get(m, "max_rel_error") == pytest.approx(ref["max_rel_error"], rel=1e-6)
        assert _get(m, "rel_error") == pytest.approx(ref["rel_error"], rel=1e-4)
        assert _get(m, "rtn_rel_error") == pytest.approx(ref["rel_error"], rel=1e-4)  # q is RTN here
    assert _get(generic, "changed_vs_rtn") == 0.0 and _get(generic, "error_ratio") == pytest.approx(1.0)
    if dtype == torch.bfloat16:  # the data has every case: make sure the test exercises them
        assert ref["flushed_to_zero"] > 0 and ref["subnormal"] > 0 and ref["bit_exact_fraction"] < 1


def test_a_given_q_is_measured_against_rtn():
    """The generic path measures any given fp16 tensor (e.g. the learned rounding's) beside round-to-nearest."""
    w = _hard_weights(torch.float32)[:200_003]
    rtn = w.half()
    bits = rtn.view(torch.int16).clone()
    bits[::10] += 1  # one fp16 step up in magnitude (sign-magnitude bits): every tenth element moves
    q = bits.view(torch.float16)
    _, m = measure(w, 1.0, q)
    ref, ref_rtn = _reference(w, q, 1.0), _reference(w, rtn, 1.0)
    moved = float((q != rtn).double().mean())
    assert moved > 0.09
    assert _get(m, "changed_vs_rtn") == pytest.approx(moved, abs=1e-12)
    assert _get(m, "rel_error") == pytest.approx(ref["rel_error"], rel=1e-4)
    assert _get(m, "rtn_rel_error") == pytest.approx(ref_rtn["rel_error"], rel=1e-4)
    assert _get(m, "error_ratio") == pytest.approx(ref["rel_error"] / ref_rtn["rel_error"], rel=1e-4)
    assert _get(m, "error_ratio") > 1.0  # moving off the nearest value costs Frobenius error


def test_counts_by_hand():
    lim = 2.0 ** -14
    w = torch.tensor([0.0, 1.0, -0.5, lim, lim / 4, 2.0 ** -26, -(2.0 ** -30), 3 * 2.0 ** -26],
                     dtype=torch.bfloat16)
    q, m = measure(w, 1.0)
    # lim/4 is an exact fp16 subnormal; 2^-26 and -2^-30 flush to zero; 3*2^-26 (0.75 of the smallest subnormal
    # step 2^-24) rounds up to 2^-24
    assert q.float().tolist() == [0.0, 1.0, -0.5, lim, lim / 4, 0.0, -0.0, 2.0 ** -24]
    assert _get(m, "flushed_to_zero") == 2 and _get(m, "subnormal") == 2
    assert _get(m, "bit_exact_fraction") == pytest.approx(5 / 8)
    err = ((2.0 ** -26) ** 2 + (2.0 ** -30) ** 2 + (2.0 ** -24 - 3 * 2.0 ** -26) ** 2) ** 0.5
    assert _get(m, "rel_error") == pytest.approx(err / float(w.float().norm()), rel=1e-6)
