"""rms_norm (with residual add and FP8 output) vs ref_rms_norm, and ref_rms_norm vs transformers.

Without CUDA the kernel runs in the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py
before triton is imported); with CUDA the same tests run compiled on the GPU.
"""

import pytest
import torch

from hopperllm.kernels import fp8, norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

EPS = 1e-5


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN-filled tensors, so an output element a kernel never wrote shows up."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)


def make_inputs(T, H, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g) * torch.rand(T, 1, generator=g).mul(10).add(0.1)
    residual = torch.randn(T, H, generator=g) * 3
    weight = torch.rand(H, generator=g) + 0.5
    return (t.to(dtype).to(DEVICE) for t in (x, residual, weight))


def assert_close_in_dtype(out, ref):
    """fp32: rounding of the sum only; bf16: at most one bf16 ulp apart (rsqrt and sum order)."""
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("T", "H"), [(1, 64), (3, 100), (4, 1000)])
def test_rms_norm_matches_ref(poisoned_empty, T, H, dtype):
    x, _, weight = make_inputs(T, H, dtype, seed=H)
    out = norm.rms_norm(x, weight, EPS)
    assert out.dtype == dtype and out.shape == (T, H)
    assert_close_in_dtype(out, norm.ref_rms_norm(x, weight, EPS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add_rms_norm_updates_residual(poisoned_empty, dtype):
    x, residual, weight = make_inputs(5, 192, dtype, seed=1)
    expected_residual = x + residual  # rounded to dtype
    ref_residual = residual.clone()
    out = norm.rms_norm(x, weight, EPS, residual=residual)
    ref = norm.ref_rms_norm(x, weight, EPS, residual=ref_residual)
    assert torch.equal(residual, expected_residual) and torch.equal(ref_residual, expected_residual)
    assert_close_in_dtype(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_fp8_dynamic_equals_quantized_output(poisoned_empty, dtype, with_residual):
    """The fused FP8 output is exactly per-token quantization of the kernel's own dtype output."""
    x, residual, weight = make_inputs(3, 300, dtype, seed=2)
    res_a, res_b = residual.clone(), residual.clone()
    out = norm.rms_norm(x, weight, EPS, residual=res_a if with_residual else None)
    q, scale = norm.rms_norm(x, weight, EPS, residual=res_b if with_residual else None, out_fp8=True)
    ref_q, ref_scale = fp8.ref_per_token_quant_fp8(out)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (3, 1)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))
    assert torch.equal(res_a, res_b)
    # and against the all-torch reference, within one e4m3 step
    ref_q, ref_scale = norm.ref_rms_norm_fp8(x, weight, EPS, residual.clone() if with_residual else None)
    torch.testing.assert_close(q.float() * scale, ref_q.float() * ref_scale, rtol=2**-3, atol=1e-6)


def test_rms_norm_fp8_static_scale(poisoned_empty):
    x, _, weight = make_inputs(4, 256, torch.bfloat16, seed=3)
    static_scale = torch.tensor([0.004], device=DEVICE)
    out = norm.rms_norm(x, weight, EPS)
    q, scale = norm.rms_norm(x, weight, EPS, out_fp8=True, static_scale=static_scale)
    assert scale is static_scale
    expected = (out.float() / static_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(q.view(torch.uint8), expected.view(torch.uint8))


def test_rms_norm_leading_dims_and_strided_rows(poisoned_empty):
    x, _, weight = make_inputs(6, 128, torch.float32, seed=4)
    wide = torch.cat([x, x], dim=1)[:, :128]  # rows with stride 256
    out = norm.rms_norm(wide.view(2, 3, 128), weight, EPS)
    assert out.shape == (2, 3, 128)
    assert_close_in_dtype(out.view(6, 128), norm.ref_rms_norm(x, weight, EPS))


def test_ref_rms_norm_matches_transformers():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, _, weight = make_inputs(3, 64, torch.bfloat16, seed=5)
    hf = LlamaRMSNorm(64, eps=EPS).to(torch.bfloat16).to(DEVICE)
    with torch.no_grad():
        hf.weight.copy_(weight)
        assert torch.equal(norm.ref_rms_norm(x, weight, EPS), hf(x))
