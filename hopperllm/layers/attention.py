"""Attention over the paged KV cache, behind one backend interface.

A step's new tokens from every sequence form one flat batch (docs/interfaces.md). The layer first
rotates q/k and writes k/v into the cache at `slot_mapping`, then attends over the cache. Backends:
`TorchAttentionBackend` (plain torch, any device: the reference and the CPU path) and
`TritonAttentionBackend` (fused rotary + cache write, flash-decoding and varlen prefill kernels).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hopperllm.layers.rotary import apply_rotary_native

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0


@dataclass
class AttentionMetadata:
    cu_seqlens_q: torch.Tensor  # int32 [B+1]
    seq_lens: torch.Tensor  # int32 [B], context after this step
    slot_mapping: torch.Tensor  # int64 [T]
    block_tables: torch.Tensor  # int32 [B, max_blocks]
    max_seqlen_q: int
    max_seqlen_k: int
    decode_only: bool
    # host copies, for backends that loop over sequences (never read on the GPU fast path)
    query_lens_cpu: list[int] | None = None
    seq_lens_cpu: list[int] | None = None
    num_splits: int | None = None  # flash-decoding splits fixed by the runner (CUDA graphs)
    # Leading sequences with one query each (decodes, which the scheduler puts first): a mixed step
    # sends them to the flash-decoding kernel and only the rest to the prefill kernel.
    num_decodes: int = 0
    # Steps of a few rows a sequence (speculative verify steps, in their CUDA graphs: RowGraphRunner), every
    # row laid out as a one-query sequence: its causal context length [T] (= seq_lens) and its sequence's
    # block table (block_tables' row). Set, attention runs every row through flash-decoding after the cache
    # write (the prefill kernel would walk the whole context with one tile of a few rows per KV head).
    row_seq_lens: torch.Tensor | None = None
    # with row_seq_lens: the rows as groups of consecutive rows, a sequence's (int32 [G + 1] boundaries, at most
    # row_group_max rows a group): flash-decoding then reads a group's keys once for all its rows
    row_groups: torch.Tensor | None = None
    row_group_max: int = 1

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


class AttentionBackend:
    name = "base"

    def forward(
        self,
        layer: Attention,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        quant_out: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attention output [T, Hq, D]; with `quant_out` a backend may instead return it quantized per
        token for an FP8 o_proj, (e4m3 [T, Hq * D], float32 scale [T, 1]), when it can do so in the same
        kernel (the Triton backend in decode steps); otherwise it returns the activations."""
        raise NotImplementedError


def write_kv_native(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
) -> None:
    """Store k/v [T, Hkv, D] at their slots; FP8 caches store x / scale, saturated."""
    _, nb, bs, hkv, d = kv_cache.shape
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        slot_mapping, k, v = slot_mapping[valid], k[valid], v[valid]
    k_flat = kv_cache[0].view(nb * bs, hkv, d)
    v_flat = kv_cache[1].view(nb * bs, hkv, d)
    if kv_cache.dtype == FP8_DTYPE:
        k = (k.float() / k_scale).clamp(-FP8_MAX, FP8_MAX)
        v = (v.float() / v_scale).clamp(-FP8_MAX, FP8_MAX)
    k, v = k.to(kv_cache.dtype), v.to(kv_cache.dtype)
    if kv_cache.dtype == FP8_DTYPE:  # index_copy_ has no fp8 kernel on CPU: copy the bytes
        k_flat, v_flat, k, v = (t.view(torch.uint8) for t in (k_flat, v_flat, k, v))
    k_flat.index_copy_(0, slot_mapping, k)
    v_flat.index_copy_(0, slot_mapping, v)


