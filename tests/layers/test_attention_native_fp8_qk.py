"""The torch attention backend emulates the Triton prefill kernel's FP8 QK^T (PREFILL_FP8_QK, the default with
an FP8 cache and a 16-bit model): the queries of every sequence the prefill kernel would get are rounded per
(token, head) row to e4m3 before attention; the leading decodes of a mixed step and decode-only steps keep
their 16-bit q, as flash-decoding does."""

from __future__ import annotations

import pytest
import torch

from hopperllm.kernels import paged_attention as pa
from hopperllm.kernels.fp8 import ref_per_token_quant_fp8
from hopperllm.layers.attention import AttentionMetadata, paged_attention_native

Q_LENS, SEQ_LENS = [1, 7, 12], [9, 7, 30]  # one decode first, then a prefill and a chunk after a prefix


def _case(decode_only=False, num_decodes=1):
    g = torch.Generator().manual_seed(0)
    nb, bs, hkv, hq, d = 8, 8, 2, 4, 32
    kv = (torch.randn(2, nb, bs, hkv, d, generator=g) * 0.5).to(torch.float8_e4m3fn)
    q = torch.randn(sum(Q_LENS), hq, d, generator=g).to(torch.float16)
    tables = torch.arange(nb * 3, dtype=torch.int32).reshape(3, nb) % nb
    cu = torch.tensor([0, 1, 8, 20], dtype=torch.int32)
    meta = AttentionMetadata(
        cu_seqlens_q=cu, seq_lens=torch.tensor(SEQ_LENS, dtype=torch.int32), slot_mapping=torch.zeros(0),
        block_tables=tables, max_seqlen_q=max(Q_LENS), max_seqlen_k=max(SEQ_LENS), decode_only=decode_only,
        query_lens_cpu=Q_LENS, seq_lens_cpu=SEQ_LENS, num_decodes=num_decodes,
    )  # fmt: skip
    return q, kv, meta


@pytest.mark.parametrize("num_decodes", [0, 1])
def test_prefill_queries_rounded_to_e4m3_like_the_kernel(num_decodes, monkeypatch):
    q, kv, meta = _case(num_decodes=num_decodes)
    one = torch.ones(())
    monkeypatch.setattr(pa, "PREFILL_FP8_QK", True)
    out = paged_attention_native(q, kv, meta, 0.2, one, one)
    q8, scale = ref_per_token_quant_fp8(q)
    q_rounded = (q8.float() * scale).to(q.dtype)
    q_rounded[:num_decodes] = q[:num_decodes]  # a mixed step's leading decodes keep their q
    monkeypatch.setattr(pa, "PREFILL_FP8_QK", False)
    assert torch.equal(out, paged_attention_native(q_rounded, kv, meta, 0.2, one, one))
    assert not torch.equal(out, paged_attention_native(q, kv, meta, 0.2, one, one))


def test_decode_only_steps_keep_16_bit_queries(monkeypatch):
    q, kv, meta = _case(decode_only=True)
    one = torch.ones(())
    monkeypatch.setattr(pa, "PREFILL_FP8_QK", True)
    out = paged_attention_native(q, kv, meta, 0.2, one, one)
    monkeypatch.setattr(pa, "PREFILL_FP8_QK", False)
    assert torch.equal(out, paged_attention_native(q, kv, meta, 0.2, one, one))


def test_fp8_pv_emulated_for_prefill_rows_only(monkeypatch):
    # HOPPERLLM_PREFILL_FP8_PV=1: the backend also rounds P (relative to each row's max) to e4m3, as
    # ref_paged_attention(fp8_pv=True) does; a mixed step's leading decode keeps the exact softmax.
    q, kv, meta = _case(num_decodes=1)
    one = torch.ones(())
    monkeypatch.setattr(pa, "PREFILL_FP8_QK", True)
    plain = paged_attention_native(q, kv, meta, 0.2, one, one)
    monkeypatch.setattr(pa, "PREFILL_FP8_PV", True)
    out = paged_attention_native(q, kv, meta, 0.2, one, one)
    assert torch.equal(out[:1], plain[:1])
    assert not torch.equal(out[1:], plain[1:])
    q8, scale = ref_per_token_quant_fp8(q)
    q_rounded = (q8.float() * scale).to(q.dtype)
    cu, lens, tables = meta.cu_seqlens_q, meta.seq_lens, meta.block_tables
    ref = pa.ref_paged_attention(q_rounded, kv[0], kv[1], cu, lens, tables, 0.2, one, one, fp8_pv=True)
    torch.testing.assert_close(out[1:].float(), ref[1:].float(), rtol=0, atol=2e-3)
