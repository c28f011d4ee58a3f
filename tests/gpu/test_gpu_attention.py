"""Paged attention kernels vs `ref_paged_attention` at real shapes on the GPU (bf16 and FP8 caches).

Llama-2-7B: 32 query / 32 kv heads; Llama-3-8B: 32 / 8; head_dim 128; contexts up to 4096; batch 1..64.
Run with `pytest tests/gpu/test_gpu_attention.py -s` to also see the decode bandwidth report.
"""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from hopperllm.kernels import paged_attention as pa  # noqa: E402
from hopperllm.kernels.fp8 import ref_per_token_quant_fp8  # noqa: E402

FP8 = torch.float8_e4m3fn
MODELS = {"llama-2-7b": (32, 32), "llama-3-8b": (32, 8)}
HEAD_DIM = 128
SCALE = HEAD_DIM**-0.5


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def make_paged_case(
    q_lens, seq_lens, num_q_heads, num_kv_heads, block_size=16, kv_dtype=torch.bfloat16, seed=0
):
    """Random bf16 q and a shuffled paged cache (bf16, or FP8 with scales); slots no sequence owns hold NaN.

    Returns q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, k_scale, v_scale.
    """
    torch.manual_seed(seed)
    dev = "cuda"
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 7
    perm = torch.randperm(num_blocks, device=dev).to(torch.int32)
    block_tables = torch.zeros(len(seq_lens), max(blocks_per_seq) + 2, dtype=torch.int32, device=dev)
    kv = torch.full((2, num_blocks, block_size, num_kv_heads, HEAD_DIM), float("nan"), device=dev)
    used = 0
    for b, (n, nb) in enumerate(zip(seq_lens, blocks_per_seq, strict=True)):
        ids = perm[used : used + nb]
        used += nb
        block_tables[b, :nb] = ids
        keys = torch.randn(2, nb * block_size, num_kv_heads, HEAD_DIM, device=dev)
        keys[:, n:] = float("nan")
        kv[:, ids.long()] = keys.reshape(2, nb, block_size, num_kv_heads, HEAD_DIM)
    k_scale = v_scale = None
    if kv_dtype == FP8:
        k_scale = torch.tensor([4.5 / 448.0], device=dev)
        v_scale = torch.tensor([4.0 / 448.0], device=dev)
        kv = torch.stack([(kv[0] / k_scale).clamp(-448, 448), (kv[1] / v_scale).clamp(-448, 448)]).to(FP8)
    else:
        kv = kv.to(kv_dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    q = torch.randn(sum(q_lens), num_q_heads, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
    return q, kv[0], kv[1], cu, lens, block_tables, k_scale, v_scale


def ragged(batch: int, max_len: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (batch,), generator=gen).tolist()
    lens[0] = max_len
    return lens


@pytest.fixture(params=[True], ids=["prefetch"])
def decode_variant(request, monkeypatch):
    """The decode key loop's non-default variant (the next tile prefetched) in every config; the default runs
    in every decode test. Each variant compiles its own kernels, so it runs on a subset of the cases (the
    whole file within the device script's 300 s)."""
    for cfg in pa.DECODE_CONFIGS:
        monkeypatch.setitem(cfg, "PREFETCH", request.param)
    return request.param


@pytest.fixture(params=[False, True], ids=["plain", "prefetch"])
def any_decode_variant(request, monkeypatch):
    """Every variant of the decode key loop, the default (no prefetch) included."""
    for cfg in pa.DECODE_CONFIGS:
        monkeypatch.setitem(cfg, "PREFETCH", request.param)
    return request.param


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, FP8], ids=["bf16", "fp8"])
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("batch,max_len", [(1, 4096), (8, 2048), (64, 1024)])
@pytest.mark.parametrize("num_splits", [None, 4])
def test_decode(kv_dtype, model, batch, max_len, num_splits):
    check_decode(kv_dtype, model, batch, max_len, num_splits)


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, FP8], ids=["bf16", "fp8"])
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("batch,max_len", [(1, 4096), (8, 2048)])
def test_decode_key_loop_variants(kv_dtype, model, batch, max_len, decode_variant):
    check_decode(kv_dtype, model, batch, max_len, None)


