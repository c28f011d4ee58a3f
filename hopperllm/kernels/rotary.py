"""Rotary position embedding (neox / HF-Llama style) fused with the paged KV-cache write.

cos_sin_cache: float32 [max_position, head_dim] = cat(cos, sin) over the head_dim / 2 frequencies.
For a head x = [x1, x2] (halves): out = [x1 * cos - x2 * sin, x2 * cos + x1 * sin], float32 math rounded
to the input dtype. KV cache per layer: [2, num_blocks, block_size, num_kv_heads, head_dim]; FP8 caches
store x * (1 / scale) saturated to +-448 (see kernels/fp8.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hopperllm.kernels.fp8 import FP8_DTYPE, fp8_inv_scale, quantize_fp8, ref_static_quant_fp8
from hopperllm.kernels.launch import next_power_of_2
from hopperllm.kernels.pdl import pdl_kwargs, pdl_prologue

# The cos/sin table is plain torch shared with the CPU path (which must not need triton): it lives with the
# rotary layer and is re-exported here for the kernel's callers and tests.
from hopperllm.layers.rotary import build_cos_sin_cache  # noqa: F401


def ref_apply_rotary(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] -> rotated copy (float32 math, rounded to x.dtype)."""
    half = x.shape[-1] // 2
    cos_sin = cos_sin_cache[positions].float()
    cos, sin = cos_sin[:, None, :half], cos_sin[:, None, half:]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def _to_cache(x: torch.Tensor, cache_dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    if cache_dtype == FP8_DTYPE:
        return ref_static_quant_fp8(x, torch.ones(1, device=x.device) if scale is None else scale)
    return x.to(cache_dtype)


def ref_rotary_kv_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Torch reference of rotary_kv_write: q rotated in place; rotated k and v stored into kv_cache."""
    q.copy_(ref_apply_rotary(q, positions, cos_sin_cache))
    k_rot = ref_apply_rotary(k, positions, cos_sin_cache)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    key_cache = kv_cache[0].view(-1, num_kv_heads, head_dim)
    value_cache = kv_cache[1].view(-1, num_kv_heads, head_dim)
    key_cache[slots] = _to_cache(k_rot[keep], kv_cache.dtype, k_scale)
    value_cache[slots] = _to_cache(v[keep], kv_cache.dtype, v_scale)


@triton.jit
def _rotate_half_pair(x_ptrs, mask, cos, sin, HALF: tl.constexpr):
    """Load both halves of a [heads, D] tile; return the rotated halves in float32 (not yet rounded)."""
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _rotary_kv_write_kernel(
    q_ptr, k_ptr, v_ptr, positions_ptr, cos_sin_ptr, kv_ptr, slot_ptr, k_scale_ptr, v_scale_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos_sin,
    stride_kv_kind, stride_kv_block, stride_kv_offset, stride_kv_head,
    num_q_heads, num_kv_heads, block_size,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    KV_FP8: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    # One program per token: rotate all its q heads in place, then rotate k and store k, v at the token's
    # cache slot. Floor: read q, k, v and write q, k, v once: (2 * Hq + 3 * Hkv) * D elements per token.
    # Before the PDL wait: the positions and slots (copied in before the step's first kernel), the cos /
    # sin rows and the KV scales (constants); q, k, v come from the previous kernel.
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + t)
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < HALF
    cos = tl.load(cos_sin_ptr + pos * stride_cos_sin + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cos_sin_ptr + pos * stride_cos_sin + HALF + d, mask=d_mask, other=0.0).to(tl.float32)[
        None, :
    ]
    slot = tl.load(slot_ptr + t)
    if KV_FP8:
        k_inv_scale = fp8_inv_scale(tl.load(k_scale_ptr))
        v_inv_scale = fp8_inv_scale(tl.load(v_scale_ptr))
    pdl_prologue(USE_PDL)

    hq = tl.arange(0, BLOCK_HQ)
    q_mask = (hq < num_q_heads)[:, None] & d_mask[None, :]
    q_ptrs = q_ptr + t * stride_qt + hq[:, None] * stride_qh + d[None, :]
    q1, q2 = _rotate_half_pair(q_ptrs, q_mask, cos, sin, HALF)
    tl.store(q_ptrs, q1.to(q_ptr.dtype.element_ty), mask=q_mask)
    tl.store(q_ptrs + HALF, q2.to(q_ptr.dtype.element_ty), mask=q_mask)

    if slot >= 0:  # slot -1: a padding token (CUDA-graph batch padding); nothing to store
        hk = tl.arange(0, BLOCK_HKV)
        kv_mask = (hk < num_kv_heads)[:, None] & d_mask[None, :]
        k_ptrs = k_ptr + t * stride_kt + hk[:, None] * stride_kh + d[None, :]
        v_ptrs = v_ptr + t * stride_vt + hk[:, None] * stride_vh + d[None, :]
        k1, k2 = _rotate_half_pair(k_ptrs, kv_mask, cos, sin, HALF)
        # Round to the model dtype first, so an FP8 cache holds what the unfused rotary -> quantize holds.
        k1 = k1.to(k_ptr.dtype.element_ty)
        k2 = k2.to(k_ptr.dtype.element_ty)
        v1 = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        v2 = tl.load(v_ptrs + HALF, mask=kv_mask, other=0.0)
        cache_offset = (slot // block_size) * stride_kv_block + (slot % block_size) * stride_kv_offset
        k_dst = kv_ptr + cache_offset + hk[:, None] * stride_kv_head + d[None, :]
        v_dst = k_dst + stride_kv_kind
        if KV_FP8:
            tl.store(k_dst, quantize_fp8(k1.to(tl.float32), k_inv_scale), mask=kv_mask)
            tl.store(k_dst + HALF, quantize_fp8(k2.to(tl.float32), k_inv_scale), mask=kv_mask)
            tl.store(v_dst, quantize_fp8(v1.to(tl.float32), v_inv_scale), mask=kv_mask)
            tl.store(v_dst + HALF, quantize_fp8(v2.to(tl.float32), v_inv_scale), mask=kv_mask)
        else:
            tl.store(k_dst, k1.to(kv_ptr.dtype.element_ty), mask=kv_mask)
            tl.store(k_dst + HALF, k2.to(kv_ptr.dtype.element_ty), mask=kv_mask)
            tl.store(v_dst, v1.to(kv_ptr.dtype.element_ty), mask=kv_mask)
            tl.store(v_dst + HALF, v2.to(kv_ptr.dtype.element_ty), mask=kv_mask)


def rotary_kv_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Rotate q [T, Hq, D] in place; rotate k [T, Hkv, D] and store it and v into kv_cache at slot_mapping.

    q, k, v may be strided views (e.g. slices of one fused QKV output); only their last dim must be
    contiguous. k itself is left unrotated. positions, slot_mapping: int64 [T]; slot < 0 skips the
    token. kv_cache: [2, num_blocks, block_size, Hkv, D] (any strides with a contiguous last dim);
    an FP8 cache needs k_scale and v_scale (float32 [1]; None means 1.0).
    """
    T, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if k.shape != (T, num_kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not agree")
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.shape[3:] != (num_kv_heads, head_dim):
        raise ValueError(
            f"kv_cache must be [2, num_blocks, block_size, {num_kv_heads}, {head_dim}], "
            f"got {tuple(kv_cache.shape)}"
        )
    if any(t.stride(-1) != 1 for t in (q, k, v, kv_cache, cos_sin_cache)):
        raise ValueError("q, k, v, kv_cache and cos_sin_cache need a contiguous last dimension")
    if head_dim % 2 or cos_sin_cache.shape[-1] != head_dim:
        raise ValueError(
            f"cos_sin_cache must be [max_position, {head_dim}], got {tuple(cos_sin_cache.shape)}"
        )
    kv_fp8 = kv_cache.dtype == FP8_DTYPE
    if kv_fp8:
        ones = None
        if k_scale is None or v_scale is None:
            ones = torch.ones(1, dtype=torch.float32, device=q.device)
        k_scale = ones if k_scale is None else k_scale.float()
        v_scale = ones if v_scale is None else v_scale.float()
    else:
        k_scale = v_scale = cos_sin_cache  # unused
    if T == 0:
        return
    half = head_dim // 2
    block_hq = next_power_of_2(num_q_heads)
    block_half = next_power_of_2(half)
    _rotary_kv_write_kernel[(T,)](
        q, k, v, positions, cos_sin_cache, kv_cache, slot_mapping, k_scale, v_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        num_q_heads, num_kv_heads, kv_cache.shape[2],
        HALF=half,
        BLOCK_HALF=block_half,
        BLOCK_HQ=block_hq,
        BLOCK_HKV=next_power_of_2(num_kv_heads),
        KV_FP8=kv_fp8,
        num_warps=min(max(block_hq * block_half // 256, 1), 8),
        **pdl_kwargs(q.device, T),
    )  # fmt: skip
