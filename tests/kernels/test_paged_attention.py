"""Paged attention kernels vs `ref_paged_attention` on small random problems.

Without CUDA the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py
before triton is imported: `triton.jit` reads it when it decorates). With CUDA the same tests run compiled on the GPU.
The interpreter's tl.dot is wrong for bfloat16 (Triton 3.9), so CPU tests use float32 / float16; the GPU
tests (tests/gpu/test_gpu_attention.py) cover bfloat16.
"""

import os

import pytest
import torch
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from hopperllm.kernels import paged_attention as pa
from hopperllm.kernels.fp8 import ref_per_token_quant_fp8

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

FP8 = torch.float8_e4m3fn
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


def make_paged_case(
    q_lens: list[int],
    seq_lens: list[int],
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int = 0,
):
    """Random q, a shuffled paged cache holding each sequence's keys, and the metadata.

    Cache slots no sequence owns (unused blocks, the tail of each last block) hold NaN, so a kernel that
    reads past a sequence's length without masking the load produces NaN.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    max_blocks = max(blocks_per_seq) + 1  # a spare column, 0-filled like the model runner's
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    kv_cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"))
    used = 0
    for b, (n, nb) in enumerate(zip(seq_lens, blocks_per_seq, strict=True)):
        ids = perm[used : used + nb]
        used += nb
        block_tables[b, :nb] = ids
        keys = torch.randn(2, nb * block_size, num_kv_heads, head_dim, generator=gen)
        keys[:, n:] = float("nan")
        kv_cache[:, ids.long()] = keys.reshape(2, nb, block_size, num_kv_heads, head_dim)
    cu_seqlens_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(q_lens), num_q_heads, head_dim, generator=gen)
    return (
        q.to(dtype).to(DEVICE),
        kv_cache.to(dtype).to(DEVICE),
        cu_seqlens_q.to(DEVICE),
        torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables.to(DEVICE),
    )


def quantize_fp8(kv_cache: torch.Tensor, k_amax: float, v_amax: float):
    """Per-tensor FP8 e4m3 (stores x / scale, saturated to +-448) as the cache writer does."""
    k_scale = torch.tensor([k_amax / 448.0], dtype=torch.float32, device=kv_cache.device)
    v_scale = torch.tensor([v_amax / 448.0], dtype=torch.float32, device=kv_cache.device)
    k = (kv_cache[0].float() / k_scale).clamp(-448, 448)
    v = (kv_cache[1].float() / v_scale).clamp(-448, 448)
    return torch.stack([k, v]).to(FP8), k_scale, v_scale


def poisoned_like(q: torch.Tensor) -> torch.Tensor:
    return torch.full_like(q, float("nan"))


def test_interpreter_active_without_cuda():
    if DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1"
        assert isinstance(pa._decode_split_kernel, InterpretedFunction)
        assert isinstance(pa._prefill_kernel, InterpretedFunction)
        assert isinstance(tl.sum, InterpretedFunction)


# Ragged batch: full prefill, chunked prefill / prefix hit (q_len < seq_len), a decode row inside a mixed
# batch, a prompt spanning several query tiles, and chunks whose diagonal starts just before / at a key-tile
# boundary (16 keys per tile in the interpreter); lengths not multiples of the block size.
PREFILL_Q_LENS = [7, 5, 1, 19, 3, 2]
PREFILL_SEQ_LENS = [7, 29, 18, 19, 17, 18]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 2), (2, 2)])
@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("heavy_first", [True, False])
def test_prefill_matches_reference(dtype, num_q_heads, num_kv_heads, block_size, heavy_first, monkeypatch):
    monkeypatch.setattr(pa, "PREFILL_HEAVY_FIRST", heavy_first)  # both grid orders cover every tile
    q, kv, cu, seq_lens, bt = make_paged_case(
        PREFILL_Q_LENS, PREFILL_SEQ_LENS, num_q_heads, num_kv_heads, 32, block_size, dtype
    )
    scale = 32**-0.5
    out = pa.paged_prefill_attention(
        q, kv[0], kv[1], cu, seq_lens, bt, max(PREFILL_Q_LENS), scale, out=poisoned_like(q)
    )
    ref = pa.ref_paged_attention(q, kv[0], kv[1], cu, seq_lens, bt, scale)
    assert torch.isfinite(out).all(), "some outputs were not written (or read unmasked NaN slots)"
    assert rel_err(out, ref) < TOL[dtype]


def test_prefill_large_group_and_head_dim_64():
    # GROUP=8 folds 8 heads into each tile's rows (2 queries per 16-row tile in the interpreter).
    q, kv, cu, seq_lens, bt = make_paged_case([3, 6], [10, 6], 8, 1, 64, 16, torch.float32, seed=1)
    out = pa.paged_prefill_attention(q, kv[0], kv[1], cu, seq_lens, bt, 6, 0.125, out=poisoned_like(q))
    ref = pa.ref_paged_attention(q, kv[0], kv[1], cu, seq_lens, bt, 0.125)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-4


def test_prefill_skips_empty_sequences():
    # A sequence with q_len == 0 (nothing scheduled for it this step) is legal in the flat batch.
    q, kv, cu, seq_lens, bt = make_paged_case([4, 0, 3], [9, 5, 3], 4, 2, 32, 8, torch.float32, seed=2)
    out = pa.paged_prefill_attention(q, kv[0], kv[1], cu, seq_lens, bt, 4, 0.2, out=poisoned_like(q))
    ref = pa.ref_paged_attention(q, kv[0], kv[1], cu, seq_lens, bt, 0.2)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-4


DECODE_SEQ_LENS = [1, 17, 40, 33]


@pytest.fixture(params=[False, True], ids=["plain", "prefetch"])
def decode_variant(request, monkeypatch):
    """The decode key loop's variants: the next tile prefetched or not."""
    for cfg in (pa.CPU_DECODE_CONFIG, *pa.DECODE_CONFIGS):
        monkeypatch.setitem(cfg, "PREFETCH", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 2), (2, 2)])
