"""Fused elementwise kernels and the FP8 GEMMs at real Llama shapes on the GPU, against the torch references.

Run in its own pytest process (or before any CPU kernel test module sets TRITON_INTERPRET=1).
"""

import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="kernels would run interpreted"),
]

from hopperllm.kernels import activation, fp8, norm, rotary  # noqa: E402

FP8 = torch.float8_e4m3fn
# Llama-2-7B decode projections as (N, K): fused qkv, o, fused gate/up, down.
LLAMA2_7B_MATRICES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]


def randn(*shape, dtype=torch.bfloat16, scale=1.0, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def assert_within_ulps(out, ref, ulps=1):
    """Equal up to `ulps` rounding steps of out's dtype (rsqrt/exp/FMA contraction differ on the GPU)."""
    eps = torch.finfo(out.dtype).eps
    torch.testing.assert_close(out.float(), ref.float(), rtol=ulps * eps, atol=1e-6)


def assert_fp8_equal(q, ref_q, max_mismatch_frac=0.0):
    mismatch = (q.view(torch.uint8) != ref_q.view(torch.uint8)).float().mean().item()
    assert mismatch <= max_mismatch_frac, f"{mismatch:.2e} of FP8 codes differ"


@pytest.mark.parametrize("T", [1, 7, 8192])
@pytest.mark.parametrize("H", [4096, 8192])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_real_shapes(T, H, with_residual):
    x, residual, weight = randn(T, H, seed=1), randn(T, H, scale=3, seed=2), randn(H, seed=3).abs() + 0.5
    res_a, res_b, res_c = (residual.clone() for _ in range(3)) if with_residual else (None, None, None)
    out = norm.rms_norm(x, weight, 1e-5, residual=res_a)
    ref = norm.ref_rms_norm(x, weight, 1e-5, residual=res_b)
    assert_within_ulps(out, ref, ulps=2)  # rounded twice (normalized, then times weight), as HF does
    if with_residual:
        assert torch.equal(res_a, res_b)
    q, scale = norm.rms_norm(x, weight, 1e-5, residual=res_c, out_fp8=True)
    ref_q, ref_scale = fp8.ref_per_token_quant_fp8(out)
    # The FP8 variant is a separate compilation whose sum of squares may associate differently (its
    # layout follows the 1-byte store): a rare 1-ulp change of the bf16 output moves an FP8 code
    # (seen: 11 of 67M codes at 8192x8192).
    torch.testing.assert_close(scale, ref_scale, rtol=2**-7, atol=0)
    assert_fp8_equal(q, ref_q, max_mismatch_frac=1e-5)


@pytest.mark.parametrize(("T", "num_q_heads", "num_kv_heads"), [(8192, 32, 8), (8192, 32, 32), (3, 64, 8)])
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, FP8])
def test_rotary_kv_write_real_shapes(T, num_q_heads, num_kv_heads, kv_dtype):
    D, block_size = 128, 16
    num_blocks = -(-T // block_size) + 4
    qkv = randn(T, (num_q_heads + 2 * num_kv_heads) * D, scale=2, seed=4)
    q_end, k_end = num_q_heads * D, (num_q_heads + num_kv_heads) * D
    q = qkv[:, :q_end].view(T, num_q_heads, D)
    k = qkv[:, q_end:k_end].view(T, num_kv_heads, D)
    v = qkv[:, k_end:].view(T, num_kv_heads, D)
    cos_sin = rotary.build_cos_sin_cache(
        D, 131072, 500000.0,
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192},
    ).cuda()  # fmt: skip
    positions = torch.randint(0, 131072, (T,), device="cuda")
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:T]
    slots[::5] = -1
    cache = torch.full((2, num_blocks, block_size, num_kv_heads, D), float("nan"), device="cuda").to(kv_dtype)
    ref_cache, ref_q = cache.clone(), q.clone()
    scales = (torch.tensor([0.02], device="cuda"), torch.tensor([0.015], device="cuda"))
    rotary.rotary_kv_write(q, k, v, positions, cos_sin, cache, slots, *scales)
    rotary.ref_rotary_kv_write(ref_q, k, v, positions, cos_sin, ref_cache, slots, *scales)
    assert_within_ulps(q, ref_q)
    if kv_dtype == FP8:
        assert_fp8_equal(cache, ref_cache, max_mismatch_frac=1e-3)  # a bf16 ulp in k can move a code
        torch.testing.assert_close(cache.float(), ref_cache.float(), rtol=2**-3, atol=2**-9, equal_nan=True)
    else:
        assert_within_ulps(cache.nan_to_num(), ref_cache.nan_to_num())
        assert torch.equal(cache.isnan(), ref_cache.isnan())