@pytest.mark.parametrize("dot_fp16", [False, True])
@pytest.mark.parametrize("q_gain", [1.0, 1e5])
def test_decode_fp8_cache_products_fp16_or_bf16(dot_fp16, q_gain, monkeypatch):
    # An FP8 cache's decode products in float16 (the default at few splits) or bfloat16
    # (HOPPERLLM_DECODE_DOT_FP16=0) at the throughput run's batch; q beyond float16's range (q_gain) too
    monkeypatch.setattr(pa, "DECODE_DOT_FP16", dot_fp16)
    check_decode(FP8, "llama-3-8b", 64, 2048, None, q_gain=q_gain)


def check_decode(kv_dtype, model, batch, max_len, num_splits, q_gain=None):
    hq, hkv = MODELS[model]
    seq_lens = ragged(batch, max_len, seed=batch)
    q, k, v, _, lens, bt, ks, vs = make_paged_case([1] * batch, seq_lens, hq, hkv, kv_dtype=kv_dtype)
    if q_gain is not None:
        q = (q.float() * (q_gain / q.float().abs().amax())).to(q.dtype)
    out = torch.full_like(q, float("nan"))
    pa.paged_decode_attention(q, k, v, bt, lens, SCALE, ks, vs, num_splits=num_splits, out=out)
    cu = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    ref = pa.ref_paged_attention(q, k, v, cu, lens, bt, SCALE, ks, vs)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 2e-2


@pytest.mark.parametrize("model,hq,hkv", [("mha-32", 32, 32), ("gqa-64-8", 64, 8)])
@pytest.mark.parametrize("batch,max_len", [(1, 2048), (8, 2048), (64, 1024)])
def test_decode_quant_out_equals_separate_quantize(model, hq, hkv, batch, max_len, any_decode_variant):
    """The merge and the per-token FP8 quantize of the output in the decode launch (arrival counters in
    global memory, out-of-order programs on the GPU) give the bits of the separate steps, also replayed
    in a CUDA graph."""
    from hopperllm.kernels import fp8

    seq_lens = ragged(batch, max_len, seed=batch + 1)
    q, k, v, _, lens, bt, ks, vs = make_paged_case([1] * batch, seq_lens, hq, hkv, kv_dtype=FP8)
    splits = pa.choose_num_splits(batch, hkv, max_len, q.device)
    out = pa.paged_decode_attention(q, k, v, bt, lens, SCALE, ks, vs, num_splits=splits)
    ref_q8, ref_scale = fp8.per_token_quant_fp8(out.reshape(batch, -1))
    q8, scale = pa.paged_decode_attention(q, k, v, bt, lens, SCALE, ks, vs, num_splits=splits, quant_out=True)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(q8.view(torch.uint8), ref_q8.view(torch.uint8))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        gq8, gscale = pa.paged_decode_attention(
            q, k, v, bt, lens, SCALE, ks, vs, num_splits=splits, quant_out=True
        )
    for _ in range(3):
        gq8.zero_()
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(gq8.view(torch.uint8), ref_q8.view(torch.uint8))
        assert torch.equal(gscale, ref_scale)


@pytest.mark.parametrize("maxnreg", [128, 168])
@pytest.mark.parametrize("batch", [64, 256])
def test_decode_register_cap_changes_no_bit(maxnreg, batch, monkeypatch):
    """The batch config's register caps (maxnreg, maxnreg_quant: more programs an SM, a few spilled registers)
    give the same bits as the compiler's own allocation, with and without the quantizing tail."""
    seq_lens = ragged(batch, 2176, seed=batch + 2)
    q, k, v, _, lens, bt, ks, vs = make_paged_case([1] * batch, seq_lens, 32, 8, kv_dtype=FP8)
    splits = pa.choose_num_splits(batch, 8, 2176, q.device)
    assert pa.decode_config(splits) is pa.DECODE_CONFIG

    def run(cap):
        monkeypatch.setitem(pa.DECODE_CONFIG, "maxnreg", cap)
        monkeypatch.setitem(pa.DECODE_CONFIG, "maxnreg_quant", ((None, cap),))
        assert pa.decode_maxnreg(pa.DECODE_CONFIG, True, batch * 8 * splits, 132) == cap
        out = pa.paged_decode_attention(q, k, v, bt, lens, SCALE, ks, vs, num_splits=splits)
        q8, scale = pa.paged_decode_attention(
            q, k, v, bt, lens, SCALE, ks, vs, num_splits=splits, quant_out=True
        )
        return out, q8.view(torch.uint8), scale

    want = run(None)
    got = run(maxnreg)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