@pytest.mark.parametrize("num_splits", [1, 3, None])
def test_decode_matches_reference(dtype, num_q_heads, num_kv_heads, num_splits, decode_variant):
    batch = len(DECODE_SEQ_LENS)
    q, kv, cu, seq_lens, bt = make_paged_case(
        [1] * batch, DECODE_SEQ_LENS, num_q_heads, num_kv_heads, 32, 8, dtype
    )
    scale = 32**-0.5
    out = pa.paged_decode_attention(
        q, kv[0], kv[1], bt, seq_lens, scale, num_splits=num_splits, out=poisoned_like(q)
    )
    ref = pa.ref_paged_attention(q, kv[0], kv[1], cu, seq_lens, bt, scale)
    assert torch.isfinite(out).all(), "some outputs were not written (or read unmasked NaN slots)"
    assert rel_err(out, ref) < TOL[dtype]


def test_decode_large_group_more_splits_than_tiles(decode_variant):
    # 5 splits over contexts of 1..3 tiles: most slices are empty and must weigh zero in the merge.
    seq_lens = [3, 20, 47]
    q, kv, cu, sl, bt = make_paged_case([1] * 3, seq_lens, 8, 1, 64, 16, torch.float32, seed=3)
    out = pa.paged_decode_attention(q, kv[0], kv[1], bt, sl, 0.125, num_splits=5, out=poisoned_like(q))
    ref = pa.ref_paged_attention(q, kv[0], kv[1], cu, sl, bt, 0.125)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 2, 3])