@pytest.mark.parametrize("T", [1, 16, 300, 8192])
@pytest.mark.parametrize("inter", [11008, 14336, 28672])  # 28672 (Llama-2-70B): two launches up to 256 rows
def test_silu_and_mul_real_shapes(T, inter):
    x = randn(T, 2 * inter, scale=3, seed=5)
    out = activation.silu_and_mul(x)
    assert_within_ulps(out, activation.ref_silu_and_mul(x))
    q, scale = activation.silu_and_mul(x, out_fp8=True)
    ref_q, ref_scale = fp8.ref_per_token_quant_fp8(out)
    assert torch.equal(scale, ref_scale)
    assert_fp8_equal(q, ref_q)


@pytest.mark.parametrize(("T", "K"), [(1, 4096), (8192, 4096), (8192, 11008)])
def test_quant_real_shapes(T, K):
    x = randn(T, K, scale=2, seed=6)
    q, scale = fp8.per_token_quant_fp8(x)
    ref_q, ref_scale = fp8.ref_per_token_quant_fp8(x)
    assert torch.equal(scale, ref_scale)
    assert_fp8_equal(q, ref_q)
    static = torch.tensor([0.01], device="cuda")
    assert_fp8_equal(fp8.static_quant_fp8(x, static), fp8.ref_static_quant_fp8(x, static))