# (q_lens, seq_lens): ragged full prefills; chunked prefill / prefix hits; a mixed prefill + decode batch.
PREFILL_CASES = {
    "prefill": ([1, 17, 300, 2048], [1, 17, 300, 2048]),
    "chunked": ([512, 37, 129], [4096, 1000, 129]),
    "mixed": ([1, 1, 1, 700, 64], [3000, 17, 4096, 1500, 64]),
}


def _run_prefill(model: str, case: str, kv_dtype):
    """One prefill case through the kernel, its output poisoned first: (out, q, the reference's other args)."""
    hq, hkv = MODELS[model]
    q_lens, seq_lens = PREFILL_CASES[case]
    q, k, v, cu, lens, bt, ks, vs = make_paged_case(q_lens, seq_lens, hq, hkv, kv_dtype=kv_dtype)
    out = torch.full_like(q, float("nan"))
    pa.paged_attention(q, k, v, cu, lens, bt, max(q_lens), SCALE, ks, vs, out=out)
    assert torch.isfinite(out).all()
    return out, q, (k, v, cu, lens, bt, SCALE, ks, vs)


def _rounded_q(q: torch.Tensor) -> torch.Tensor:
    """q rounded per (token, head) row to e4m3 and back, as the FP8 QK^T kernel quantizes it."""
    q8, q_scale = ref_per_token_quant_fp8(q)
    return (q8.float() * q_scale).to(q.dtype)


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, FP8], ids=["bf16", "fp8"])
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("case", list(PREFILL_CASES))
def test_prefill(kv_dtype, model, case, monkeypatch):
    monkeypatch.setattr(
        pa, "PREFILL_FP8_QK", False
    )  # QK^T in 16 bits (HOPPERLLM_PREFILL_FP8_QK=0); FP8: below
    out, q, args = _run_prefill(model, case, kv_dtype)
    assert rel_err(out, pa.ref_paged_attention(q, *args)) < 2e-2


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("case", list(PREFILL_CASES))
def test_prefill_fp8_qk(model, case, monkeypatch):
    # PREFILL_FP8_QK (the default with an FP8 cache): q quantized per row, QK^T on FP8 tensor cores. It
    # equals the reference over the dequantized q to bf16 rounding, and stays near the reference over q.
    monkeypatch.setattr(pa, "PREFILL_FP8_QK", True)
    out, q, args = _run_prefill(model, case, FP8)
    assert rel_err(out, pa.ref_paged_attention(_rounded_q(q), *args)) < 2e-2
    assert rel_err(out, pa.ref_paged_attention(q, *args)) < 5e-2


@pytest.mark.parametrize(
    "config", [(64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 4, 2)], ids=lambda c: "-".join(map(str, c))
)
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, FP8], ids=["bf16", "fp8"])
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("case", list(PREFILL_CASES))
def test_prefill_64_row_tiles(config, kv_dtype, model, case, monkeypatch):
    # HOPPERLLM_PREFILL_CONFIG's 64-row tiles (v28's candidate: no spills, three programs an SM): a query tile
    # of 64 / GROUP positions, the diagonal and chunk boundaries at other places than the default's 128 rows
    monkeypatch.setattr(pa, "PREFILL_CONFIG", config)
    out, q, args = _run_prefill(model, case, kv_dtype)
    fp8_qk = pa.prefill_fp8_qk(q.dtype, kv_dtype == FP8)  # the default FP8 QK^T: against the rounded q
    assert rel_err(out, pa.ref_paged_attention(_rounded_q(q) if fp8_qk else q, *args)) < 2e-2


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("case", list(PREFILL_CASES))
def test_prefill_fp8_pv(model, case, monkeypatch):
    # HOPPERLLM_PREFILL_FP8_PV=1: P @ V on FP8 tensor cores too. Near the emulation (P rounded relative to
    # each row's max; the kernel rounds relative to the running max) and the exact attention over the
    # quantized q, and not the 16-bit P @ V's output (the CPU test checks the rounding's size).
    monkeypatch.setattr(pa, "PREFILL_FP8_QK", True)
    monkeypatch.setattr(pa, "PREFILL_FP8_PV", True)
    out, q, args = _run_prefill(model, case, FP8)
    emulated = pa.ref_paged_attention(_rounded_q(q), *args, fp8_pv=True)
    exact = pa.ref_paged_attention(_rounded_q(q), *args)
    assert rel_err(out, emulated) < 3e-2
    assert rel_err(out, exact) < 3e-2
    monkeypatch.setattr(pa, "PREFILL_FP8_PV", False)
    k, v, cu, lens, bt, scale, ks, vs = args
    q_lens = (cu[1:] - cu[:-1]).tolist()
    assert not torch.equal(out, pa.paged_attention(q, k, v, cu, lens, bt, max(q_lens), scale, ks, vs))


