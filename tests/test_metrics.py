"""The metrics of a conversion are what is stored, however they are computed.

BF16/FP16 sources on the CPU take a fast path (clamp trick, reused buffers, large chunks); the generic path measures
a given fp16 tensor element by element. Both must report the same figures on data with every hard case in it:
zeros, fp16 subnormals (exact and inexact), values that flush to zero, and power-of-two scales either way. The stored tensor must be torch's own round-to-nearest cast.
"""

import pytest
import torch

from quant_core.metrics import measure


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
    for k in ("flushed_to_zero", "subnormal", "numel"):
        assert getattr(fast, k) == getattr(generic, k), k
    assert fast.bit_exact_fraction == pytest.approx(generic.bit_exact_fraction, abs=0)
    assert fast.max_rel_error == pytest.approx(generic.max_rel_error, rel=1e-6)
    for k in ("rel_error", "err_sq", "w_sq"):
        assert getattr(fast, k) == pytest.approx(getattr(generic, k), rel=1e-4), k
    assert generic.changed_vs_rtn == 0.0 and generic.error_ratio == pytest.approx(1.0)
    if dtype == torch.bfloat16:  # the data has every case: make sure the test exercises them
        assert fast.flushed_to_zero > 0 and fast.subnormal > 0 and fast.bit_exact_fraction < 1


def test_counts_by_hand():
    lim = 2.0 ** -14
    w = torch.tensor([0.0, 1.0, -0.5, lim, lim / 4, 2.0 ** -26, -(2.0 ** -30), 3 * 2.0 ** -26],
                     dtype=torch.bfloat16)
    q, m = measure(w, 1.0)
    # lim/4 is an exact fp16 subnormal; 2^-26 and -2^-30 flush to zero; 3*2^-26 (0.75 of the smallest subnormal
    # step 2^-24) rounds up to 2^-24
    assert q.float().tolist() == [0.0, 1.0, -0.5, lim, lim / 4, 0.0, -0.0, 2.0 ** -24]
    assert m.flushed_to_zero == 2 and m.subnormal == 2
    assert m.bit_exact_fraction == pytest.approx(5 / 8)
    err = ((2.0 ** -26) ** 2 + (2.0 ** -30) ** 2 + (2.0 ** -24 - 3 * 2.0 ** -26) ** 2) ** 0.5
    assert m.rel_error == pytest.approx(err / float(w.float().norm()), rel=1e-6)