def make_weight(N, K, per_channel, seed):
    w = randn(N, K, dtype=torch.float32, scale=0.02, seed=seed)
    w_scale = w.abs().amax(dim=1) / 448.0 if per_channel else w.abs().amax().reshape(1) / 448.0
    return (w / w_scale.reshape(-1, 1)).to(FP8), w_scale


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("M", [1, 4, 16])
@pytest.mark.parametrize(("N", "K"), LLAMA2_7B_MATRICES)
def test_fp8_gemv_vs_ref_and_scaled_mm(N, K, M, per_channel):
    w_fp8, w_scale = make_weight(N, K, per_channel, seed=N + K)
    x_fp8, x_scale = fp8.ref_per_token_quant_fp8(randn(M, K, seed=M))
    out = fp8.fp8_gemv(x_fp8, x_scale, w_fp8, w_scale, torch.bfloat16)
    ref = fp8.ref_fp8_matmul(x_fp8, x_scale, w_fp8, w_scale, torch.float32)
    assert rel_err(out, ref) < 4e-3  # bf16 output rounding
    torch.testing.assert_close(out.float(), ref, rtol=2**-7, atol=1e-3 * ref.abs().max().item())
    for split_k in (1, 2, 8):
        out_split = fp8.fp8_gemv(x_fp8, x_scale, w_fp8, w_scale, torch.float32, config={"SPLIT_K": split_k})
        torch.testing.assert_close(out_split, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    # cuBLASLt's FP8 GEMM on the same operands
    mm = fp8.scaled_mm(x_fp8, x_scale, w_fp8, w_scale, torch.bfloat16)
    assert rel_err(out, mm) < 4e-3


@pytest.mark.parametrize("M", [1, 5, 16])
@pytest.mark.parametrize(
    ("N", "K", "stream_k"),
    [(n, k, False) for n, k in sorted(fp8.GEMV_TUNED)]
    + [(n, k, True) for n, k in sorted(fp8.GEMV_STREAM_K_TUNED)],
)
def test_fp8_gemv_tuned_batch1_configs(N, K, stream_k, M, monkeypatch):
    """Every shape with a tuned batch-1 config (70B shapes too; GEMV_TUNED's split-K configs as
    HOPPERLLM_GEMV_STREAM_K=0 runs them, and the default stream-K table) against the float32 reference, at
    the batches up to 16 that take it."""
    monkeypatch.setattr(fp8, "GEMV_STREAM_K", "auto" if stream_k else "0")
    w_fp8, w_scale = make_weight(N, K, True, seed=N + K)
    x_fp8, x_scale = fp8.ref_per_token_quant_fp8(randn(M, K, seed=1))
    out = fp8.fp8_gemv(x_fp8, x_scale, w_fp8, w_scale, torch.float32)
    ref = fp8.ref_fp8_matmul(x_fp8, x_scale, w_fp8, w_scale, torch.float32)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


# decode matrices whose split-K grids leave SMs idle or run a short second wave: Llama-3-8B qkv and gate_up,
# the 70B's TP=8 qkv shard, Llama-2-7B down
STREAM_K_SHAPES = [(6144, 4096), (28672, 4096), (1280, 8192), (4096, 11008)]


@pytest.mark.parametrize("M", [1, 16])
@pytest.mark.parametrize("per_sm", [1, 2])
@pytest.mark.parametrize(("N", "K"), STREAM_K_SHAPES)
def test_fp8_gemv_stream_k_real_shapes(N, K, per_sm, M):
    """The stream-K launch (tiles split over programs at any K chunk) against the float32 reference, plain,
    gated (fused SiLU-mul: the bits of the unfused GEMV with the same tiles) and replayed in a CUDA graph."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cfg = {"BLOCK_N": 128, "BLOCK_K": 256, "num_stages": 4, "num_warps": 8, "STREAM_K": per_sm * sms}
    w_fp8, w_scale = make_weight(N, K, True, seed=N + K)
    x_fp8, x_scale = fp8.ref_per_token_quant_fp8(randn(M, K, seed=2))
    ref = fp8.ref_fp8_matmul(x_fp8, x_scale, w_fp8, w_scale, torch.float32)
    out = fp8.fp8_gemv(x_fp8, x_scale, w_fp8, w_scale, torch.float32, config=cfg)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    gated = fp8.fp8_gemv_silu_mul(x_fp8, x_scale, w_fp8, w_scale, config=cfg)
    halves = [
        fp8.fp8_gemv(
            x_fp8, x_scale, w_fp8[rows], w_scale[rows], config=fp8.gated_config({"BLOCK_M": 16, **cfg})
        )
        for rows in (slice(0, N // 2), slice(N // 2, N))
    ]
    assert torch.equal(gated.values, activation.silu_and_mul(torch.cat(halves, dim=1)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = fp8.fp8_gemv(x_fp8, x_scale, w_fp8, w_scale, torch.float32, config=cfg)
    for _ in range(2):
        replayed.fill_(float("nan"))
        graph.replay()
        assert torch.equal(replayed, out)  # deterministic: partials summed in program order


def test_fp8_gemv_split_k_replays_in_cuda_graph():
    """Decode runs under CUDA graphs: the split-K fix-up must re-arm its counters on every replay."""
    (N, K), M = LLAMA2_7B_MATRICES[3], 4
    w_fp8, w_scale = make_weight(N, K, per_channel=True, seed=11)
    static_x = torch.empty(M, K, dtype=FP8, device="cuda")
    static_scale = torch.empty(M, 1, device="cuda")
    fp8.fp8_gemv(static_x, static_scale.fill_(1.0), w_fp8, w_scale, config={"SPLIT_K": 4})  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8.fp8_gemv(static_x, static_scale, w_fp8, w_scale, torch.float32, config={"SPLIT_K": 4})
    for seed in range(3):
        x_fp8, x_scale = fp8.ref_per_token_quant_fp8(randn(M, K, seed=seed))
        static_x.copy_(x_fp8)
        static_scale.copy_(x_scale)
        graph.replay()
        ref = fp8.ref_fp8_matmul(x_fp8, x_scale, w_fp8, w_scale, torch.float32)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


# (I, K) of the decode MLPs: Llama-2-7B, Llama-3-8B, Llama-2-70B at TP=2 and TP=1
MLP_SHAPES = [(11008, 4096), (14336, 4096), (14336, 8192), (28672, 8192)]


@pytest.mark.parametrize("M", [1, 4, 16])
@pytest.mark.parametrize(("inter", "K"), MLP_SHAPES)
def test_fused_silu_mul_gemvs_real_shapes(inter, K, M):
    """The decode MLP's two fused launches give the bits of the three unfused ones (gate/up GEMV with the
    fused launch's tile shape, FP8 SiLU-mul, down GEMV), also inside a CUDA graph; and match the unfused
    gate/up GEMV with its own (tuned) config within bf16 rounding."""
    w_gu, s_gu = make_weight(2 * inter, K, True, seed=inter)
    w_down, s_down = make_weight(K, inter, True, seed=K)
    x_fp8, x_scale = fp8.ref_per_token_quant_fp8(randn(M, K, seed=M))
    # The fused launch's tiles and K slices (gated_config) differ from the unfused launch's; the MMA
    # instruction (wgmma for >= 64-row tiles, mma.sync below), the split-K sums and so the float32
    # rounding follow them. The gate rows and the up rows each go through their own launch: a stream-K
    # launch cuts its (tile, K chunk) iterations into equal program shares, so a half's launch splits its
    # tiles where the fused launch (one tile = gate and up rows) splits them, and a launch over all 2I
    # rows elsewhere.
    cfg = fp8.fp8_gemv_config(M, 2 * inter, K, torch.cuda.get_device_properties(0).multi_processor_count)
    # (a half's own shape may have a table entry, e.g. the 70B's TP=1 gate/up half is the TP=2 shard's
    # stream-K shape: the fused launch's config, stream-K or not, is spelled out in full)
    same_tiles = {"STREAM_K": 0, **fp8.gated_config(cfg)}
    gate_up = torch.cat(
        [fp8.fp8_gemv(x_fp8, x_scale, w_gu[rows], s_gu[rows], config=same_tiles)
         for rows in (slice(0, inter), slice(inter, 2 * inter))],
        dim=1,
    )  # fmt: skip
    y_fp8, y_scale = activation.silu_and_mul(gate_up, out_fp8=True)
    unfused = fp8.fp8_gemv(y_fp8, y_scale, w_down, s_down)

    fused = fp8.fp8_gemv_silu_mul(x_fp8, x_scale, w_gu, s_gu)
    assert torch.equal(fused.values, activation.silu_and_mul(gate_up))
    tuned = activation.silu_and_mul(fp8.fp8_gemv(x_fp8, x_scale, w_gu, s_gu))
    assert rel_err(fused.values, tuned) < 4e-3  # bf16 rounding of gate and up, then of the product
    assert torch.equal(fp8.ref_per_token_quant_fp8(fused.values)[1], y_scale)
    assert torch.equal(fp8.fp8_gemv_deferred(fused, w_down, s_down), unfused)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8.fp8_gemv_deferred(fp8.fp8_gemv_silu_mul(x_fp8, x_scale, w_gu, s_gu), w_down, s_down)
    out.fill_(float("nan"))
    graph.replay()
    assert torch.equal(out, unfused)


@pytest.mark.parametrize("M", [1, 16, 17, 512])
@pytest.mark.parametrize("static", [False, True])
def test_fp8_linear_gpu_paths_match_cpu_emulation(M, static):
    """fp8_gemv (M <= 16) and torch._scaled_mm (M > 16) against the CPU emulation of the same layer."""
    N, K = 4096, 4096
    w_fp8, w_scale = make_weight(N, K, per_channel=True, seed=M)
    x = randn(M, K, seed=M + 1)
    input_scale = (x.float().abs().amax() / 448.0).reshape(1) if static else None
    bias = randn(N, seed=3)
    y = fp8.fp8_linear(x, w_fp8, w_scale, input_scale=input_scale, bias=bias)
    cpu = fp8.fp8_linear(
        x.cpu(), w_fp8.cpu(), w_scale.cpu(), None if input_scale is None else input_scale.cpu(), bias.cpu()
    )
    assert y.dtype == torch.bfloat16 and y.shape == (M, N)
    assert rel_err(y.cpu(), cpu) < 1e-2


@pytest.mark.parametrize("x_rowwise", [False, True])
@pytest.mark.parametrize("w_rowwise", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scaled_mm_scale_combinations(x_rowwise, w_rowwise, out_dtype):
    M, N, K = 64, 256, 512
    w_fp8, w_scale = make_weight(N, K, per_channel=w_rowwise, seed=9)
    x = randn(M, K, dtype=torch.float32, seed=10)
    if x_rowwise:
        x_fp8, x_scale = fp8.ref_per_token_quant_fp8(x)
    else:
        x_scale = (x.abs().amax() / 448.0).reshape(1)
        x_fp8 = fp8.ref_static_quant_fp8(x, x_scale)
    out = fp8.scaled_mm(x_fp8, x_scale, w_fp8, w_scale, out_dtype)
    assert out.dtype == out_dtype
    assert rel_err(out, fp8.ref_fp8_matmul(x_fp8, x_scale, w_fp8, w_scale, torch.float32)) < 1e-2


@pytest.mark.parametrize(("N", "K"), [(32000, 4096), (32000, 8192), (128256, 4096)])
def test_lm_head_gemv_real_shapes(N, K):
    from hopperllm.kernels import gemv

    x = randn(1, K, seed=8)
    w = randn(N, K, scale=0.02, seed=9)
    out = gemv.gemv(x, w)
    ref = gemv.ref_gemv(x, w)  # float32 sums in another order: a bf16 ulp where they straddle a rounding
    torch.testing.assert_close(out.float(), ref.float(), rtol=2 * torch.finfo(out.dtype).eps, atol=1e-3)