def test_decode_quant_out_equals_separate_quantize(dtype, num_splits):
    """quant_out: the same launch merges the slices and quantizes each output row per token, bit for bit
    what per_token_quant_fp8 gives on the unquantized output; the arrival counters are re-armed."""
    from hopperllm.kernels import fp8

    seq_lens_ = DECODE_SEQ_LENS + [0]  # a zero-length (graph padding) row too
    q, kv, cu, seq_lens, bt = make_paged_case([1] * len(seq_lens_), [max(n, 1) for n in seq_lens_], 8, 2,
                                              32, 8, dtype, seed=7)  # fmt: skip
    seq_lens[-1] = 0
    out = pa.paged_decode_attention(q, kv[0], kv[1], bt, seq_lens, 0.2, num_splits=num_splits)
    q8, scale = pa.paged_decode_attention(q, kv[0], kv[1], bt, seq_lens, 0.2, num_splits=num_splits,
                                          quant_out=True)  # fmt: skip
    ref_q8, ref_scale = fp8.ref_per_token_quant_fp8(out.reshape(out.shape[0], -1))
    assert torch.equal(scale, ref_scale)
    assert torch.equal(q8.view(torch.uint8), ref_q8.view(torch.uint8))
    assert not fp8._counters[(q.device, "decode_attention")].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fp8_kv", [False, True])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_new_kv_equals_rotary_kv_write_then_decode(dtype, fp8_kv, num_splits, decode_variant):
    """new_kv: the decode launch rotates q, stores the step's rotated k and v at their slots (FP8 with the
    cache's scales) and attends over them: what rotary_kv_write followed by the plain decode gives. The
    new token's slot is poisoned first; a padding row (seq_len 0, slot -1) stores nothing."""
    from hopperllm.kernels.rotary import build_cos_sin_cache, rotary_kv_write

    seq_lens_ = [*DECODE_SEQ_LENS, 0]
    hq, hkv, d, bs = 8, 2, 32, 8
    q, kv, cu, seq_lens, bt = make_paged_case([1] * len(seq_lens_), [max(n, 1) for n in seq_lens_], hq, hkv,
                                              d, bs, dtype, seed=11)  # fmt: skip
    seq_lens[-1] = 0
    k_scale = v_scale = None
    if fp8_kv:
        kv, k_scale, v_scale = quantize_fp8(kv, k_amax=4.0, v_amax=3.0)
    gen = torch.Generator().manual_seed(12)
    qkv = torch.randn(len(seq_lens_), (hq + 2 * hkv) * d, generator=gen).to(dtype).to(DEVICE)
    k_new = qkv[:, hq * d : (hq + hkv) * d].view(-1, hkv, d)  # strided views, as the layer passes them
    v_new = qkv[:, (hq + hkv) * d :].view(-1, hkv, d)
    positions = (seq_lens.long() - 1).clamp(min=0)
    slots = torch.tensor(
        [int(bt[b, (n - 1) // bs]) * bs + (n - 1) % bs if n else -1 for b, n in enumerate(seq_lens_)],
        dtype=torch.int64, device=DEVICE,
    )  # fmt: skip
    for slot in slots[:-1].tolist():  # poison the new token's cache row
        kv.view(torch.uint8)[:, slot // bs, slot % bs] = 0x7F  # NaN in e4m3 and fp16, 3.4e38 in fp32
    cos_sin = build_cos_sin_cache(d, 64, 10000.0).to(DEVICE)
    kv_ref, q_ref = kv.clone(), q.clone()
    rotary_kv_write(q_ref, k_new, v_new, positions, cos_sin, kv_ref, slots, k_scale, v_scale)
    ref = pa.paged_decode_attention(q_ref, kv_ref[0], kv_ref[1], bt, seq_lens, 0.2, k_scale, v_scale,
                                    num_splits=num_splits)  # fmt: skip
    q_before = q.clone()
    new_kv = pa.NewTokenKV(k_new, v_new, positions, cos_sin, slots)
    out = pa.paged_decode_attention(q, kv[0], kv[1], bt, seq_lens, 0.2, k_scale, v_scale,
                                    num_splits=num_splits, out=poisoned_like(q), new_kv=new_kv)  # fmt: skip
    assert torch.equal(q, q_before)  # q is rotated in registers only
    if DEVICE == "cpu":  # the interpreter computes both in the same float32 order: the same bits
        assert torch.equal(kv.view(torch.uint8), kv_ref.view(torch.uint8))
        assert torch.equal(out, ref)
    else:  # compiled, the two kernels may contract multiply-adds differently: a last-bit difference
        torch.testing.assert_close(kv.float(), kv_ref.float(), rtol=2**-3 if fp8_kv else 2**-8, atol=1e-3,
                                   equal_nan=True)  # fmt: skip
        assert rel_err(out, ref) < TOL[dtype]
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))


def test_decode_new_kv_rejects_bad_shapes():
    q, kv, cu, seq_lens, bt = make_paged_case([1, 1], [5, 9], 4, 2, 32, 8, torch.float32, seed=13)
    k = torch.zeros(2, 2, 32, device=DEVICE)
    pos = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    cos_sin = torch.zeros(16, 32, device=DEVICE)
    with pytest.raises(ValueError, match="new_kv k and v"):
        pa.paged_decode_attention(q, kv[0], kv[1], bt, seq_lens, 0.2,
                                  new_kv=pa.NewTokenKV(k[:, :1], k[:, :1], pos, cos_sin, pos))  # fmt: skip
    with pytest.raises(ValueError, match="cos_sin_cache"):
        pa.paged_decode_attention(q, kv[0], kv[1], bt, seq_lens, 0.2,
                                  new_kv=pa.NewTokenKV(k, k, pos, cos_sin[:, :16], pos))  # fmt: skip
    with pytest.raises(ValueError, match="decode steps only"):
        pa.paged_attention(
            q, kv[0], kv[1], cu, seq_lens, bt, 1, 0.2, new_kv=pa.NewTokenKV(k, k, pos, cos_sin, pos)
        )


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_zero_length_padding_rows_give_zeros(num_splits, decode_variant):
    # CUDA-graph padding rows carry seq_len 0: they must come out finite (zeros), not NaN.
    q, kv, cu, seq_lens, bt = make_paged_case([1, 1], [12, 1], 4, 2, 32, 8, torch.float32, seed=4)
    seq_lens[1] = 0
    out = pa.paged_decode_attention(
        q, kv[0], kv[1], bt, seq_lens, 0.2, num_splits=num_splits, out=poisoned_like(q)
    )
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    ref = pa.ref_paged_attention(q[:1], kv[0], kv[1], cu[:2], seq_lens[:1], bt[:1], 0.2)
    assert rel_err(out[:1], ref) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp8_kv_decode_and_prefill(dtype, monkeypatch):
    monkeypatch.setattr(pa, "PREFILL_FP8_QK", False)  # 16-bit QK^T here; the FP8 one has its own test below
    q, kv, cu, seq_lens, bt = make_paged_case(PREFILL_Q_LENS, PREFILL_SEQ_LENS, 4, 2, 32, 8, dtype, seed=5)
    kv8, k_scale, v_scale = quantize_fp8(kv, k_amax=4.0, v_amax=3.0)
    scale = 32**-0.5
    k8, v8 = kv8[0], kv8[1]
    max_q = max(PREFILL_Q_LENS)
    out = pa.paged_prefill_attention(
        q, k8, v8, cu, seq_lens, bt, max_q, scale, k_scale, v_scale, out=poisoned_like(q)
    )
    ref = pa.ref_paged_attention(q, kv8[0], kv8[1], cu, seq_lens, bt, scale, k_scale, v_scale)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype]
    # Quantization itself stays close to the unquantized attention.
    assert rel_err(ref, pa.ref_paged_attention(q, kv[0], kv[1], cu, seq_lens, bt, scale)) < 0.1

    qd = q[cu[1:].long() - 1].contiguous()  # last query of each sequence: a decode step
    cud = torch.arange(len(PREFILL_SEQ_LENS) + 1, dtype=torch.int32, device=DEVICE)
    out = pa.paged_decode_attention(
        qd, kv8[0], kv8[1], bt, seq_lens, scale, k_scale, v_scale, num_splits=3, out=poisoned_like(qd)
    )
    ref = pa.ref_paged_attention(qd, kv8[0], kv8[1], cud, seq_lens, bt, scale, k_scale, v_scale)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16] if DEVICE == "cuda" else [torch.float16])
