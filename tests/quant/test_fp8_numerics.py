"""FP8 numerics (hopperllm.quant.fp8): round-trip bounds, per-channel vs per-tensor, activation scales."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hopperllm.kernels.fp8 import ref_per_token_quant_fp8
from hopperllm.quant.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    dequantize,
    fake_quantize_weights_,
    fp8_linear_emulated,
    quantize_per_token,
    quantize_static,
    quantize_weight,
    roundtrip_bound,
    scale_from_amax,
)


def _weights(seed: int, n: int = 64, k: int = 96, log_range: float = 6.0) -> torch.Tensor:
    """Rows of very different magnitudes (10^-3 .. 10^3), so subnormals and the normal range both occur."""
    g = torch.Generator().manual_seed(seed)
    row_mag = 10 ** (torch.rand(n, 1, generator=g) * log_range - log_range / 2)
    return torch.randn(n, k, generator=g) * row_mag


@pytest.mark.parametrize("per_channel", [True, False])
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_weight_roundtrip_within_bound(per_channel, seed):
    w = _weights(seed)
    q, s = quantize_weight(w, per_channel=per_channel)
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32
    assert s.shape == ((w.shape[0],) if per_channel else (1,))
    err = (dequantize(q, s) - w).abs()
    assert bool((err <= roundtrip_bound(w, s)).all())
    # the amax of each scaled group lands on the largest e4m3 value
    amax_codes = q.float().abs().amax(dim=1) if per_channel else q.float().abs().amax().reshape(1)
    assert torch.equal(amax_codes, torch.full_like(amax_codes, FP8_MAX))


def test_relative_error_in_normal_range_is_at_most_one_sixteenth():
    x = torch.linspace(-448.0, 448.0, 100_001)
    x = x[x.abs() >= 2**-6]
    err = (quantize_static(x, 1.0).float() - x).abs()
    assert float((err / x.abs()).max()) <= 2**-4 + 1e-7


def test_per_channel_beats_per_tensor_with_outlier_rows():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=g) * 0.02
    # A few outlier rows. e4m3 is a float format, so a shared scale only costs precision once it pushes the
    # other rows below its normal range (2^-6 of the scale): outlier rows ~3e4 x larger than the rest.
    w[::32] *= 3e4
    normal = torch.ones(256, dtype=torch.bool)
    normal[::32] = False

    def rel_err(per_channel: bool) -> float:
        q, s = quantize_weight(w, per_channel=per_channel)
        wd = dequantize(q, s)
        return float((wd[normal] - w[normal]).norm() / w[normal].norm())

    per_channel, per_tensor = rel_err(True), rel_err(False)
    assert per_channel < 0.03  # ~3 mantissa bits
    assert per_tensor > 3 * per_channel, (per_channel, per_tensor)


def test_per_token_activation_quantization_matches_the_kernels_reference():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 48, generator=g) * torch.logspace(-2, 2, 7)[:, None]
    x[3] = 0.0  # an all-zero token keeps a finite scale
    q, s = quantize_per_token(x)
    q_ref, s_ref = ref_per_token_quant_fp8(x)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
    assert s.shape == (7, 1) and bool(torch.isfinite(s).all())
    assert torch.equal(s[:, 0], scale_from_amax(x.abs().amax(dim=1)))
    assert bool(((dequantize(q, s) - x).abs() <= roundtrip_bound(x, s)).all())


def test_static_activation_scale_saturates_outside_its_range():
    scale = scale_from_amax(4.0)
    x = torch.tensor([-100.0, -4.0, 0.0, 1.0, 4.0, 100.0])
    xd = dequantize(quantize_static(x, scale), scale)
    assert torch.allclose(xd, torch.tensor([-4.0, -4.0, 0.0, 1.0, 4.0, 4.0]), rtol=1e-6)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("per_channel", [True, False])
def test_emulated_linear_is_dequantize_then_matmul(static, per_channel):
    """The CPU emulation equals the explicit formula (what torch._scaled_mm computes, up to summation order)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 64, generator=g)
    w = torch.randn(32, 64, generator=g) * 0.1
    bias = torch.randn(32, generator=g)
    w_q, w_s = quantize_weight(w, per_channel)
    in_scale = scale_from_amax(x.abs().amax()).reshape(1) if static else None
    y = fp8_linear_emulated(x, w_q, w_s, in_scale, bias)
    if static:
        xd = dequantize(quantize_static(x, in_scale), in_scale)
    else:
        xd = dequantize(*quantize_per_token(x))
    wd = dequantize(w_q, w_s)
    expect = xd.double() @ wd.double().T + bias.double()
    assert torch.allclose(y.double(), expect, rtol=1e-5, atol=1e-5)
    # and it is what the engine's FP8 linear layer computes on the CPU
    from hopperllm.kernels.fp8 import fp8_linear

    s_rows = w_s.expand(32) if w_s.numel() == 1 else w_s
    assert torch.allclose(fp8_linear(x, w_q, s_rows, in_scale, bias), y, rtol=1e-5, atol=1e-5)


def test_fake_quantize_weights_scales_each_merged_matrix_on_its_own():
    from hopperllm.layers.linear import ColumnParallelLinear

    layer = ColumnParallelLinear(16, [8, 8])
    w = torch.randn(16, 16)
    w[8:] *= 1000.0  # the second matrix is much larger than the first
    layer.weight.data.copy_(w)
    assert fake_quantize_weights_(layer) == 1
    for rows in (slice(0, 8), slice(8, 16)):
        q, s = quantize_weight(w[rows])
        assert torch.equal(layer.weight.data[rows], dequantize(q, s))