@pytest.mark.parametrize("block_size", [8, 32])
def test_other_block_sizes(block_size):
    q, k, v, cu, lens, bt, ks, vs = make_paged_case([5, 1, 90], [77, 300, 90], 32, 8, block_size=block_size)
    ref = pa.ref_paged_attention(q, k, v, cu, lens, bt, SCALE)
    assert rel_err(pa.paged_prefill_attention(q, k, v, cu, lens, bt, 90, SCALE), ref) < 2e-2
    qd = q[cu[1:].long() - 1].contiguous()
    cud = torch.arange(4, dtype=torch.int32, device="cuda")
    ref = pa.ref_paged_attention(qd, k, v, cud, lens, bt, SCALE)
    assert rel_err(pa.paged_decode_attention(qd, k, v, bt, lens, SCALE, num_splits=3), ref) < 2e-2


def test_decode_cuda_graph_replay():
    # Fixed num_splits and block-table width: capture once, then change q, seq_lens and block tables in
    # place and replay; the kernels must read them on the device (no host sync, no stale lengths).
    hq, hkv = MODELS["llama-3-8b"]
    batch = 8
    q, k, v, _, lens, bt, _, _ = make_paged_case([1] * batch, ragged(batch, 2048, 1), hq, hkv, seed=1)
    out = torch.empty_like(q)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        pa.paged_decode_attention(q, k, v, bt, lens, SCALE, num_splits=8, out=out)  # compile outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pa.paged_decode_attention(q, k, v, bt, lens, SCALE, num_splits=8, out=out)

    # Permute the sequences (rows of the block table with their lengths) and shorten some of them.
    perm = torch.randperm(batch, device="cuda")
    new_lens = (lens[perm] - torch.randint(0, 300, (batch,), device="cuda", dtype=torch.int32)).clamp_min(1)
    new_bt = bt[perm]
    lens.copy_(new_lens)
    bt.copy_(new_bt)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    cu = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    ref = pa.ref_paged_attention(q, k, v, cu, lens, bt, SCALE)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 2e-2


def test_decode_zero_length_rows():
    q, k, v, _, lens, bt, _, _ = make_paged_case([1, 1], [100, 1], 32, 8)
    lens[1] = 0
    for num_splits in (1, 4):
        out = pa.paged_decode_attention(q, k, v, bt, lens, SCALE, num_splits=num_splits)
        assert torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, FP8], ids=["bf16", "fp8"])
def test_decode_bandwidth_report(kv_dtype):
    """Prints achieved bandwidth of decode vs its floor (the K/V bytes); asserts only correctness."""
    hq, hkv = MODELS["llama-3-8b"]
    for batch, ctx in [(1, 4096), (16, 4096), (64, 2048)]:
        q, k, v, _, lens, bt, ks, vs = make_paged_case([1] * batch, [ctx] * batch, hq, hkv, kv_dtype=kv_dtype)
        args = (q, k, v, bt, lens, SCALE, ks, vs)
        pa.paged_decode_attention(*args)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        iters = 50
        start.record()
        for _ in range(iters):
            pa.paged_decode_attention(*args)
        end.record()
        torch.cuda.synchronize()
        t_s = start.elapsed_time(end) / 1e3 / iters
        floor_bytes = batch * ctx * hkv * HEAD_DIM * 2 * k.element_size()
        splits = pa.choose_num_splits(batch, hkv, bt.shape[1] * k.shape[1], q.device)  # the launcher's pick
        print(
            f"\ndecode {kv_dtype} B={batch} ctx={ctx} splits={splits}: {t_s * 1e6:.1f} us, "
            f"{floor_bytes / t_s / 1e9:.0f} GB/s of K/V"
        )
        assert t_s > 0