def test_prefill_fp8_qk_equals_attention_over_quantized_q(dtype, monkeypatch):
    # PREFILL_FP8_QK (the default with an FP8 cache): q quantized per row, QK^T on FP8 operands, P @ V in 16
    # bits. It must equal the reference run on the dequantized q (to 16-bit rounding of P), and stay near
    # the unquantized q; HOPPERLLM_PREFILL_FP8_QK=0's 16-bit path stays as it was.
    q, kv, cu, seq_lens, bt = make_paged_case(PREFILL_Q_LENS, PREFILL_SEQ_LENS, 8, 2, 32, 8, dtype, seed=9)
    kv8, k_scale, v_scale = quantize_fp8(kv, k_amax=4.0, v_amax=3.0)
    args = (kv8[0], kv8[1], cu, seq_lens, bt)
    scale = 32**-0.5

    def prefill(fp8_qk: bool) -> torch.Tensor:
        monkeypatch.setattr(pa, "PREFILL_FP8_QK", fp8_qk)
        out = pa.paged_prefill_attention(
            q, *args, max(PREFILL_Q_LENS), scale, k_scale, v_scale, out=poisoned_like(q)
        )
        assert torch.isfinite(out).all()
        return out

    out = prefill(True)
    q8, q_scale = ref_per_token_quant_fp8(q)  # each (token, head) row, as the kernel quantizes it
    emulated = pa.ref_paged_attention((q8.float() * q_scale).to(dtype), *args, scale, k_scale, v_scale)
    assert rel_err(out, emulated) < TOL[dtype]
    plain = pa.ref_paged_attention(q, *args, scale, k_scale, v_scale)
    assert rel_err(out, plain) < 5e-2
    assert rel_err(prefill(False), plain) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16] if DEVICE == "cuda" else [torch.float16])
