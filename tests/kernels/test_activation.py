"""silu_and_mul (and its FP8 output) vs ref_silu_and_mul, and the reference vs transformers' LlamaMLP math.

Without CUDA the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py
before triton is imported); with CUDA the same tests run compiled on the GPU.
"""

import pytest
import torch

from hopperllm.kernels import activation, fp8

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN-filled tensors, so an output element a kernel never wrote shows up."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)


def make_input(T, inter, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, 2 * inter, generator=g) * 4).to(dtype).to(DEVICE)


def assert_close_in_dtype(out, ref):
    """fp32: exp rounding only; bf16: at most one bf16 ulp apart."""
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("T", "inter"), [(1, 8), (3, 100), (2, 2500)])
def test_silu_and_mul_matches_ref(poisoned_empty, T, inter, dtype):
    x = make_input(T, inter, dtype, seed=inter)
    out = activation.silu_and_mul(x)
    assert out.shape == (T, inter) and out.dtype == dtype
    assert_close_in_dtype(out, activation.ref_silu_and_mul(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("T", "inter", "split_rows"),
    [(1, 8, 256), (3, 100, 256), (2, 17000, 256), (2, 17000, 0)],  # 17000: two launches / the two-pass loop
)
def test_silu_and_mul_fp8_equals_quantized_output(poisoned_empty, T, inter, split_rows, dtype, monkeypatch):
    monkeypatch.setattr(activation, "SPLIT_ROW_MAX_ROWS", split_rows)
    x = make_input(T, inter, dtype, seed=inter + 1)
    q, scale = activation.silu_and_mul(x, out_fp8=True)
    ref_q, ref_scale = fp8.ref_per_token_quant_fp8(activation.silu_and_mul(x))
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (T, 1)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))
    ref_q, ref_scale = activation.ref_silu_and_mul_fp8(x)
    torch.testing.assert_close(q.float() * scale, ref_q.float() * ref_scale, rtol=2**-3, atol=1e-6)


def test_silu_and_mul_leading_dims(poisoned_empty):
    x = make_input(6, 32, torch.float32, seed=0)
    out = activation.silu_and_mul(x.view(2, 3, 64))
    assert out.shape == (2, 3, 32)
    assert_close_in_dtype(out.view(6, 32), activation.ref_silu_and_mul(x))


def test_ref_matches_transformers_mlp_activation():
    from transformers.activations import ACT2FN

    x = make_input(4, 48, torch.bfloat16, seed=9)
    hf = ACT2FN["silu"](x[:, :48].float()) * x[:, 48:].float()
    torch.testing.assert_close(activation.ref_silu_and_mul(x).float(), hf, rtol=2**-7, atol=1e-6)
