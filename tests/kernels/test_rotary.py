"""Rotary cos/sin cache vs transformers, and rotary_kv_write vs ref_rotary_kv_write.

Without CUDA the kernel runs in the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py
before triton is imported); with CUDA the same tests run compiled on the GPU.
"""

import pytest
import torch

from hopperllm.kernels import rotary

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

FP8 = torch.float8_e4m3fn
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def hf_cos_sin(head_dim, max_position, rope_theta, rope_scaling):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(
        hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim, rope_theta=rope_theta,
        max_position_embeddings=max(max_position, 16384), rope_scaling=rope_scaling,
    )  # fmt: skip
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1), torch.arange(max_position)[None])
    return cos[0], sin[0]


@pytest.mark.parametrize(
    ("head_dim", "rope_theta", "rope_scaling"),
    [
        (64, 10000.0, None),
        (128, 500000.0, LLAMA3_SCALING),
        (128, 10000.0, {"rope_type": "linear", "factor": 4.0}),
        (128, 10000.0, {"type": "linear", "factor": 2.0}),  # the older key spelling
    ],
)
def test_cos_sin_cache_equals_transformers(head_dim, rope_theta, rope_scaling):
    max_position = 16384
    cache = rotary.build_cos_sin_cache(head_dim, max_position, rope_theta, rope_scaling)
    cos, sin = hf_cos_sin(head_dim, max_position, rope_theta, rope_scaling)
    half = head_dim // 2
    assert cache.dtype == torch.float32 and cache.shape == (max_position, head_dim)
    assert torch.equal(cache[:, :half], cos[:, :half]) and torch.equal(cache[:, :half], cos[:, half:])
    assert torch.equal(cache[:, half:], sin[:, :half])


def test_cos_sin_cache_rejects_unknown_scaling():
    with pytest.raises(ValueError, match="rope_scaling"):
        rotary.build_cos_sin_cache(64, 16, 10000.0, {"rope_type": "yarn", "factor": 4.0})


def test_ref_apply_rotary_matches_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    head_dim, T = 64, 7
    cache = rotary.build_cos_sin_cache(
        head_dim, 64, 10000.0, LLAMA3_SCALING | {"original_max_position_embeddings": 32}
    )
    positions = torch.tensor([0, 3, 9, 31, 32, 40, 63])
    q, k = torch.randn(T, 4, head_dim), torch.randn(T, 2, head_dim)
    cos = torch.cat([cache[positions, : head_dim // 2]] * 2, dim=-1)
    sin = torch.cat([cache[positions, head_dim // 2 :]] * 2, dim=-1)
    # HF layout [batch, heads, seq, dim]
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    torch.testing.assert_close(rotary.ref_apply_rotary(q, positions, cache), hf_q[0].transpose(0, 1))
    torch.testing.assert_close(rotary.ref_apply_rotary(k, positions, cache), hf_k[0].transpose(0, 1))


def make_case(T, num_q_heads, num_kv_heads, head_dim, dtype, cache_dtype, seed, num_blocks=4, block_size=4):
    """q/k/v as strided views of one fused QKV output; a NaN-poisoned cache; some slots -1."""
    g = torch.Generator().manual_seed(seed)
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    qkv = (torch.randn(T, width + 8, generator=g) * 4).to(dtype).to(DEVICE)[:, :width]  # padded row stride
    q_end, k_end = num_q_heads * head_dim, (num_q_heads + num_kv_heads) * head_dim
    q = qkv[:, :q_end].view(T, num_q_heads, head_dim)
    k = qkv[:, q_end:k_end].view(T, num_kv_heads, head_dim)
    v = qkv[:, k_end:].view(T, num_kv_heads, head_dim)
    positions = torch.randint(0, 200, (T,), generator=g).to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:T]
    slots[1::3] = -1
    kv_cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan")).to(cache_dtype)
    cos_sin = rotary.build_cos_sin_cache(head_dim, 256, 10000.0).to(DEVICE)
    return qkv, q, k, v, positions, cos_sin, kv_cache.to(DEVICE), slots.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("T", "num_q_heads", "num_kv_heads", "head_dim"), [(6, 4, 2, 16), (5, 3, 3, 12), (1, 8, 1, 64)]
)
def test_rotary_kv_write_matches_ref(T, num_q_heads, num_kv_heads, head_dim, dtype):
    qkv, q, k, v, positions, cos_sin, kv_cache, slots = make_case(
        T, num_q_heads, num_kv_heads, head_dim, dtype, dtype, seed=head_dim
    )
    ref_qkv, ref_cache = qkv.clone(), kv_cache.clone()
    ref_q = ref_qkv[:, : q.shape[1] * head_dim].view_as(q)
    k_before = k.clone()
    rotary.rotary_kv_write(q, k, v, positions, cos_sin, kv_cache, slots)
    rotary.ref_rotary_kv_write(ref_q, k, v, positions, cos_sin, ref_cache, slots)
    torch.testing.assert_close(qkv, ref_qkv, rtol=1e-6, atol=1e-6)  # q rotated in place; k, v untouched
    assert torch.equal(k, k_before)
    written = torch.zeros(kv_cache.shape[1] * kv_cache.shape[2], dtype=torch.bool)
    written[slots[slots >= 0].cpu()] = True
    flat = kv_cache.view(2, -1, num_kv_heads, head_dim)
    assert not flat[:, written.to(DEVICE)].isnan().any()
    assert flat[:, ~written.to(DEVICE)].isnan().all()  # slot -1 and unused slots untouched
    torch.testing.assert_close(kv_cache, ref_cache, rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scales", [(0.01, 0.02), None])
def test_rotary_kv_write_fp8_cache(dtype, scales):
    qkv, q, k, v, positions, cos_sin, kv_cache, slots = make_case(7, 4, 2, 32, dtype, FP8, seed=11)
    k_scale, v_scale = (None, None) if scales is None else (torch.tensor([s], device=DEVICE) for s in scales)
    ref_cache = kv_cache.clone()
    ref_q = q.clone()
    rotary.rotary_kv_write(q, k, v, positions, cos_sin, kv_cache, slots, k_scale, v_scale)
    rotary.ref_rotary_kv_write(ref_q, k, v, positions, cos_sin, ref_cache, slots, k_scale, v_scale)
    torch.testing.assert_close(q, ref_q, rtol=1e-6, atol=1e-6)
    assert torch.equal(kv_cache.view(torch.uint8), ref_cache.view(torch.uint8))  # NaN (0x7f) where skipped
    if scales is not None:
        assert kv_cache[0].float().abs().nan_to_num().max() == 448.0  # |k| / 0.01 saturates


def test_rotary_kv_write_rejects_mismatched_cache():
    _, q, k, v, positions, cos_sin, kv_cache, slots = make_case(
        3, 4, 2, 16, torch.float32, torch.float32, seed=0
    )
    with pytest.raises(ValueError, match="kv_cache"):
        rotary.rotary_kv_write(q, k, v, positions, cos_sin, kv_cache[:, :, :, :1], slots)