def test_prefill_fp8_pv_equals_emulation(dtype, monkeypatch):
    # HOPPERLLM_PREFILL_FP8_PV=1: P @ V on FP8 operands too (P * 256 rounded to e4m3 per tile, relative to
    # the running max). Near the emulation that rounds P relative to each row's final max (the two roundings
    # differ), and near the exact attention over the quantized q.
    q, kv, cu, seq_lens, bt = make_paged_case(PREFILL_Q_LENS, PREFILL_SEQ_LENS, 8, 2, 32, 8, dtype, seed=9)
    kv8, k_scale, v_scale = quantize_fp8(kv, k_amax=4.0, v_amax=3.0)
    args = (kv8[0], kv8[1], cu, seq_lens, bt)
    scale = 32**-0.5
    monkeypatch.setattr(pa, "PREFILL_FP8_QK", True)
    monkeypatch.setattr(pa, "PREFILL_FP8_PV", True)
    assert pa.prefill_fp8_pv(dtype, True) and not pa.prefill_fp8_pv(dtype, False)
    out = pa.paged_prefill_attention(
        q, *args, max(PREFILL_Q_LENS), scale, k_scale, v_scale, out=poisoned_like(q)
    )
    assert torch.isfinite(out).all()
    q8, q_scale = ref_per_token_quant_fp8(q)
    qe = (q8.float() * q_scale).to(dtype)
    emulated = pa.ref_paged_attention(qe, *args, scale, k_scale, v_scale, fp8_pv=True)
    exact = pa.ref_paged_attention(qe, *args, scale, k_scale, v_scale)
    # the emulation rounds P (1.3% from the exact attention here) and the kernel's rounding is that one:
    # 0.34% from it (the running max differs from the final one on a few rows)
    assert rel_err(emulated, exact) > 5e-3
    assert rel_err(out, emulated) < 6e-3
    assert rel_err(out, exact) < 3e-2
    monkeypatch.setattr(pa, "PREFILL_FP8_QK", False)  # FP8 P @ V only comes with the FP8 QK^T
    assert not pa.prefill_fp8_pv(dtype, True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("large_q", [False, True])
def test_decode_dot_fp16_with_fp8_cache(dtype, num_splits, large_q, monkeypatch):
    # HOPPERLLM_DECODE_DOT_FP16=1: the decode products in float16 with an FP8 cache, whatever the model's
    # 16-bit type: e4m3 K / V are exact in float16, P more precise than in bfloat16. A q over 2^15 (3e5 in
    # bfloat16, beyond float16's range; 6e4 in float16) is scaled by a power of two that the scores undo: no
    # inf, the same attention. (The interpreter's bfloat16 tl.dot is wrong, so the bfloat16 model is
    # testable here only this way.)
    q_gain = (3e5 if dtype == torch.bfloat16 else 6e4) if large_q else 1.0
    monkeypatch.setattr(pa, "DECODE_DOT_FP16", True)
    q, kv, cu, seq_lens, bt = make_paged_case([1] * 4, DECODE_SEQ_LENS, 8, 2, 32, 8, torch.float32, seed=21)
    q = (q * q_gain / q.abs().amax()).to(dtype)  # largest value q_gain
    kv8, k_scale, v_scale = quantize_fp8(kv, k_amax=4.0, v_amax=3.0)
    scale = 32**-0.5 / q_gain
    out = pa.paged_decode_attention(q, kv8[0], kv8[1], bt, seq_lens, scale, k_scale, v_scale,
                                    num_splits=num_splits, out=poisoned_like(q))  # fmt: skip
    ref = pa.ref_paged_attention(q, kv8[0], kv8[1], cu, seq_lens, bt, scale, k_scale, v_scale)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_pv_fp16_equals_attention_over_quantized_q(dtype, monkeypatch):
    # HOPPERLLM_PREFILL_PV_FP16=1: with the FP8 QK^T, P @ V in float16 for a bfloat16 model too (V exact from
    # e4m3): the same attention as over the dequantized q.
    monkeypatch.setattr(pa, "PREFILL_FP8_QK", True)
    monkeypatch.setattr(pa, "PREFILL_PV_FP16", True)
    q, kv, cu, seq_lens, bt = make_paged_case(PREFILL_Q_LENS, PREFILL_SEQ_LENS, 8, 2, 32, 8, dtype, seed=9)
    kv8, k_scale, v_scale = quantize_fp8(kv, k_amax=4.0, v_amax=3.0)
    args = (kv8[0], kv8[1], cu, seq_lens, bt)
    scale = 32**-0.5
    out = pa.paged_prefill_attention(
        q, *args, max(PREFILL_Q_LENS), scale, k_scale, v_scale, out=poisoned_like(q)
    )
    assert torch.isfinite(out).all()
    q8, q_scale = ref_per_token_quant_fp8(q)
    emulated = pa.ref_paged_attention((q8.float() * q_scale).to(dtype), *args, scale, k_scale, v_scale)
    assert rel_err(out, emulated) < TOL[dtype]


def test_entry_point_dispatch():
    q, kv, cu, seq_lens, bt = make_paged_case([2, 1], [9, 4], 4, 2, 32, 8, torch.float32, seed=6)
    ref = pa.ref_paged_attention(q, kv[0], kv[1], cu, seq_lens, bt, 0.3)
    out = pa.paged_attention(q, kv[0], kv[1], cu, seq_lens, bt, 2, 0.3)
    assert rel_err(out, ref) < 1e-4

    qd = q[cu[1:].long() - 1].contiguous()
    cud = torch.arange(3, dtype=torch.int32, device=DEVICE)
    ref = pa.ref_paged_attention(qd, kv[0], kv[1], cud, seq_lens, bt, 0.3)
    out = pa.paged_attention(qd, kv[0], kv[1], cud, seq_lens, bt, 1, 0.3, decode_only=True, num_splits=2)
    assert rel_err(out, ref) < 1e-4


def test_mixed_step_split_between_decode_and_prefill_kernels():
    """A mixed step's leading one-query sequences through flash-decoding and the rest through the prefill
    kernel with first_seq (same metadata tensors) give the reference for every row."""
    q_lens, seq_lens_ = [1, 1, 5, 3], [7, 20, 9, 3]
    q, kv, cu, seq_lens, bt = make_paged_case(q_lens, seq_lens_, 4, 2, 32, 8, torch.float32, seed=9)
    ref = pa.ref_paged_attention(q, kv[0], kv[1], cu, seq_lens, bt, 0.3)
    out = poisoned_like(q)
    pa.paged_decode_attention(q[:2], kv[0], kv[1], bt, seq_lens[:2], 0.3, num_splits=2, out=out[:2])
    pa.paged_prefill_attention(q, kv[0], kv[1], cu, seq_lens, bt, max(q_lens), 0.3, out=out, first_seq=2)
    assert rel_err(out, ref) < 1e-4
    with pytest.raises(ValueError, match="first_seq"):
        pa.paged_prefill_attention(q, kv[0], kv[1], cu, seq_lens, bt, 5, 0.3, first_seq=5)


@pytest.mark.parametrize("num_q_heads", [4, 8])
def test_one_sequences_rows_through_flash_decoding(num_q_heads):
    """A speculative verify step's rows (one sequence, n queries) as n decode rows of causal lengths
    seq_len - n + 1 .. seq_len over the sequence's block table, a copy a row or one row expanded (stride 0):
    the prefill reference for each row."""
    n, context = 5, 37
    q, kv, cu, seq_lens, bt = make_paged_case([n], [context], num_q_heads, 2, 32, 8, torch.float32, seed=4)
    ref = pa.ref_paged_attention(q, kv[0], kv[1], cu, seq_lens, bt, 0.3)
    row_lens = torch.arange(context - n + 1, context + 1, dtype=torch.int32, device=DEVICE)
    for tables in (bt[:1].expand(n, -1), bt[:1].repeat(n, 1)):
        out = pa.paged_decode_attention(q, kv[0], kv[1], tables, row_lens, 0.3, num_splits=2)
        assert rel_err(out, ref) < 1e-4


def _row_layout(
    rows_per_seq: list[int], contexts: list[int], padding: int, num_q_heads: int, dtype, seed: int
):
    """A verify step in the row layout: sequence i's rows_per_seq[i] queries as rows of causal lengths
    contexts[i] - n + 1 .. contexts[i] over its block table, then `padding` rows of one key (a graph's
    padding); the row groups (a group a sequence, one a padding row, then empty groups up to one a row)."""
    q, kv, cu, seq_lens, bt = make_paged_case(rows_per_seq, contexts, num_q_heads, 2, 32, 8, dtype, seed=seed)
    n_real = sum(rows_per_seq)
    lens, tables = [], []
    for i, (n, c) in enumerate(zip(rows_per_seq, contexts, strict=True)):
        lens += range(c - n + 1, c + 1)
        tables += [bt[i]] * n
    lens += [1] * padding
    tables += [bt[0]] * padding
    q = torch.cat(
        [q, torch.randn(padding, *q.shape[1:], generator=torch.Generator().manual_seed(seed)).to(q)]
    )
    groups = [0, *torch.tensor(rows_per_seq).cumsum(0).tolist()]
    groups += range(n_real + 1, n_real + padding + 1)
    total = n_real + padding
    groups += [total] * (total + 1 - len(groups))
    as_int = dict(dtype=torch.int32, device=DEVICE)
    return q, kv, torch.tensor(lens, **as_int), torch.stack(tables), torch.tensor(groups, **as_int)


@pytest.mark.parametrize(
    "dtype,num_q_heads,num_splits,fp8_kv",
    [
        (torch.float32, 2, 1, False),
        (torch.float32, 8, 3, False),
        (torch.float32, 8, 2, True),
        (torch.float32, 2, 3, True),
        (torch.float16, 8, 1, False),
        (torch.float16, 2, 2, True),
    ],
)
def test_row_groups_equal_one_call_a_row(dtype, num_q_heads, num_splits, fp8_kv):
    """A verify step's rows grouped by sequence (up to 5 rows a group: one program a group, kv head and slice
    over all its rows) give what a call a row gives, for sequences of 5, 2 and 1 rows, padding rows and the
    empty groups past them; with quant_out, bit for bit the per-token quantization of that output, and the
    arrival counters re-armed."""
    from hopperllm.kernels import fp8

    q, kv, lens, tables, groups = _row_layout([5, 2, 1], [37, 9, 20], 3, num_q_heads, dtype, seed=11)
    k_scale = v_scale = None
    if fp8_kv:
        kv, k_scale, v_scale = quantize_fp8(kv.float().nan_to_num(), 3.0, 3.0)
    args = (q, kv[0], kv[1], tables, lens, 0.3, k_scale, v_scale)
    one_a_row = pa.paged_decode_attention(*args, num_splits=num_splits)
    grouped = pa.paged_decode_attention(
        *args, num_splits=num_splits, out=poisoned_like(q), row_groups=groups, max_rows=5
    )
    assert torch.isfinite(grouped).all(), "some rows were not written"
    assert rel_err(grouped, one_a_row) < TOL[dtype]
    q8, scale = pa.paged_decode_attention(
        *args, num_splits=num_splits, quant_out=True, row_groups=groups, max_rows=5
    )
    ref_q8, ref_scale = fp8.ref_per_token_quant_fp8(grouped.reshape(grouped.shape[0], -1))
    assert torch.equal(scale, ref_scale)
    assert torch.equal(q8.view(torch.uint8), ref_q8.view(torch.uint8))
    assert not fp8._counters[(q.device, "decode_attention")].any()


def test_row_groups_reject_new_kv():
    q, kv, lens, tables, groups = _row_layout([2], [9], 0, 2, torch.float32, seed=1)
    new_kv = pa.NewTokenKV(q[:, :2], q[:, :2], lens.long(), torch.zeros(64, 32), lens.long())
    with pytest.raises(ValueError, match="row groups"):
        pa.paged_decode_attention(
            q, kv[0], kv[1], tables, lens, 0.3, row_groups=groups, max_rows=2, new_kv=new_kv
        )


def _warm_up_cache(fp8_kv: bool, seed: int, num_kv_heads: int = 2, head_dim: int = 32):
    """A 3-block cache (block size 8) as start-up's compile launches read it, and its scales."""
    gen = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, 3, 8, num_kv_heads, head_dim, generator=gen).to(DEVICE)
    if not fp8_kv:
        return cache, None, None
    return quantize_fp8(cache, 4.0, 4.0)