def paged_attention_native(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its cached keys (loops over sequences)."""
    _, nb, bs, hkv, d = kv_cache.shape
    hq = q.shape[1]
    out = torch.empty_like(q)
    q_lens = meta.query_lens_cpu
    seq_lens = meta.seq_lens_cpu
    if q_lens is None or seq_lens is None:
        cu = meta.cu_seqlens_q.tolist()
        q_lens = [cu[i + 1] - cu[i] for i in range(len(cu) - 1)]
        seq_lens = meta.seq_lens.tolist()
    k_flat = kv_cache[0].view(nb * bs, hkv, d)
    v_flat = kv_cache[1].view(nb * bs, hkv, d)
    # the Triton prefill kernel's FP8 QK^T: every sequence it gets (all of a step without decodes, those after
    # the leading decodes of a mixed step) has its q rounded per row to e4m3
    fp8_qk = fp8_pv = False
    if kv_cache.dtype == FP8_DTYPE and not meta.decode_only:
        from hopperllm.kernels.fp8 import ref_per_token_quant_fp8
        from hopperllm.kernels.paged_attention import fp8_pv_softmax_matmul, prefill_fp8_pv, prefill_fp8_qk

        fp8_qk = prefill_fp8_qk(q.dtype, True)
        fp8_pv = prefill_fp8_pv(q.dtype, True)  # and its FP8 P @ V
    start = 0
    for b, (ql, sl) in enumerate(zip(q_lens, seq_lens, strict=True)):
        nblk = -(-sl // bs)
        blocks = meta.block_tables[b, :nblk].long()
        # token slots of this sequence, in order: block_id * bs + offset
        slots = (blocks[:, None] * bs + torch.arange(bs, device=q.device)[None, :]).reshape(-1)[:sl]
        k = k_flat.index_select(0, slots)
        v = v_flat.index_select(0, slots)
        if kv_cache.dtype == FP8_DTYPE:
            k = (k.float() * k_scale).to(q.dtype)
            v = (v.float() * v_scale).to(q.dtype)
        qb = q[start : start + ql]
        if fp8_qk and b >= meta.num_decodes:
            q8, q_scale = ref_per_token_quant_fp8(qb)
            qb = (q8.float() * q_scale).to(q.dtype)
        mask = None
        if ql > 1:
            # query i sits at position sl - ql + i and sees keys 0 .. sl - ql + i
            qpos = torch.arange(sl - ql, sl, device=q.device)
            mask = torch.arange(sl, device=q.device)[None, :] <= qpos[:, None]
        if fp8_pv and b >= meta.num_decodes:
            scores = torch.einsum("qhd,khd->hqk", qb.float(), k.float().repeat_interleave(hq // hkv, dim=1))
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            v_rep = v.float().repeat_interleave(hq // hkv, dim=1).transpose(0, 1)  # [Hq, L, D]
            out[start : start + ql] = fp8_pv_softmax_matmul(scores * scale, v_rep).transpose(0, 1).to(q.dtype)
            start += ql
            continue
        o = F.scaled_dot_product_attention(
            qb.transpose(0, 1),
            k.transpose(0, 1),
            v.transpose(0, 1),
            attn_mask=mask,
            scale=scale,
            enable_gqa=hq != hkv,
        )
        out[start : start + ql] = o.transpose(0, 1)
        start += ql
    return out


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def forward(self, layer, positions, q, k, v, kv_cache, meta, quant_out=False):
        q = apply_rotary_native(q, positions, layer.cos_sin_cache)
        k = apply_rotary_native(k, positions, layer.cos_sin_cache)
        write_kv_native(k, v, kv_cache, meta.slot_mapping, layer.k_scale, layer.v_scale)
        return paged_attention_native(q, kv_cache, meta, layer.scale, layer.k_scale, layer.v_scale)


class TritonAttentionBackend(AttentionBackend):
    """Decode-only steps: one flash-decoding launch that also does the rotary embedding and the cache
    write. Other steps: fused rotary + cache write, then varlen prefill (and flash-decoding for a mixed
    step's decodes)."""

    name = "triton"
    # Rotary + cache write inside the decode-attention launch, for layers without grouped KV heads: on the
    # H100 (ab-rot in benchmarks/device_run.sh, decode graph replay) Llama-2-7B went 3.511 -> 3.497 ms a
    # step with it, but Llama-2-70B (8 query heads per KV head) 25.861 -> 25.920 ms, so GQA layers keep
    # the separate rotary_kv_write. "all" / "none" fuse everywhere / nowhere (benchmarks/ab_decode.py, tests;
    # HOPPERLLM_DECODE_ROTARY=all|mha|none for A/B runs of whole benchmarks, e.g. tensor parallel ones,
    # since the decode launch changed: v15's 32 slices of 32-key tiles at the 70B's heads).
    fuse_decode_rotary = os.environ.get("HOPPERLLM_DECODE_ROTARY", "mha")

    def fuses_decode_rotary(self, layer) -> bool:
        """Whether decode-only steps of `layer` rotate and store the new token inside the attention launch."""
        mode = self.fuse_decode_rotary
        return mode == "all" or (mode == "mha" and layer.num_heads == layer.num_kv_heads)

    def forward(self, layer, positions, q, k, v, kv_cache, meta, quant_out=False):
        from hopperllm.kernels.paged_attention import NewTokenKV, paged_attention
        from hopperllm.kernels.rotary import rotary_kv_write

        new_kv = None
        if meta.decode_only and q.shape[0] == meta.num_seqs and self.fuses_decode_rotary(layer):
            new_kv = NewTokenKV(k, v, positions, layer.cos_sin_cache, meta.slot_mapping)
        else:
            rotary_kv_write(
                q,
                k,
                v,
                positions,
                layer.cos_sin_cache,
                kv_cache,
                meta.slot_mapping,
                layer.k_scale,
                layer.v_scale,
            )
        if meta.row_seq_lens is not None:
            from hopperllm.kernels.paged_attention import paged_decode_attention

            return paged_decode_attention(
                q, kv_cache[0], kv_cache[1], meta.block_tables, meta.row_seq_lens, layer.scale, layer.k_scale,
                layer.v_scale, max_seqlen_k=meta.max_seqlen_k, quant_out=quant_out, row_groups=meta.row_groups,
                max_rows=meta.row_group_max,
            )  # fmt: skip
        if not meta.decode_only and meta.num_decodes:
            return self._mixed(layer, q, kv_cache, meta)
        return paged_attention(
            q,
            kv_cache[0],
            kv_cache[1],
            meta.cu_seqlens_q,
            meta.seq_lens,
            meta.block_tables,
            meta.max_seqlen_q,
            layer.scale,
            layer.k_scale,
            layer.v_scale,
            decode_only=meta.decode_only,
            num_splits=meta.num_splits,
            quant_out=quant_out and meta.decode_only,
            new_kv=new_kv,
        )

    @staticmethod
    def _mixed(layer, q, kv_cache, meta):
        """Decodes and prefills in one step: the first `num_decodes` sequences (one query each) through
        flash-decoding, the others through the prefill kernel. The prefill kernel run over one-query
        sequences would spend a whole BLOCK_M-row tile of MMAs per kv head on one row and walk the
        context in one program; at 256 decodes of 2k context that is most of a mixed step's attention."""
        from hopperllm.kernels.paged_attention import paged_decode_attention, paged_prefill_attention

        nd = meta.num_decodes
        out = torch.empty_like(q)
        paged_decode_attention(
            q[:nd], kv_cache[0], kv_cache[1], meta.block_tables[:nd], meta.seq_lens[:nd], layer.scale,
            layer.k_scale, layer.v_scale, out=out[:nd], max_seqlen_k=meta.max_seqlen_k,
        )  # fmt: skip
        paged_prefill_attention(
            q, kv_cache[0], kv_cache[1], meta.cu_seqlens_q, meta.seq_lens, meta.block_tables,
            meta.max_seqlen_q, layer.scale, layer.k_scale, layer.v_scale, out=out, first_seq=nd,
        )  # fmt: skip
        return out


def get_attention_backend(name: str) -> AttentionBackend:
    if name == "torch":
        return TorchAttentionBackend()
    if name == "triton":
        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}: use torch or triton")


class Attention(nn.Module):
    """Rotary + KV-cache write + paged attention for one layer. Holds the per-layer FP8 KV scales."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, cos_sin_cache: torch.Tensor):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.register_buffer("cos_sin_cache", cos_sin_cache, persistent=False)
        self.k_scale = nn.Parameter(torch.ones(1, dtype=torch.float32), requires_grad=False)
        self.v_scale = nn.Parameter(torch.ones(1, dtype=torch.float32), requires_grad=False)
        self.backend: AttentionBackend = TorchAttentionBackend()

    def forward(
        self, positions, q, k, v, kv_cache, meta: AttentionMetadata, quant_out: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """[T, Hq * D] activations, or with `quant_out` possibly their per-token FP8 (out, scale) pair
        (see AttentionBackend.forward): either is a valid input of an FP8 o_proj."""
        t = q.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        out = self.backend.forward(self, positions, q, k, v, kv_cache, meta, quant_out=quant_out)
        if isinstance(out, tuple):
            return out
        return out.reshape(t, self.num_heads * self.head_dim)
