"""Causal attention over the paged KV cache.

Layout (docs/interfaces.md): per layer `kv_cache` [2, num_blocks, block_size, num_kv_heads, head_dim],
`k_cache = kv_cache[0]`, `v_cache = kv_cache[1]`; dtype = the model dtype, or float8_e4m3fn with float32
per-layer `k_scale` / `v_scale` tensors of shape [1] (dequantized = stored.float() * scale).

For sequence b, `q_len = cu_seqlens_q[b+1] - cu_seqlens_q[b]` new queries sit at absolute positions
`seq_lens[b] - q_len ... seq_lens[b] - 1`, and query i sees keys `0 .. seq_lens[b] - q_len + i`. The new
tokens' K/V are already in the cache, so every key is read through `block_tables`. One shape of call covers
prefill, chunked prefill, prefix-cache hits and decode.

- `ref_paged_attention`: plain torch, float32 math; the reference for everything below.
- `paged_decode_attention`: q_len == 1 for every sequence. Flash-decoding: stage 1 splits each context
  into `num_splits` slices, one program per (sequence, kv head, slice) computing all query heads of the
  kv-head group at once; the last slice of each (sequence, kv head) to finish merges the slices by their
  log-sum-exp in the same launch, and can quantize the output row to FP8 per token (the o_proj input);
  given the step's k and v (`NewTokenKV`) it also does the rotary embedding and the cache write first.
- `paged_prefill_attention`: ragged batch of query tiles, each program one tile of one sequence and one
  kv-head group (the group's query heads are folded into the tile's rows), online softmax in float32.
- `paged_attention`: the one entry point the attention layer calls.

FP8 caches: K/V are converted to q's dtype (exact for e4m3 into fp16/bf16) for tl.dot, and the scales are
folded into the score scale (k_scale) and the output (v_scale), so the inner loop does no extra multiply.
Scales are read on the device: no host sync, CUDA-graph safe.
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from hopperllm.kernels import timeline
from hopperllm.kernels.fp8 import (
    FP8_DTYPE,
    _prefetch_l2,
    fp8_inv_scale,
    fp8_scale_from_amax,
    quantize_fp8,
    tile_counters,
)
from hopperllm.kernels.launch import cdiv, next_power_of_2, num_sms
from hopperllm.kernels.pdl import pdl_kwargs, pdl_prologue
from hopperllm.kernels.timeline import stamp

_LOG2E = 1.4426950408889634
# Prefill's FP8 P @ V (PREFILL_FP8_PV): probabilities in [0, 1] times 256 keep values down to 2^-14 normal
# in e4m3 (smallest normal 2^-6), the largest (256) under its 448
PV_P_SCALE = tl.constexpr(256.0)

# Decode: the fewest tokens worth a split of their own (below this, the merge costs more than it saves),
# and a cap on splits (the workspace and stage 2 grow with it).
# 128 (of max_model_len): with page-aligned slices and 32-key tiles, 32 slices of a 2176-key context beat
# 16 at the 70B's head layouts (tune-attention-70b-h200.json). History: 256 had measured best with
# 128-key tiles and slices of whole tiles (ab-decode-70b, v11); v9 had picked 128 with a separate merge.
_MIN_TOKENS_PER_SPLIT = 128
_MAX_SPLITS = 32


# --------------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------------


def ref_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    fp8_pv: bool = False,
) -> torch.Tensor:
    """Causal attention of q [T, Hq, D] over the paged cache, in float32; returns [T, Hq, D] in q's dtype.
    fp8_pv: the probabilities (relative to each row's max) are rounded to e4m3 as PREFILL_FP8_PV rounds them
    (the kernel rounds them relative to the running max of the keys so far, so the two differ by rounding)."""
    _, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    out = torch.empty_like(q)
    for b, seq_len in enumerate(lens):
        q_start, q_end = cu[b], cu[b + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        blocks = block_tables[b, : -(-seq_len // block_size)].long()
        k = k_cache[blocks].float().reshape(-1, num_kv_heads, head_dim)[:seq_len]
        v = v_cache[blocks].float().reshape(-1, num_kv_heads, head_dim)[:seq_len]
        if k_scale is not None:
            k = k * k_scale.float()
        if v_scale is not None:
            v = v * v_scale.float()
        k = k.repeat_interleave(group, dim=1)  # [L, Hq, D]
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[q_start:q_end].float(), k) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        scores.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))
        if fp8_pv:
            out[q_start:q_end] = fp8_pv_softmax_matmul(scores, v.transpose(0, 1)).transpose(0, 1).to(q.dtype)
            continue
        probs = torch.softmax(scores, dim=-1)
        out[q_start:q_end] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out


def fp8_pv_softmax_matmul(scores: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(scores) @ v with the unnormalized probabilities rounded as PREFILL_FP8_PV rounds them:
    exp(s - row max) * PV_P_SCALE to e4m3, the row sum taken before rounding. scores [..., Q, K] (masked
    entries -inf), v [..., K, D] (already scaled); float32 math, returns float32 [..., Q, D]."""
    scores = scores.float()
    p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    p8 = (p * PV_P_SCALE.value).to(torch.float8_e4m3fn).float() / PV_P_SCALE.value
    return (p8 @ v.float()) / p.sum(dim=-1, keepdim=True)


# --------------------------------------------------------------------------------------------------------
# Shared inner loop
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _attend_key_range(
    acc,
    l_i,
    m_i,
    q,
    q_pos,  # [BLOCK_M] absolute position of each row's query
    k_cache_ptr,
    v_cache_ptr,
    block_table_row,
    kvh,
    k_start,
    k_end,
    qk_scale,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,  # False: every key in [k_start, k_end) is visible to every row
    FP8_KV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FP8_QK: tl.constexpr,  # q is e4m3 (rows scaled by q_row_scale): QK^T on FP8 tensor cores, K unconverted
    q_row_scale,  # [BLOCK_M] float32 with FP8_QK (else unused)
    ACT_FP16: tl.constexpr,  # with FP8_QK: V and P in float16 (else bfloat16)
    FP8_PV: tl.constexpr,  # with FP8_QK: P @ V on FP8 tensor cores too (P * PV_P_SCALE rounded to e4m3)
):
    """Online-softmax update of (acc, l_i, m_i) with keys [k_start, k_end) of one sequence's paged cache.

    Keys are gathered through the block table a BLOCK_N tile at a time (a tile may span cache blocks);
    with CAUSAL_MASK, row r sees key j only if j <= q_pos[r] and j < k_end.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(k_start, k_end, BLOCK_N):
        pos = start_n + offs_n
        if CAUSAL_MASK:
            mask_n = pos < k_end
            block_ids = tl.load(block_table_row + pos // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
        else:
            block_ids = tl.load(block_table_row + pos // PAGE_SIZE).to(tl.int64)
        in_block = pos % PAGE_SIZE
        k_offs = block_ids[:, None] * stride_kb + in_block[:, None] * stride_kt + kvh * stride_kh
        v_offs = block_ids[:, None] * stride_vb + in_block[:, None] * stride_vt + kvh * stride_vh
        if CAUSAL_MASK:
            k = tl.load(k_cache_ptr + k_offs + offs_d[None, :], mask=mask_n[:, None], other=0.0)
            v = tl.load(v_cache_ptr + v_offs + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        else:
            k = tl.load(k_cache_ptr + k_offs + offs_d[None, :])
            v = tl.load(v_cache_ptr + v_offs + offs_d[None, :])
        if FP8_QK:  # FP8 cache and FP8 q: only V is widened, for a 16-bit P @ V product
            if not FP8_PV:
                v = v.to(tl.float16 if ACT_FP16 else tl.bfloat16)
            s = tl.dot(q, tl.trans(k)) * (q_row_scale[:, None] * qk_scale)
        else:
            if FP8_KV:
                k = k.to(q.dtype)
                v = v.to(q.dtype)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        if CAUSAL_MASK:
            visible = (pos[None, :] <= q_pos[:, None]) & mask_n[None, :]
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP8_PV:
            # P in [0, 1] scaled up so that its small values stay normal in e4m3 (>= 2^-6 / 256); the sums
            # are float32, the scale comes off with V's at the end (TensorRT-LLM's FP8 context attention)
            pv = tl.dot((p * PV_P_SCALE).to(v.dtype), v)
        else:
            pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc, l_i, m_i


# --------------------------------------------------------------------------------------------------------
# Decode (flash-decoding, split-K)
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _load_kv_tile(k_cache_ptr, v_cache_ptr, block_ids, pos, mask, kvh, stride_kb, stride_kt, stride_kh,
                  stride_vb, stride_vt, stride_vh, PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr):  # fmt: skip
    """The K and V rows of key positions `pos` (masked rows read nothing and give 0), [BLOCK_N, HEAD_DIM]."""
    offs_d = tl.arange(0, HEAD_DIM)
    in_block = pos % PAGE_SIZE
    k_offs = block_ids[:, None] * stride_kb + in_block[:, None] * stride_kt + kvh * stride_kh
    v_offs = block_ids[:, None] * stride_vb + in_block[:, None] * stride_vt + kvh * stride_vh
    k = tl.load(k_cache_ptr + k_offs + offs_d[None, :], mask=mask[:, None], other=0.0)
    v = tl.load(v_cache_ptr + v_offs + offs_d[None, :], mask=mask[:, None], other=0.0)
    return k, v


@triton.jit
def _decode_tile_update(acc, l_i, m_i, q, k, v, mask, qk_scale, FP8_KV: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, ROWS: tl.constexpr):  # fmt: skip
    """Online-softmax update of (acc, l_i, m_i) [BLOCK_H, ...] with one tile of keys (mask: which exist).
    The two products on tensor cores (q padded to >= 16 rows, K / V converted to q's dtype). Products on
    CUDA cores in float32 with q unpadded, for MHA's 1/16-used tile, ran slower at every batch-1 layout
    (perf-notes v29: the 7B's heads 19.2 against 14.1 us) and were removed.
    ROWS > 1: `mask` is [BLOCK_H, BLOCK_N], the rows being queries with causal limits of their own, so a row may
    see none of a tile's keys (its running max stays -inf; exp2 then takes 0 for it)."""
    if FP8_KV:
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_H, BLOCK_N]
    if ROWS > 1:
        s = tl.where(mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        s = tl.where(mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: a tile's first key always exists
        m_use = m_new
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    acc = acc * alpha[:, None] + pv
    return acc, l_i, m_new


@triton.jit
def _decode_key_loop(
    acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, block_table_row, kvh, start, end, qk_scale,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, FP8_KV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PREFETCH: tl.constexpr, ROWS: tl.constexpr, row_len,
):  # fmt: skip
    """The decode program's keys [start, end) of one sequence and KV head, a BLOCK_N tile at a time.
    PREFETCH: the next tile's K / V loads are issued before this tile's math, and the block ids of the tile
    after it before those (loop-carried registers): a program keeps a tile in flight while it computes,
    where loading at the top of each iteration left every tile's memory latency exposed.
    ROWS > 1 (no PREFETCH): the tile's rows belong to several queries of the sequence, row r seeing the keys
    before row_len[r] only."""
    offs_n = tl.arange(0, BLOCK_N)
    if PREFETCH:
        pos = start + offs_n
        mask = pos < end
        block_ids = tl.load(block_table_row + pos // PAGE_SIZE, mask=mask, other=0).to(tl.int64)
        k, v = _load_kv_tile(k_cache_ptr, v_cache_ptr, block_ids, pos, mask, kvh, stride_kb, stride_kt,
                             stride_kh, stride_vb, stride_vt, stride_vh, PAGE_SIZE, HEAD_DIM)  # fmt: skip
        pos = pos + BLOCK_N  # from here on: the next tile's positions and block ids
        block_ids = tl.load(block_table_row + pos // PAGE_SIZE, mask=pos < end, other=0).to(tl.int64)
    for start_n in range(start, end, BLOCK_N):
        if PREFETCH:
            next_mask = pos < end
            next_k, next_v = _load_kv_tile(k_cache_ptr, v_cache_ptr, block_ids, pos, next_mask, kvh,
                                           stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                                           PAGE_SIZE, HEAD_DIM)  # fmt: skip
            pos = pos + BLOCK_N
            block_ids = tl.load(block_table_row + pos // PAGE_SIZE, mask=pos < end, other=0).to(tl.int64)
            acc, l_i, m_i = _decode_tile_update(acc, l_i, m_i, q, k, v, mask, qk_scale, FP8_KV,
                                                DOT_PRECISION, 1)  # fmt: skip
            k = next_k
            v = next_v
            mask = next_mask
        else:
            pos = start_n + offs_n
            mask = pos < end
            block_ids = tl.load(block_table_row + pos // PAGE_SIZE, mask=mask, other=0).to(tl.int64)
            k, v = _load_kv_tile(k_cache_ptr, v_cache_ptr, block_ids, pos, mask, kvh, stride_kb, stride_kt,
                                 stride_kh, stride_vb, stride_vt, stride_vh, PAGE_SIZE, HEAD_DIM)  # fmt: skip
            if ROWS > 1:
                rows_mask = mask[None, :] & (pos[None, :] < row_len[:, None])
                acc, l_i, m_i = _decode_tile_update(acc, l_i, m_i, q, k, v, rows_mask, qk_scale, FP8_KV,
                                                    DOT_PRECISION, ROWS)  # fmt: skip
            else:
                acc, l_i, m_i = _decode_tile_update(acc, l_i, m_i, q, k, v, mask, qk_scale, FP8_KV,
                                                    DOT_PRECISION, 1)  # fmt: skip
    return acc, l_i, m_i


@triton.jit
def _rotate(x, x_partner, cos, sin, first):
    # rotate_half rotary in float32, written as rotary_kv_write's halves: x1 cos - x2 sin, x2 cos + x1 sin
    x = x.to(tl.float32)
    x_partner = x_partner.to(tl.float32)
    return tl.where(first, x * cos - x_partner * sin, x * cos + x_partner * sin)


# Ints that change from step to step are not specialized on (Triton would compile a variant per
# divisibility class, ~1 s each, in the middle of serving): the block-table width, the first sequence.
@triton.jit(do_not_specialize=["stride_bt"])
def _decode_split_kernel(
    q_ptr,  # [B, Hq, D]
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    v_cache_ptr,
    block_tables_ptr,  # int32 [B, max_blocks]
    seq_lens_ptr,  # int32 [B]
    k_scale_ptr,  # float32 [1] (FP8_KV only)
    v_scale_ptr,
    out_ptr,  # [B, Hq, D] (rows contiguous when QUANT_OUT)
    part_out_ptr,  # float32 [B, Hq, NUM_SPLITS, D], written when NUM_SPLITS > 1
    part_lse_ptr,  # float32 [B, Hq, NUM_SPLITS] (log2 domain)
    counter_ptr,  # int32 [B * Hkv + B], zero between launches: arrivals per (b, kv head), then per b
    q8_ptr,  # QUANT_OUT: e4m3 [B, Hq * D], the output quantized per token
    q8_scale_ptr,  # QUANT_OUT: float32 [B], its scales
    k_new_ptr,  # ROTARY: the step's k [B, Hkv, D] (unrotated)
    v_new_ptr,  # ROTARY: the step's v [B, Hkv, D]
    positions_ptr,  # ROTARY: int64 [B]
    cos_sin_ptr,  # ROTARY: float32 [max_position, D] = cat(cos, sin)
    slot_ptr,  # ROTARY: int64 [B] cache slot of the new token (< 0: a padding row, nothing to store)
    ts_ptr,  # TIMESTAMPS: int64 [B * Hkv * NUM_SPLITS, 8] per-program phase times (kernels/timeline.py)
    row_groups_ptr,  # ROWS > 1: int32 [G + 1], group g's rows are g[i] .. g[i + 1] - 1 (one sequence's queries)
    qk_scale,  # softmax scale * log2(e)
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
    stride_ob,
    stride_oh,
    stride_knb,
    stride_knh,
    stride_vnb,
    stride_vnh,
    stride_cs,
    GROUP: tl.constexpr,  # query heads per kv head
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,  # tokens per cache block
    NUM_SPLITS: tl.constexpr,
    BLOCK_H: tl.constexpr,  # GROUP rounded up to a power of two, at least 16 rows (for tl.dot)
    BLOCK_N: tl.constexpr,  # keys per iteration
    PREFETCH: tl.constexpr,  # the key loop issues the next tile's loads before this tile's math
    FP8_KV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP16: tl.constexpr,  # FP8_KV: the products in float16 (q scaled by 2^-k if over 2^15)
    QUANT_OUT: tl.constexpr,  # also write the output row as per-token FP8 (the o_proj input)
    QUANT_BLOCK: tl.constexpr,  # power of two >= Hq * D
    ROTARY: tl.constexpr,  # q is unrotated; rotate it, and store the new token's rotated k and v first
    KV_LINES: tl.constexpr,  # > 0 (GPU): 128-byte lines per cached K / V row, prefetched before the wait
    USE_PDL: tl.constexpr,
    TIMESTAMPS: tl.constexpr = False,  # write phase times to ts_ptr (GPU only; off in serving)
    ROWS: tl.constexpr = 1,  # > 1: a program's sequence is a group of up to ROWS consecutive rows (queries)
):
    # One program: sequence b, kv head kvh, context slice `split`, for all GROUP query heads of kvh.
    # Floor: each K/V byte of the context is read once per kv head (not once per query head), so the
    # whole decode step reads sum_b(seq_len_b) * Hkv * D * 2 * elem_bytes (+ q, out, workspace: small).
    # The merge of the slices happens in the same launch: the last slice of (b, kvh) to finish merges
    # them (an arrival counter, as fp8_gemv's split-K fix-up), and with QUANT_OUT the last kv head of b
    # to finish quantizes the whole output row: one kernel per layer instead of three. With ROTARY the
    # rotary embedding and cache write of the step's token (rotary_kv_write) happen here too: every
    # program rotates its q heads in registers, and the program whose slice holds the last position
    # stores that position's k and v before it reads its keys.
    # ROWS > 1 (speculative verify steps in the row layout: each row a query with its own causal length
    # `seq_lens[row]` and its sequence's block table): program b takes group b's rows, all at once, as the
    # tile's BLOCK_H rows (row r * GROUP + g: query r, head g), so the group reads its keys once, not once a
    # row; no ROTARY (the rows' k / v are in the cache already).
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_kv_heads = tl.num_programs(1)
    num_q_heads = num_kv_heads * GROUP
    prog = (b * num_kv_heads + kvh) * NUM_SPLITS + split  # this program's row of ts_ptr
    stamp(ts_ptr, prog, 0, TIMESTAMPS)

    if ROWS > 1:
        row_start = tl.load(row_groups_ptr + b)
        n_rows = tl.load(row_groups_ptr + b + 1) - row_start
        if n_rows == 0:  # groups past the step's (a graph's grid has one a row)
            return
        seq_len = tl.load(seq_lens_ptr + row_start + n_rows - 1)  # the group's last row sees the most keys
    else:
        seq_len = tl.load(seq_lens_ptr + b)
        row_start = b  # (the one row: read by nothing but the ROWS > 1 paths)
        n_rows = 1
    # Slices are whole cache pages (the key loop masks the tail of a slice's last tile): at 2k context
    # and 16 splits every split gets work, where whole BLOCK_N = 128 tiles left 7 of 16 empty. Trailing
    # slices of a very short context are empty.
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), PAGE_SIZE) * PAGE_SIZE
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    if ROWS > 1:
        mask_h = offs_h // GROUP < n_rows
        heads = kvh * GROUP + offs_h % GROUP
        rows = row_start + offs_h // GROUP  # the token row of each tile row
        row_len = tl.load(seq_lens_ptr + rows, mask=mask_h, other=0)
    else:
        mask_h = offs_h < GROUP
        heads = kvh * GROUP + offs_h

    # Before the PDL wait: what the step's earlier kernels never write, so that only q, the new k / v and
    # the keys are loaded after it. The lengths, block table, positions and slots are copied in before the
    # step's first kernel, the cos / sin cache and the KV scales are constants; and the keys of this
    # slice go into L2 (a hint, coherent with the new token's row the previous kernel may be writing).
    if ROWS > 1:
        block_table_row = block_tables_ptr + row_start.to(tl.int64) * stride_bt
    else:
        block_table_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    if KV_LINES > 0:
        pos = start + tl.arange(0, 2 * BLOCK_N)  # the first two key tiles of the slice
        pmask = pos < end
        pf_blk = tl.load(block_table_row + pos // PAGE_SIZE, mask=pmask, other=0).to(tl.int64)
        pf_in = pos % PAGE_SIZE
        lines = tl.arange(0, KV_LINES) * 128
        k_rows = k_cache_ptr + pf_blk * stride_kb + pf_in * stride_kt + kvh * stride_kh
        v_rows = v_cache_ptr + pf_blk * stride_vb + pf_in * stride_vt + kvh * stride_vh
        _prefetch_l2(tl.where(pmask, k_rows, k_cache_ptr)[:, None] + lines[None, :])
        _prefetch_l2(tl.where(pmask, v_rows, v_cache_ptr)[:, None] + lines[None, :])
    if FP8_KV:
        k_scale = tl.load(k_scale_ptr)
        v_scale = tl.load(v_scale_ptr)
    if ROTARY:
        HALF: tl.constexpr = HEAD_DIM // 2
        first = offs_d < HALF
        partner = tl.where(first, offs_d + HALF, offs_d - HALF)  # rotate_half's other element
        cs_row = cos_sin_ptr + tl.load(positions_ptr + b) * stride_cs
        cos = tl.load(cs_row + offs_d % HALF)
        sin = tl.load(cs_row + HALF + offs_d % HALF)
        slot = tl.load(slot_ptr + b)
    pdl_prologue(USE_PDL)
    stamp(ts_ptr, prog, 1, TIMESTAMPS)
    if ROWS > 1:
        q_ptrs = q_ptr + rows[:, None] * stride_qb + heads[:, None] * stride_qh
    else:
        q_ptrs = q_ptr + b * stride_qb + heads[:, None] * stride_qh
    q = tl.load(q_ptrs + offs_d[None, :], mask=mask_h[:, None], other=0.0)
    if ROTARY:
        q_partner = tl.load(q_ptrs + partner[None, :], mask=mask_h[:, None], other=0.0)
        q = _rotate(q, q_partner, cos[None, :], sin[None, :], first[None, :]).to(q_ptr.dtype.element_ty)
        if (start < end) & (end == seq_len) & (slot >= 0):
            k_row = k_new_ptr + b.to(tl.int64) * stride_knb + kvh * stride_knh
            k_new = _rotate(tl.load(k_row + offs_d), tl.load(k_row + partner), cos, sin, first)
            k_new = k_new.to(k_new_ptr.dtype.element_ty).to(tl.float32)  # rounded as rotary_kv_write does
            v_new = tl.load(v_new_ptr + b.to(tl.int64) * stride_vnb + kvh * stride_vnh + offs_d).to(
                tl.float32
            )
            blk = slot // PAGE_SIZE  # the cache row of position seq_len - 1, which the key loop reads
            in_block = slot % PAGE_SIZE
            k_dst = k_cache_ptr + blk * stride_kb + in_block * stride_kt + kvh * stride_kh + offs_d
            v_dst = v_cache_ptr + blk * stride_vb + in_block * stride_vt + kvh * stride_vh + offs_d
            if FP8_KV:
                tl.store(k_dst, quantize_fp8(k_new, fp8_inv_scale(k_scale)))
                tl.store(v_dst, quantize_fp8(v_new, fp8_inv_scale(v_scale)))
            else:
                tl.store(k_dst, k_new.to(k_cache_ptr.dtype.element_ty))
                tl.store(v_dst, v_new.to(v_cache_ptr.dtype.element_ty))
            tl.debug_barrier()  # every thread's store is visible to the loads of the key loop below
    if FP8_KV:
        qk_scale = qk_scale * k_scale
    if DOT_FP16:
        # e4m3 -> float16 is one conversion a pair of values where bfloat16 takes a detour through float32;
        # K and V are exact in either, P in [0, 1] is kept more precisely. q moves to float16 exactly, unless
        # its largest value is over 2^15: then q is scaled by a power of two (exact) that the scores undo.
        q32 = q.to(tl.float32)
        q_exp = tl.maximum(tl.ceil(tl.log2(tl.max(tl.max(tl.abs(q32), 1), 0))) - 15.0, 0.0)
        q = (q32 * tl.exp2(-q_exp)).to(tl.float16)
        qk_scale = qk_scale * tl.exp2(q_exp)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    stamp(ts_ptr, prog, 2, TIMESTAMPS)
    if ROWS > 1:
        acc, l_i, m_i = _decode_key_loop(
            acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, block_table_row, kvh, start, end, qk_scale,
            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
            HEAD_DIM, PAGE_SIZE, BLOCK_N, FP8_KV, DOT_PRECISION, False, ROWS, row_len,
        )  # fmt: skip
    else:
        acc, l_i, m_i = _decode_key_loop(
            acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, block_table_row, kvh, start, end, qk_scale,
            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
            HEAD_DIM, PAGE_SIZE, BLOCK_N, FP8_KV, DOT_PRECISION, PREFETCH, 1, m_i,  # (m_i: unused)
        )  # fmt: skip
    stamp(ts_ptr, prog, 3, TIMESTAMPS)

    if FP8_KV:
        acc = acc * v_scale
    # An empty slice (or seq_len == 0) has l_i == 0: write zeros and lse = -inf, which stage 2 weighs 0.
    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    if ROWS > 1:
        out_offs = rows[:, None] * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        row_heads = rows * num_q_heads + heads
    else:
        out_offs = b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        row_heads = b * num_q_heads + heads
    if NUM_SPLITS == 1:
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask_h[:, None])
        stamp(ts_ptr, prog, 4, TIMESTAMPS)
        if QUANT_OUT:
            _quant_row_if_last(out_ptr, q8_ptr, q8_scale_ptr, counter_ptr, b, num_kv_heads, stride_ob,
                               num_q_heads * HEAD_DIM, QUANT_BLOCK, ts_ptr, prog, TIMESTAMPS, ROWS, row_start,
                               n_rows)  # fmt: skip
    else:
        row = row_heads * NUM_SPLITS + split
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(part_lse_ptr + row, lse, mask=mask_h)
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=mask_h[:, None])
        tl.debug_barrier()  # every thread's partial is stored before the release below
        tile = b * num_kv_heads + kvh
        arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel")
        stamp(ts_ptr, prog, 4, TIMESTAMPS)
        if arrived == NUM_SPLITS - 1:
            # Merge by log-sum-exp (as ref: an empty slice has lse -inf and weight 0; all empty -> zeros).
            rows0 = row_heads * NUM_SPLITS
            m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
            for s_ in tl.static_range(NUM_SPLITS):
                m = tl.maximum(m, tl.load(part_lse_ptr + rows0 + s_, mask=mask_h, other=float("-inf"),
                                          cache_modifier=".cg"))  # fmt: skip
            m = tl.where(m == float("-inf"), 0.0, m)
            denom = tl.zeros([BLOCK_H], dtype=tl.float32)
            o = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
            for s_ in tl.static_range(NUM_SPLITS):
                w = tl.exp2(tl.load(part_lse_ptr + rows0 + s_, mask=mask_h, other=float("-inf"),
                                    cache_modifier=".cg") - m)  # fmt: skip
                part = tl.load(part_out_ptr + (rows0 + s_)[:, None] * HEAD_DIM + offs_d[None, :],
                               mask=mask_h[:, None], other=0.0, cache_modifier=".cg")  # fmt: skip
                denom += w
                o += part * w[:, None]
            o = o / tl.where(denom == 0.0, 1.0, denom)[:, None]
            tl.store(out_ptr + out_offs, o.to(out_ptr.dtype.element_ty), mask=mask_h[:, None])
            tl.atomic_xchg(counter_ptr + tile, 0, sem="relaxed")
            stamp(ts_ptr, prog, 5, TIMESTAMPS)
            if QUANT_OUT:
                _quant_row_if_last(out_ptr, q8_ptr, q8_scale_ptr, counter_ptr, b, num_kv_heads, stride_ob,
                                   num_q_heads * HEAD_DIM, QUANT_BLOCK, ts_ptr, prog, TIMESTAMPS, ROWS, row_start,
                                   n_rows)  # fmt: skip


@triton.jit
def _quant_row_if_last(out_ptr, q8_ptr, q8_scale_ptr, counter_ptr, b, num_kv_heads, stride_ob, row_len,
                       QUANT_BLOCK: tl.constexpr, ts_ptr, prog, TIMESTAMPS: tl.constexpr, ROWS: tl.constexpr,
                       row_start, n_rows):  # fmt: skip
    """Called by the program that completed kv head group (b, kvh): the last of b's kv heads quantizes b's
    whole output row per token, reading back the rounded outputs (bit for bit per_token_quant_fp8). ROWS > 1:
    b is a group of rows, and its n_rows rows from row_start are each quantized so."""
    tl.debug_barrier()  # every thread's output store is done before the release below
    slot = tl.num_programs(0) * num_kv_heads + b
    arrived = tl.atomic_add(counter_ptr + slot, 1, sem="acq_rel")
    if arrived == num_kv_heads - 1:
        offs = tl.arange(0, QUANT_BLOCK)
        mask = offs < row_len
        if ROWS > 1:
            for r in tl.static_range(ROWS):
                if r < n_rows:
                    _quant_out_row(
                        out_ptr, q8_ptr, q8_scale_ptr, row_start + r, stride_ob, row_len, offs, mask
                    )
        else:
            _quant_out_row(out_ptr, q8_ptr, q8_scale_ptr, b, stride_ob, row_len, offs, mask)
        tl.atomic_xchg(counter_ptr + slot, 0, sem="relaxed")
        stamp(ts_ptr, prog, 6, TIMESTAMPS)


@triton.jit
def _quant_out_row(out_ptr, q8_ptr, q8_scale_ptr, t, stride_ob, row_len, offs, mask):
    x = tl.load(out_ptr + t * stride_ob + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
    scale = fp8_scale_from_amax(tl.max(tl.abs(x), axis=0))
    tl.store(q8_scale_ptr + t, scale)
    tl.store(q8_ptr + t.to(tl.int64) * row_len + offs, quantize_fp8(x, fp8_inv_scale(scale)), mask=mask)


def _num_sms(device: torch.device) -> int:
    return num_sms(device, default=1)


# Launch parameters of the decode kernel on the GPU (benchmarks/tune_attention.py sweeps them): 128-key
# tiles for batches (best on an H100), 32-key tiles when a sequence's context is cut into >= 16 slices
# (batch 1-2 with few kv heads: tune-attention-70b-h200.json, 70B heads at TP=1/2/8, 2176 keys, in CUDA
# graphs: 32 slices of 32-key tiles 10.7 / 8.9 / 7.8 us against 11.9 / 11.5 / 10.7 with 16 slices of
# 128-key tiles).
# DOT_FP16 (FP8 caches): the products in float16, K / V converted from e4m3 in one instruction a pair where
# bfloat16's conversion goes through float32. At the throughput run's decode batches (Llama-3-8B heads, 2176
# keys, one H200, in CUDA graphs; tune-attn-fp16-big-h200-v25.json) the bfloat16 kernel was bound by that
# conversion: 64 / 128 / 256 sequences 149 / 291 / 576 us -> 113 / 193 / 379 us with float16 (45% -> 59-71%
# of the read floor). The many-split configs keep bfloat16: the 7B's MHA heads at batch 1 (16 slices of
# 32-key tiles) ran 14.3 us against 14.8 with float16, and 2.824 against 3.051 ms a step in the model's graph.
DECODE_CONFIG = {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3, "DOT_FP16": True}
DECODE_CONFIG_MANY_SPLITS = {"BLOCK_N": 32, "num_warps": 4, "num_stages": 3}
# 32 slices (batch 1-2 of grouped-query layers): 5 stages keep a second key tile in flight. The 70B's heads
# at TP=2, 2176 keys, quantizing tail, in CUDA graphs (tune-attention-stages-h200-v21.json, Triton 3.6):
# 9.8 us against 10.2 with 3 stages, same 127-128 registers and 4 programs an SM; 16 slices of 8 sequences
# stay at 3 stages (16.9 us against 17.4 with 5).
DECODE_CONFIG_MOST_SPLITS = {"BLOCK_N": 32, "num_warps": 4, "num_stages": 5}
DECODE_CONFIGS = (DECODE_CONFIG, DECODE_CONFIG_MANY_SPLITS, DECODE_CONFIG_MOST_SPLITS)
# Optional keys of a config: PREFETCH (default False), DOT_FP16 (default False; see decode_dot_fp16),
# maxnreg, maxnreg_quant (caps on the registers a thread, passed to the launch on the GPU; see
# decode_maxnreg; default none).
# The CPU interpreter's (tests: small tiles, so that slices span several).
CPU_DECODE_CONFIG = {"BLOCK_N": 16, "num_warps": 4, "num_stages": 2}
# HOPPERLLM_DECODE_NUM_STAGES sets every config's pipeline stages (A/B runs): with Triton 3.9, 3 and 4 stages
# keep one key tile in flight ahead of the one computed, 5 keep two (benchmarks/kernel_resources.py).
if os.environ.get("HOPPERLLM_DECODE_NUM_STAGES"):
    for _cfg in DECODE_CONFIGS:
        _cfg["num_stages"] = int(os.environ["HOPPERLLM_DECODE_NUM_STAGES"])
# Register caps of the batch config (launch maxnreg=, GPU only): `maxnreg` for the plain output (mixed steps);
# `maxnreg_quant` for the quantizing tail (decode-only steps), by the launch's programs an SM: pairs (bound,
# cap), the first whose bound (programs an SM; None: any) the grid does not exceed. Under Triton 3.6 the
# variants compile to 168 and 218 registers (3 and 2 programs an SM), where Nsight Compute found the 8B's 512
# decodes latency-bound (DRAM 45%, no eligible warp in 56% of the cycles; perf-notes v30). 128 takes the plain
# variant to 4 programs an SM with no spill, the quantizing one to 4 with spills, 168 the quantizing one to 3
# with 8 bytes spilled (kernel_resources.py --maxnreg). Measured on an H200, 132 SMs (Llama-3-8B heads, 2176
# keys, one slice, in CUDA graphs; tune-attention-maxnreg*-h200-v31.json): plain 64 / 256 / 512 sequences
# 112 / 373 / 753 us -> 95 / 382 / 713 at 128; quantizing 32 / 64 / 128 / 256 / 512 sequences (256-4096
# programs) 71 / 138 / 266 / 523 / 1009 us uncapped, 90 / 123 / 240 / 471 / 905 at 128, 83 / 149 / 233 / 451 /
# 854 at 168: a cap costs where the uncapped kernel already holds every program at once (<= 2 an SM), 128 wins
# where it then does (<= 4), 168 beyond. The 8B at 256 sequences: TPOT 17.0 -> 15.4 ms with 168
# (ab-8b-b256-maxnreg-h200-v31.json); the throughput run +0.9% (ab-throughput-8b-maxnreg-default-h200-v31.json).
DECODE_CONFIG.update(maxnreg=128, maxnreg_quant=((2, None), (4, 128), (None, 168)))


def decode_maxnreg_from_env(value: str | None) -> dict:
    """HOPPERLLM_DECODE_MAXNREG (A/B runs) as batch-config keys: 0 no cap; N every variant at N; A,B the plain
    variant at A, the quantizing one at B (any grid). Unset or empty: no change ({})."""
    if not value:
        return {}
    parts = value.split(",")
    if len(parts) > 2 or not all(p.strip().isdigit() and (int(p) == 0 or 24 <= int(p) <= 255) for p in parts):
        raise ValueError(
            f"HOPPERLLM_DECODE_MAXNREG must be 0, N or A,B with caps in 24..255 (0 for none), got {value!r}"
        )
    caps = [int(p) or None for p in parts]
    return {"maxnreg": caps[0], "maxnreg_quant": ((None, caps[-1]),)}


DECODE_CONFIG.update(decode_maxnreg_from_env(os.environ.get("HOPPERLLM_DECODE_MAXNREG")))
# HOPPERLLM_VERIFY_ROW_GROUPS_MAXNREG=N caps the registers of the row-group launches (A/B runs: the 7B's 16
# slices of 5 rows compile to 129 registers, 3 programs an SM, where 128 would hold 4; perf-notes v35)
ROW_GROUPS_MAXNREG = int(os.environ.get("HOPPERLLM_VERIFY_ROW_GROUPS_MAXNREG", "0")) or None
MANY_SPLITS = 16
MOST_SPLITS = 32
# HOPPERLLM_DECODE_DOT_FP16=0 / 1 turns the decode products' float16 (DOT_FP16 above) off / on for every
# config; unset, each config's DOT_FP16 key decides (default False).
DECODE_DOT_FP16: bool | None = {"0": False, "1": True}.get(os.environ.get("HOPPERLLM_DECODE_DOT_FP16", ""))


def decode_dot_fp16(cfg: dict) -> bool:
    """Whether a decode config runs its products in float16 (with an FP8 cache and a 16-bit q)."""
    return bool(cfg.get("DOT_FP16", False)) if DECODE_DOT_FP16 is None else DECODE_DOT_FP16


def decode_maxnreg(cfg: dict, quant_out: bool, programs: int, num_sms: int) -> int | None:
    """A decode config's register cap for the variant launched on a grid of `programs` (None: the compiler's
    own allocation)."""
    if not quant_out:
        return cfg.get("maxnreg")
    for bound, cap in cfg.get("maxnreg_quant", ()):
        if bound is None or programs <= bound * num_sms:
            return cap
    return None


def decode_config(num_splits: int) -> dict[str, int]:
    """The decode kernel's launch parameters on the GPU for a split count."""
    if num_splits >= MOST_SPLITS:
        return DECODE_CONFIG_MOST_SPLITS
    return DECODE_CONFIG_MANY_SPLITS if num_splits >= MANY_SPLITS else DECODE_CONFIG


# The split count is rounded up to a power of two. Measured on an H200: the 70B's heads at TP=2 for the graph
# of 8 sequences (batches 5-8) ran 16 slices of 32-key tiles in 15.3 us against 22.0 us with 8 slices of
# 128-key tiles (rounded down from 9; tune-attention-h200-v19.json, in CUDA graphs, 2176 keys); the 7B's MHA
# heads at batch 1 (9 wanted), in the model's decode graph at 2048 keys (ab-decode-att-7b-h200-v25.json):
# 16 slices of 32-key tiles 2.810 ms a step against 2.968 with 8 slices of 128-key tiles (-4.9 us a layer).
# HOPPERLLM_DECODE_SPLITS_UP=0 rounds down (for A/B runs).
SPLITS_UP = os.environ.get("HOPPERLLM_DECODE_SPLITS_UP", "1") != "0"


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Splits per sequence so that stage 1 has two or more programs per SM (each attends for its KV head's
    whole group of query heads), each with >= 128 keys.

    Depends only on host ints, so the model runner can call it once per captured batch size and pass
    the result as `num_splits` (fixed grid for CUDA graphs).
    """
    programs = max(batch * num_kv_heads, 1)
    want = cdiv(2 * _num_sms(device), programs)
    cap = max(cdiv(max_context, _MIN_TOKENS_PER_SPLIT), 1)
    # A power of two: NUM_SPLITS is a compile-time constant, and the few values this leaves (1..32) are all
    # compiled while the decode graphs are captured -- batch 1 picks the largest -- instead of one ~1 s
    # compile per new decode count in a mixed step while serving.
    if SPLITS_UP:
        want = next_power_of_2(want)
    n = max(1, min(want, cap, _MAX_SPLITS))
    return 1 << (n.bit_length() - 1)


def compile_decode_variants(
    num_q_heads: int,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    scale: float,
    dtype: torch.dtype,
    max_blocks: int,
    splits: list[int],
    quant_out: bool = False,
    cos_sin_cache: torch.Tensor | None = None,
    use_pdl: bool | None = None,
) -> torch.Tensor:
    """Launch flash-decoding once per split count in `splits` on one sequence of one key (block 0, slot 0),
    so that those kernel variants are compiled before serving: with the quantized output or not; with the
    rotary + cache write of the step's token (given `cos_sin_cache`; its slot is -1: nothing is stored);
    with PDL as a launch of that many rows would have it (`use_pdl`, default: as one row has it).
    Reads the cache, writes only its own output, which it returns (the last launch's output; without
    quant_out each query head gets its KV head's value row of that slot)."""
    device = k_cache.device
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    q = torch.zeros(1, num_q_heads, head_dim, dtype=dtype, device=device)
    out = torch.empty_like(q)
    tables = torch.zeros(1, max_blocks, dtype=torch.int32, device=device)
    seq_lens = torch.ones(1, dtype=torch.int32, device=device)
    new_kv = None
    if cos_sin_cache is not None:
        kv = torch.zeros(1, 2, num_kv_heads, head_dim, dtype=dtype, device=device)
        zero = torch.zeros(1, dtype=torch.int64, device=device)
        new_kv = NewTokenKV(kv[:, 0], kv[:, 1], zero, cos_sin_cache, zero - 1)
    res = out
    for n in splits:
        res = paged_decode_attention(
            q, k_cache, v_cache, tables, seq_lens, scale, k_scale, v_scale, num_splits=n, out=out,
            quant_out=quant_out, new_kv=new_kv, use_pdl=use_pdl,
        )  # fmt: skip
    return res[0] if quant_out else res


def _check_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale, v_scale) -> bool:
    """Validates shapes/dtypes shared by both kernels; returns whether the cache is FP8."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    num_q_heads = q.shape[1]
    if q.shape[2] != head_dim:
        raise ValueError(f"q head_dim {q.shape[2]} != cache head_dim {head_dim}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if head_dim < 16 or head_dim & (head_dim - 1) or head_dim > 256:
        raise ValueError(f"head_dim must be a power of two in [16, 256], got {head_dim}")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous last (head_dim) dimension")
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if fp8:
        if v_cache.dtype != k_cache.dtype or k_scale is None or v_scale is None:
            raise ValueError("an FP8 KV cache needs both caches in float8_e4m3fn and k_scale, v_scale")
    elif k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"KV cache dtype {k_cache.dtype} must match q dtype {q.dtype} (or be float8_e4m3fn)")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q dtype must be float16, bfloat16 or float32, got {q.dtype}")
    return fp8


def _check_new_kv(
    new_kv: NewTokenKV, batch: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> None:
    k, v, positions, cos_sin, slots = new_kv
    if k.shape != (batch, num_kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(
            f"new_kv k and v must be [{batch}, {num_kv_heads}, {head_dim}], got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k.dtype != dtype or v.dtype != dtype:
        raise ValueError(f"new_kv k and v must be {dtype} like q, got {k.dtype} and {v.dtype}")
    if positions.shape != (batch,) or slots.shape != (batch,):
        raise ValueError(f"new_kv positions and slot_mapping must be [{batch}]")
    if cos_sin.dim() != 2 or cos_sin.shape[1] != head_dim or cos_sin.dtype != torch.float32:
        raise ValueError(
            f"cos_sin_cache must be float32 [max_position, {head_dim}], got {tuple(cos_sin.shape)}"
        )
    if any(t.stride(-1) != 1 for t in (k, v, cos_sin)):
        raise ValueError("new_kv k, v and cos_sin_cache need a contiguous last dimension")


def _cache_strides(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, ...]:
    """(block, token, head) strides of K then V, in the kernels' argument order."""
    return (*k_cache.stride()[:3], *v_cache.stride()[:3])


def _dot_precision(q: torch.Tensor) -> str:
    # fp32 operands: exact products (the CPU interpreter, tests); fp16/bf16 ignore the setting.
    return "ieee" if q.dtype == torch.float32 else "tf32"


class NewTokenKV(NamedTuple):
    """The step's own k and v for paged_decode_attention to rotate and store (rotary_kv_write's inputs):
    k, v [B, Hkv, D] (strided views allowed, contiguous last dim), positions and slot_mapping int64 [B]
    (slot < 0: nothing stored), cos_sin_cache float32 [max_position, D]."""

    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    cos_sin_cache: torch.Tensor
    slot_mapping: torch.Tensor


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
    quant_out: bool = False,
    new_kv: NewTokenKV | None = None,
    use_pdl: bool | None = None,
    row_groups: torch.Tensor | None = None,
    max_rows: int = 1,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One new query per sequence: q [B, Hq, D] -> [B, Hq, D].

    No host read of device tensors: with `num_splits` unset it is chosen from the batch, the SM count
    and `max_seqlen_k` (or, without it, the block-table width * block_size), so the call is capturable in
    a CUDA graph either way; pass a fixed `num_splits` to keep the grid identical across replays.
    `quant_out`: return (out_fp8 [B, Hq * D], scale float32 [B, 1]) instead, the output quantized per
    token as per_token_quant_fp8 would (same bits), in the same launch.
    `new_kv`: q is not yet rotated, and the step's k, v are not yet in the cache: the same launch does
    what rotary_kv_write(q, k, v, ...) would before attending (q itself is left unrotated). The new token
    must sit at position seq_len - 1 of its sequence, at its slot in `slot_mapping`.
    `use_pdl`: launch with PDL or not (default: as pdl_kwargs decides for B rows; start-up warm-ups compile
    the variant a larger batch would launch).
    `row_groups` (int32 [G + 1], with `max_rows` > 1): the B rows are G groups of consecutive rows, group g
    rows row_groups[g] .. row_groups[g + 1] - 1 (at most max_rows; none for groups past the step's), each row a
    query of its group's sequence with its own causal length `seq_lens[row]` (the last row's the longest) and
    the sequence's block table in `block_tables[row]` (the group's first is read): speculative verify steps
    in the row layout. One program a group, kv head and slice attends for all of the group's rows, reading
    its keys once (not once a row); the output is what one call a row gives. No `new_kv`.
    """
    fp8 = _check_cache(q, k_cache, v_cache, k_scale, v_scale)
    batch, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    grouped = row_groups is not None and max_rows > 1
    if grouped and new_kv is not None:
        raise ValueError("row groups take queries whose k / v are in the cache already (no new_kv)")
    programs0 = row_groups.numel() - 1 if grouped else batch  # the grid's first dimension
    if new_kv is not None:
        _check_new_kv(new_kv, batch, num_kv_heads, head_dim, q.dtype)
    if num_splits is None:
        max_context = max_seqlen_k if max_seqlen_k is not None else block_tables.shape[1] * block_size
        seqs = cdiv(batch, max_rows) if grouped else batch
        num_splits = choose_num_splits(seqs, num_kv_heads, max_context, q.device)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if out is None:
        out = torch.empty((batch, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    elif quant_out and (out.stride(2) != 1 or out.stride(1) != head_dim):
        raise ValueError("quant_out needs an output whose rows are contiguous")
    row_len = num_q_heads * head_dim
    if quant_out:
        q8 = torch.empty((batch, row_len), dtype=FP8_DTYPE, device=q.device)
        q8_scale = torch.empty((batch, 1), dtype=torch.float32, device=q.device)
    else:
        q8 = q8_scale = out  # unused by the kernel
    if batch == 0:
        return (q8, q8_scale) if quant_out else out

    if num_splits > 1:
        part_out = torch.empty(batch, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch, num_q_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused by the kernel
    if num_splits > 1 or quant_out:
        counters = tile_counters(q.device, programs0 * num_kv_heads + programs0, "decode_attention")
    else:
        counters = out  # unused
    dummy_scale = seq_lens  # pointer never dereferenced without FP8_KV
    if new_kv is not None:
        k_new, v_new, positions, cos_sin, slots = new_kv
        new_strides = (k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1), cos_sin.stride(0))
    else:
        k_new = v_new = positions = cos_sin = slots = seq_lens  # unused by the kernel
        new_strides = (0, 0, 0, 0, 0)
    cfg = decode_config(num_splits) if q.is_cuda else CPU_DECODE_CONFIG
    block_h = max(16, next_power_of_2(group * (max_rows if grouped else 1)))
    block_n = cfg["BLOCK_N"]
    # phases (kernels/timeline.py): start, PDL wait passed, q ready, key loop done, slice arrived, merged, quantized
    ts = timeline.buffer("decode_attention", programs0 * num_kv_heads * num_splits, q.device, batch=programs0,
                         kv_heads=num_kv_heads, splits=num_splits)  # fmt: skip
    programs = programs0 * num_kv_heads * num_splits
    cap = decode_maxnreg(cfg, quant_out, programs, _num_sms(q.device)) if q.is_cuda else None
    if grouped and ROW_GROUPS_MAXNREG and q.is_cuda:
        cap = ROW_GROUPS_MAXNREG
    _decode_split_kernel[(programs0, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        k_scale if fp8 else dummy_scale,
        v_scale if fp8 else dummy_scale,
        out,
        part_out,
        part_lse,
        counters,
        q8,
        q8_scale,
        k_new,
        v_new,
        positions,
        cos_sin,
        slots,
        seq_lens if ts is None else ts,
        row_groups if grouped else seq_lens,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        *_cache_strides(k_cache, v_cache),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        *new_strides,
        GROUP=group,
        HEAD_DIM=head_dim,
        PAGE_SIZE=block_size,
        NUM_SPLITS=num_splits,
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        PREFETCH=cfg.get("PREFETCH", False) and not grouped,
        FP8_KV=fp8,
        DOT_PRECISION=_dot_precision(q),
        DOT_FP16=decode_dot_fp16(cfg) and fp8 and q.dtype != torch.float32,
        QUANT_OUT=quant_out,
        QUANT_BLOCK=next_power_of_2(row_len),
        ROTARY=new_kv is not None,
        KV_LINES=cdiv(head_dim * k_cache.element_size(), 128) if q.is_cuda else 0,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        TIMESTAMPS=ts is not None,
        ROWS=max_rows if grouped else 1,
        **pdl_kwargs(q.device, programs0, use_pdl),
        **({"maxnreg": cap} if cap else {}),
    )
    return (q8, q8_scale) if quant_out else out


# --------------------------------------------------------------------------------------------------------
# Prefill (ragged batch, causal, chunked prefill and prefix hits)
# --------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["stride_bt", "first_seq"])
def _prefill_kernel(
    q_ptr,  # [T, Hq, D]
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    v_cache_ptr,
    out_ptr,  # [T, Hq, D]
    cu_seqlens_q_ptr,  # int32 [B + 1]
    seq_lens_ptr,  # int32 [B]
    block_tables_ptr,  # int32 [B, max_blocks]
    k_scale_ptr,  # float32 [1] (FP8_KV only)
    v_scale_ptr,
    qk_scale,  # softmax scale * log2(e)
    first_seq,  # grid row 0 is sequence first_seq (mixed steps: the decodes before it run elsewhere)
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,  # query heads per kv head
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per tile = BLOCK_Q queries x GROUP heads (+ padding)
    BLOCK_Q: tl.constexpr,  # queries per tile (BLOCK_M // GROUP)
    BLOCK_N: tl.constexpr,  # keys per iteration
    FP8_KV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HEAVY_FIRST: tl.constexpr,  # grid (kv heads, sequences, tiles), the last query tiles launched first
    FP8_QK: tl.constexpr,  # FP8_KV only: quantize q per row to e4m3 and run QK^T on FP8 tensor cores
    ACT_FP16: tl.constexpr,  # FP8_QK only: P @ V in float16 (q is float16, or PREFILL_PV_FP16), else bfloat16
    FP8_PV: tl.constexpr,  # FP8_QK only: P @ V on FP8 tensor cores (P rounded to e4m3)
    USE_PDL: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    # One program: query tile `tile` of sequence b, all GROUP query heads of kv head kvh (row r is query
    # r // GROUP, head r % GROUP), so each K/V tile is loaded once per group. A tile's work grows with its
    # index (its causal prefix): with HEAVY_FIRST the longest tiles of every head start in the first wave
    # and the short ones fill the tail.
    # Floor: q + out once (2 * T * Hq * D * elem_bytes), plus each program's K/V prefix up to its causal
    # limit: sum over tiles of (ctx + tile_end) * Hkv * D * 2 * elem_bytes -- prefill is compute-bound
    # (~4 * D FLOPs per visible (query, key, head)), the K/V re-reads mostly hit L2.
    if HEAVY_FIRST:
        kvh = tl.program_id(0)
        tile = tl.num_programs(2) - 1 - tl.program_id(2)
    else:
        tile = tl.program_id(0)
        kvh = tl.program_id(2)
    b = tl.program_id(1) + first_seq

    q_start = tl.load(cu_seqlens_q_ptr + b)
    q_len = tl.load(cu_seqlens_q_ptr + b + 1) - q_start
    first_q = tile * BLOCK_Q
    if first_q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    ctx_len = seq_len - q_len  # keys cached before this step's queries

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_idx = first_q + offs_m // GROUP
    heads = kvh * GROUP + offs_m % GROUP
    mask_m = (offs_m < BLOCK_Q * GROUP) & (q_idx < q_len)
    tok = (q_start + q_idx).to(tl.int64)
    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_m[:, None],
        other=0.0,
    )
    q_pos = ctx_len + q_idx
    if FP8_KV:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
    if FP8_QK:
        # Each row (one query, one head) scaled to e4m3's range (FlashAttention-3's FP8 mode quantizes q
        # the same way when the cache is FP8); the scale comes back on the scores.
        q_row_scale = fp8_scale_from_amax(tl.max(tl.abs(q.to(tl.float32)), axis=1))
        q = quantize_fp8(q.to(tl.float32), fp8_inv_scale(q_row_scale)[:, None])
    else:
        q_row_scale = tl.zeros([BLOCK_M], dtype=tl.float32)  # unused

    block_table_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Keys below ctx_len + first_q + 1 are visible to every row: whole BLOCK_N tiles of them run unmasked;
    # the rest up to the tile's last query (the diagonal) run with the causal mask; keys beyond are skipped.
    last_q = tl.minimum(first_q + BLOCK_Q, q_len) - 1
    k_end = ctx_len + last_q + 1
    full_end = (ctx_len + first_q + 1) // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _attend_key_range(
        acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, block_table_row, kvh, 0, full_end, qk_scale,
        stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        HEAD_DIM, PAGE_SIZE, BLOCK_N, False, FP8_KV, DOT_PRECISION, FP8_QK, q_row_scale, ACT_FP16, FP8_PV,
    )  # fmt: skip
    acc, l_i, m_i = _attend_key_range(
        acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, block_table_row, kvh, full_end, k_end, qk_scale,
        stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        HEAD_DIM, PAGE_SIZE, BLOCK_N, True, FP8_KV, DOT_PRECISION, FP8_QK, q_row_scale, ACT_FP16, FP8_PV,
    )  # fmt: skip

    if FP8_KV:
        acc = acc * tl.load(v_scale_ptr)
    if FP8_PV:
        acc = acc * (1.0 / PV_P_SCALE)
    acc = acc / l_i[:, None]  # every valid row sees at least key 0
    tl.store(
        out_ptr + tok[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None],
    )


def _prefill_config(
    head_dim: int, group: int, is_cuda: bool, fp8_qk: bool = False
) -> tuple[int, int, int, int]:
    """(BLOCK_M rows, BLOCK_N keys, num_warps, num_stages) -- a starting point to tune on H100/H200."""
    if not is_cuda:  # the interpreter: small tiles so tests cross tile and diagonal boundaries
        return max(16, next_power_of_2(group)), 16, 1, 1
    if PREFILL_CONFIG is not None:  # set by benchmarks/tune_attention.py --prefill
        bm, bn, nw, ns = PREFILL_CONFIG
        return max(bm, next_power_of_2(group)), bn, nw, ns
    block_m = max(128, next_power_of_2(group))
    if head_dim <= 64:
        return block_m, 64, 4, 3
    # Best of 5 configs with the longest tiles first, H100, FP8 cache, 2048-token prompts
    # (results/ab-prefill-h100.json): GQA (Llama-3-8B 4x2048, Llama-2-70B) 256 rows / 8 warps / 2 stages,
    # 0.492 and 0.246 ms a layer (128 rows / 4 warps: 0.518, 0.265); MHA (Llama-2-7B) 128 rows / 4 warps /
    # 2 stages, 0.142 ms (256 rows: 0.153; 8 warps / 3 stages: 0.184).
    # With QK^T on FP8 tensor cores (PREFILL_FP8_QK) the GQA layers run best on 128 rows / 4 warps, on one
    # H200 (tune-prefill-fp8qk1-h200-v22.json): Llama-3-8B 4x2048 418 us (256 rows / 8 warps: 446; the 16-bit
    # QK^T's best, 256 / 8: 492), the 70B's TP=2 heads 415 (428; 476).
    if group >= 4 and not fp8_qk:
        return max(256, block_m), 64, 8, 2
    return block_m, 64, 4, 2


def prefill_config_from_env(text: str | None) -> tuple[int, int, int, int] | None:
    """HOPPERLLM_PREFILL_CONFIG=BLOCK_M,BLOCK_N,num_warps,num_stages (e.g. 64,64,4,2; colons work too, 64:64:4:2,
    where the value passes through a comma-split list such as device_run.sh's AB) replaces _prefill_config's
    choice on the GPU, for A/B runs of whole benchmarks (v28: 64 rows / 4 warps compile to 168 registers, no
    spills and three programs an SM under Triton 3.6, where the default's 128 rows take 255 with spills and two)."""
    if not text:
        return None
    try:
        vals = tuple(int(x) for x in re.split(r"[,:]", text))
    except ValueError:
        vals = ()
    ok = len(vals) == 4 and all(v >= 1 for v in vals) and min(vals[:2]) >= 16
    if not ok or any(v & (v - 1) for v in vals[:3]):
        raise ValueError(
            "HOPPERLLM_PREFILL_CONFIG must be BLOCK_M,BLOCK_N,num_warps,num_stages (the first three powers of "
            f"two, tiles of at least 16), got {text!r}"
        )
    return vals  # type: ignore[return-value]


PREFILL_CONFIG: tuple[int, int, int, int] | None = prefill_config_from_env(
    os.environ.get("HOPPERLLM_PREFILL_CONFIG")
)
PREFILL_HEAVY_FIRST = True  # launch the longest query tiles first (benchmarks/ab_prefill.py)
# With an FP8 cache and a bf16 / fp16 model, prefill quantizes q per row to e4m3 and multiplies it with the
# cached keys on FP8 tensor cores (twice the bf16 rate, no key conversion; FlashAttention-3's FP8 mode, as
# vLLM runs it with an FP8 cache, here with a scale per query row); P @ V stays 16-bit. On one H200 the
# prefill kernel -15%, Llama-3-8B throughput +1% (perf-notes v22). HOPPERLLM_PREFILL_FP8_QK=0 turns it off.
PREFILL_FP8_QK = os.environ.get("HOPPERLLM_PREFILL_FP8_QK", "1") == "1"
# With PREFILL_FP8_QK, HOPPERLLM_PREFILL_FP8_PV=1 also runs P @ V on FP8 tensor cores: each tile's
# probabilities (relative to the row's running max, in [0, 1]) times PV_P_SCALE rounded to e4m3, V unconverted
# (FlashAttention-3's and TensorRT-LLM's FP8 attention do the same).
PREFILL_FP8_PV = os.environ.get("HOPPERLLM_PREFILL_FP8_PV", "0") == "1"
# With PREFILL_FP8_QK and a bfloat16 model, P @ V runs in float16: V from e4m3 in one conversion a pair of
# values (bfloat16's goes through float32), P in [0, 1] kept more precisely. One H200, FP8 cache
# (tune-prefill-pvfp16-{0,1}-h200-v25.json): Llama-3-8B 4 x 2048 416.7 -> 376.4 us, the 7B's 1 x 2048 117.1 ->
# 107.7. HOPPERLLM_PREFILL_PV_FP16=0 keeps bfloat16.
PREFILL_PV_FP16 = os.environ.get("HOPPERLLM_PREFILL_PV_FP16", "1") == "1"


def prefill_fp8_qk(q_dtype: torch.dtype, fp8_cache: bool) -> bool:
    """Whether prefill rounds q to e4m3 for an FP8 QK^T (the kernel; the torch backend emulates the same)."""
    return fp8_cache and PREFILL_FP8_QK and q_dtype in (torch.bfloat16, torch.float16)


def prefill_fp8_pv(q_dtype: torch.dtype, fp8_cache: bool) -> bool:
    """Whether prefill also rounds P to e4m3 for an FP8 P @ V (the torch backend emulates it per row)."""
    return PREFILL_FP8_PV and prefill_fp8_qk(q_dtype, fp8_cache)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_seqlen_q: int,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    first_seq: int = 0,
) -> torch.Tensor:
    """Ragged causal attention: q [T, Hq, D] (sequences concatenated per cu_seqlens_q) -> [T, Hq, D].

    `max_seqlen_q` (a host int) only sizes the grid; tiles past a sequence's q_len exit at once.
    `first_seq` skips the first sequences (their rows of `out` are left as they are): a mixed step runs
    its decodes through flash-decoding and the rest here, on the same metadata tensors.
    """
    fp8 = _check_cache(q, k_cache, v_cache, k_scale, v_scale)
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    batch = seq_lens.shape[0]
    if cu_seqlens_q.shape[0] != batch + 1 or block_tables.shape[0] < batch:
        raise ValueError(
            f"cu_seqlens_q needs B+1 entries and block_tables B rows for B={batch} sequences, got "
            f"{tuple(cu_seqlens_q.shape)} and {tuple(block_tables.shape)}"
        )
    if not 0 <= first_seq <= batch:
        raise ValueError(f"first_seq must be in [0, {batch}], got {first_seq}")
    if out is None:
        out = torch.empty_like(q)
    if num_tokens == 0 or batch == first_seq or max_seqlen_q <= 0:
        return out

    fp8_qk = prefill_fp8_qk(q.dtype, fp8)
    block_m, block_n, num_warps, num_stages = _prefill_config(head_dim, group, q.is_cuda, fp8_qk)
    block_q = block_m // group
    dummy_scale = seq_lens  # pointer never dereferenced without FP8_KV
    tiles = cdiv(max_seqlen_q, block_q)
    heavy_first = PREFILL_HEAVY_FIRST and tiles <= 65535
    grid = (
        (num_kv_heads, batch - first_seq, tiles) if heavy_first else (tiles, batch - first_seq, num_kv_heads)
    )
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        cu_seqlens_q,
        seq_lens,
        block_tables,
        k_scale if fp8 else dummy_scale,
        v_scale if fp8 else dummy_scale,
        scale * _LOG2E,
        first_seq,
        q.stride(0),
        q.stride(1),
        *_cache_strides(k_cache, v_cache),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        HEAD_DIM=head_dim,
        PAGE_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        FP8_KV=fp8,
        DOT_PRECISION=_dot_precision(q),
        HEAVY_FIRST=heavy_first,
        FP8_QK=fp8_qk,
        ACT_FP16=q.dtype == torch.float16 or PREFILL_PV_FP16,
        FP8_PV=prefill_fp8_pv(q.dtype, fp8),  # (implies fp8_qk)
        num_warps=num_warps,
        num_stages=num_stages,
        **pdl_kwargs(q.device, num_tokens),
    )
    return out


# --------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_seqlen_q: int,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    decode_only: bool = False,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
    quant_out: bool = False,
    new_kv: NewTokenKV | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of the step's queries over the paged cache (see the module docstring).

    decode_only: every sequence has one query, q is [B, Hq, D] and the split-K decode kernel runs
    (`num_splits`, `max_seqlen_k`, `quant_out`, `new_kv` go to it); otherwise the ragged prefill kernel runs.
    """
    if decode_only:
        return paged_decode_attention(
            q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale,
            num_splits=num_splits, out=out, max_seqlen_k=max_seqlen_k, quant_out=quant_out, new_kv=new_kv,
        )  # fmt: skip
    if quant_out or new_kv is not None:
        raise ValueError("quant_out and new_kv are for decode steps only")
    return paged_prefill_attention(
        q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, max_seqlen_q, scale, k_scale, v_scale,
        out=out,
    )  # fmt: skip


__all__ = [
    "NewTokenKV",
    "choose_num_splits",
    "compile_decode_variants",
    "paged_attention",
    "paged_decode_attention",
    "paged_prefill_attention",
    "ref_paged_attention",
]