@pytest.mark.parametrize("fp8_kv", [False, True])
def test_compile_decode_variants_attends_to_the_one_key(fp8_kv):
    # What start-up runs to compile the mixed steps' flash-decoding variants: one key in block 0, slot 0,
    # every split count up to 32 (all but the first slice empty); each query head gets its KV head's value.
    num_kv_heads, group = 2, 4
    cache, k_scale, v_scale = _warm_up_cache(fp8_kv, seed=5)
    splits = [1, 2, 4, 8, 16, 32]
    out = pa.compile_decode_variants(
        num_kv_heads * group, cache[0], cache[1], k_scale, v_scale, 0.1, torch.float32, 4, splits
    )
    v = cache[1, 0, 0].float() * (v_scale if fp8_kv else 1.0)  # [kv heads, D]
    torch.testing.assert_close(out[0], v.repeat_interleave(group, dim=0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fp8_kv", [False, True])
def test_compile_decode_variants_quantized_and_rotary(fp8_kv):
    # The eager decode launches' variants (start-up, for batches beyond the largest graph): the quantized
    # output of the one-key attention, and the rotary + cache write of a token at slot -1 (stores nothing)
    from hopperllm.kernels.rotary import build_cos_sin_cache

    head_dim = 32
    cache, k_scale, v_scale = _warm_up_cache(fp8_kv, seed=6, head_dim=head_dim)
    before = cache.clone()
    args = (8, cache[0], cache[1], k_scale, v_scale, 0.1, torch.float32, 4, [1, 4])
    plain = pa.compile_decode_variants(*args)
    q8 = pa.compile_decode_variants(*args, quant_out=True, use_pdl=False)
    ref_q8, _ = ref_per_token_quant_fp8(plain.reshape(1, -1))
    assert torch.equal(q8.view(torch.uint8), ref_q8.view(torch.uint8))
    cos_sin = build_cos_sin_cache(head_dim, 16, 10000.0).to(DEVICE)
    pa.compile_decode_variants(*args, quant_out=True, cos_sin_cache=cos_sin)
    assert torch.equal(cache.view(torch.uint8), before.view(torch.uint8))  # slot -1: nothing stored


def test_decode_warm_variants(monkeypatch):
    # which decode-attention variants start-up compiles, for the steps that run outside the CUDA graphs
    from hopperllm.kernels import pdl
    from hopperllm.worker.model_runner import decode_warm_variants

    monkeypatch.setattr(pa, "_num_sms", lambda device: 132)
    monkeypatch.setattr(pdl, "PDL_MAX_ROWS", 512)
    dev = torch.device("cpu")
    mixed = [(n, False, False, True) for n in (1, 2, 4, 8, 16, 32)]
    # the defaults: graphs up to 512 = max_num_seqs: the mixed steps' variants only
    assert decode_warm_variants(512, 512, 8, 4096, dev, False) == mixed
    # 1024 sequences: mixed steps of more than 512 decodes launch without PDL; decode-only steps of 513-1024
    # sequences run eagerly, one slice each, without PDL
    many = decode_warm_variants(1024, 512, 8, 4096, dev, False)
    assert many == mixed + [(n, False, False, False) for n in (1, 2, 4, 8, 16, 32)] + [
        (1, True, False, False)
    ]
    # graphs of 1 and 2 sequences: batch 3 of 8 KV heads gets up to 16 slices, with PDL; rotary passed on
    few = decode_warm_variants(8, 2, 8, 4096, dev, True)
    assert few == mixed + [(n, q, True, True) for n in (1, 2, 4, 8, 16) for q in (False, True)]
    # no graphs (enforce_eager): every decode-only batch, from one sequence (32 slices)
    assert (32, True, False, True) in decode_warm_variants(8, None, 8, 4096, dev, False)


def test_choose_num_splits(monkeypatch):
    cpu = torch.device("cpu")
    assert pa.choose_num_splits(1, 8, 100, cpu) == 1  # short context: one split
    monkeypatch.setattr(pa, "_num_sms", lambda device: 132)
    assert pa.choose_num_splits(1, 8, 1024, cpu) == 8  # capped by 1024 / 128 tokens per split
    assert pa.choose_num_splits(1, 4, 4096, cpu) == 32  # 70B at TP=2, batch 1: 66 wanted, capped at 32
    # 9 wanted (1-2 programs per SM), rounded up to a power of two: the 7B's MHA heads at batch 1
    assert pa.choose_num_splits(1, 32, 4096, cpu) == 16
    assert all(
        pa.choose_num_splits(b, h, 4096, cpu) in (1, 2, 4, 8, 16, 32)
        for b in range(1, 300)
        for h in (1, 8, 32)
    )
    assert pa.choose_num_splits(64, 8, 4096, cpu) == 1  # the batch already fills the GPU
    assert pa.choose_num_splits(1, 1, 1 << 20, cpu) == 32  # capped
    assert pa.choose_num_splits(8, 4, 4096, cpu) == 16  # the 70B's heads at TP=2 in the graph of 8 sequences
    assert pa.choose_num_splits(1, 8, 1024, cpu) == 8  # still >= 128 keys a slice
    monkeypatch.setattr(pa, "SPLITS_UP", False)  # HOPPERLLM_DECODE_SPLITS_UP=0
    assert pa.choose_num_splits(8, 4, 4096, cpu) == 8
    assert pa.choose_num_splits(1, 32, 4096, cpu) == 8


def test_invalid_inputs_raise_value_error():
    q, kv, cu, seq_lens, bt = make_paged_case([1], [5], 4, 2, 32, 8, torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        pa.paged_decode_attention(q.half(), kv[0], kv[1], bt, seq_lens, 0.2)
    with pytest.raises(ValueError, match="multiple"):
        pa.paged_decode_attention(q[:, :3], kv[0], kv[1], bt, seq_lens, 0.2)
    kv8, k_scale, _ = quantize_fp8(kv, 4.0, 4.0)
    with pytest.raises(ValueError, match="k_scale"):
        pa.paged_prefill_attention(q, kv8[0], kv8[1], cu, seq_lens, bt, 1, 0.2, k_scale=k_scale)


def test_prefill_config_from_env():
    assert pa.prefill_config_from_env(None) is None and pa.prefill_config_from_env("") is None
    assert pa.prefill_config_from_env("64,64,4,2") == (64, 64, 4, 2)
    assert pa.prefill_config_from_env("128,64,4,3") == (128, 64, 4, 3)
    assert pa.prefill_config_from_env("64:64:4:2") == (64, 64, 4, 2)
    for bad in ("64,64,4", "64,48,4,2", "8,64,4,2", "64,64,0,2", "a,b,c,d", "64,64,4,2,1", "64;64;4;2"):
        with pytest.raises(ValueError, match="HOPPERLLM_PREFILL_CONFIG must be"):
            pa.prefill_config_from_env(bad)


def test_decode_maxnreg_per_variant_and_grid():
    cfg = {"maxnreg": 128, "maxnreg_quant": ((2, None), (4, 120), (None, 168))}
    assert pa.decode_maxnreg(cfg, False, 4096, 132) == 128 and pa.decode_maxnreg(cfg, False, 1, 132) == 128
    # the quantizing variant by programs an SM: <= 2 uncapped, <= 4 the small cap, beyond the large one
    assert pa.decode_maxnreg(cfg, True, 264, 132) is None
    assert pa.decode_maxnreg(cfg, True, 265, 132) == 120 and pa.decode_maxnreg(cfg, True, 528, 132) == 120
    assert pa.decode_maxnreg(cfg, True, 529, 132) == 168
    assert pa.decode_maxnreg({}, True, 4096, 132) is None  # the split configs: the compiler's own allocation
    assert pa.decode_maxnreg({"maxnreg_quant": ((2, 128),)}, True, 4096, 132) is None  # past every bound
    # the defaults as measured on 132 SMs: the 8B's 32 (two slices) / 64 / 128+ decodes
    if not os.environ.get("HOPPERLLM_DECODE_MAXNREG"):
        assert [pa.decode_maxnreg(pa.DECODE_CONFIG, True, n, 132) for n in (256, 512, 1024)] == [
            None,
            128,
            168,
        ]


def test_decode_maxnreg_from_env():
    assert pa.decode_maxnreg_from_env(None) == {} and pa.decode_maxnreg_from_env("") == {}
    assert pa.decode_maxnreg_from_env("0") == {"maxnreg": None, "maxnreg_quant": ((None, None),)}
    assert pa.decode_maxnreg_from_env("168") == {"maxnreg": 168, "maxnreg_quant": ((None, 168),)}
    assert pa.decode_maxnreg_from_env("128,0") == {"maxnreg": 128, "maxnreg_quant": ((None, None),)}
    for bad in ("a", "128,168,200", "16", "300", "-1", "128;168"):
        with pytest.raises(ValueError, match="HOPPERLLM_DECODE_MAXNREG must be"):
            pa.decode_maxnreg_from_env(bad)
