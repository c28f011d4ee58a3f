"""FP8 quantization kernels, fp8_gemv and fp8_linear vs their torch references on small random inputs.

Without CUDA the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py
before triton is imported: `triton.jit` reads it when it decorates). With CUDA the same tests run compiled on the GPU;
tests/gpu/test_gpu_fused_kernels.py covers real shapes.
"""

import pytest
import torch

from hopperllm.kernels import fp8

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

FP8 = torch.float8_e4m3fn
# Hopper's fp8 MMA sums each 32-product k-step with ~14 mantissa bits before fp8_gemv moves it into the
# float32 accumulator (~5e-5 of the output's scale); the interpreter's dot is exact float32.
GEMV_ATOL = 2e-4 if DEVICE == "cuda" else 1e-5


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN-filled tensors, so an output element a kernel never wrote shows up."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)


def codes(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


def random_rows(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # Mixed magnitudes per row, as real activations have.
    x = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g).mul(20).add(0.1)
    return x.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 7), (5, 300), (3, 17000)])  # 17000: the two-pass path
def test_per_token_quant_matches_ref(poisoned_empty, dtype, shape):
    x = random_rows(shape, dtype, seed=shape[1])
    x[0, :3] = torch.tensor([448.0 * 3, -7.75, 0.0], dtype=dtype)  # saturation edge, a rounding carry
    if shape[0] > 2:
        x[2] = 0  # all-zero row: the scale floor 1e-12
    q, scale = fp8.per_token_quant_fp8(x)
    ref_q, ref_scale = fp8.ref_per_token_quant_fp8(x)
    assert scale.shape == (shape[0], 1) and q.dtype == FP8
    assert torch.equal(scale, ref_scale)
    assert torch.equal(codes(q), codes(ref_q))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_quant_matches_ref(poisoned_empty, dtype):
    x = random_rows((4, 2100), dtype, seed=1)
    scale = torch.tensor([0.013], device=DEVICE)
    q = fp8.static_quant_fp8(x, scale)
    assert torch.equal(codes(q), codes(fp8.ref_static_quant_fp8(x, scale)))
    assert q.float().abs().max() == 448.0  # some values saturate


def make_weight(n, k, per_channel, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g).add(0.05)
    w_scale = w.abs().amax(dim=1) / 448.0 if per_channel else w.abs().amax().reshape(1) / 448.0
    w_fp8 = (w / w_scale.reshape(-1, 1)).clamp(-448, 448).to(FP8)
    return w_fp8.to(DEVICE), w_scale.to(DEVICE)


GEMV_CASES = [
    # M, N, K, config override
    (1, 96, 512, None),
    (3, 96, 1000, {"SPLIT_K": 1, "BLOCK_K": 128}),  # ragged K tail
    (3, 96, 1000, {"SPLIT_K": 3, "BLOCK_K": 128}),  # split-K with a short last slice
    (16, 80, 512, {"SPLIT_K": 2, "BLOCK_N": 32}),
    (20, 64, 256, {"SPLIT_K": 4, "BLOCK_K": 128}),  # more rows than BLOCK_M: a second row block
]


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize(("M", "N", "K", "config"), GEMV_CASES)
def test_fp8_gemv_matches_ref(poisoned_empty, M, N, K, config, per_channel):
    w_fp8, w_scale = make_weight(N, K, per_channel, seed=M)
    x_fp8, x_scale = fp8.ref_per_token_quant_fp8(random_rows((M, K), torch.float32, seed=K))
    out = fp8.fp8_gemv(x_fp8, x_scale, w_fp8, w_scale, torch.float32, config=config)
    ref = fp8.ref_fp8_matmul(x_fp8, x_scale, w_fp8, w_scale, torch.float32)
    assert out.shape == (M, N) and not out.isnan().any()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=GEMV_ATOL * ref.abs().max().item())


STREAM_K_CASES = [
    # M, N, K, config (STREAM_K: programs)
    (
        1,
        96,
        512,
        {"STREAM_K": 5, "BLOCK_N": 32, "BLOCK_K": 128},
    ),  # 12 iterations over 5: tiles split 2-3 ways
    (3, 96, 1000, {"STREAM_K": 7, "BLOCK_N": 32, "BLOCK_K": 128}),  # ragged K tail, ragged shares
    (2, 80, 256, {"STREAM_K": 3, "BLOCK_N": 32, "BLOCK_K": 128}),  # ragged N: the last tile re-reads rows
    (1, 64, 1024, {"STREAM_K": 16, "BLOCK_N": 32, "BLOCK_K": 128}),  # one iteration a program: 8 per tile
    (20, 64, 384, {"STREAM_K": 4, "BLOCK_N": 32, "BLOCK_K": 128}),  # two row blocks
    (2, 64, 256, {"STREAM_K": 64, "BLOCK_N": 32, "BLOCK_K": 128}),  # more programs than iterations
    (2, 64, 256, {"STREAM_K": 1, "BLOCK_N": 32, "BLOCK_K": 128}),  # one program: every tile whole
]


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize(("M", "N", "K", "config"), STREAM_K_CASES)
def test_fp8_gemv_stream_k_matches_ref(poisoned_empty, M, N, K, config, per_channel):
    w_fp8, w_scale = make_weight(N, K, per_channel, seed=M)
    x_fp8, x_scale = fp8.ref_per_token_quant_fp8(random_rows((M, K), torch.float32, seed=K))
    ref = fp8.ref_fp8_matmul(x_fp8, x_scale, w_fp8, w_scale, torch.float32)
    for _ in range(2):  # the fix-up re-arms its counters: a second call (a graph replay) is right too
        out = fp8.fp8_gemv(x_fp8, x_scale, w_fp8, w_scale, torch.float32, config=config)
        assert out.shape == (M, N) and not out.isnan().any()
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=GEMV_ATOL * ref.abs().max().item())
        assert not fp8._counters[(x_fp8.device, "fp8_gemv")].any()


def test_tuned_stream_k_entry_gives_programs_per_sm(monkeypatch):
    monkeypatch.setitem(fp8.GEMV_TUNED, (777, 512), (128, 256, 1, 3, 8, 2))  # 2 stream-K programs an SM
    cfg = fp8.fp8_gemv_config(1, 777, 512, 132)
    assert cfg["STREAM_K"] == 264 and cfg["BLOCK_N"] == 128 and cfg["num_stages"] == 3
    assert "STREAM_K" not in fp8.fp8_gemv_config(1, 778, 512, 132)  # the rule: split-K
    monkeypatch.setattr(fp8, "GEMV_STREAM_K", "0")  # HOPPERLLM_GEMV_STREAM_K=0: the entry's split-K config
    assert "STREAM_K" not in fp8.fp8_gemv_config(1, 777, 512, 132)
    # by default (and with HOPPERLLM_GEMV_STREAM_K=1) the stream-K table goes in front of the tuned table
    monkeypatch.setitem(fp8.GEMV_STREAM_K_TUNED, (777, 512), (64, 256, 1, 4, 4, 1))
    assert fp8.fp8_gemv_config(1, 777, 512, 132)["BLOCK_N"] == 128  # =0: GEMV_TUNED's entry, split-K
    for value in ("auto", "1"):
        monkeypatch.setattr(fp8, "GEMV_STREAM_K", value)
        cfg = fp8.fp8_gemv_config(1, 777, 512, 132)
        assert cfg["BLOCK_N"] == 64 and cfg["STREAM_K"] == 132
    assert "STREAM_K" not in fp8.fp8_gemv_config(17, 777, 512, 132)  # past GEMV_TUNED_MAX_M: the rule


def test_fp8_gemv_split_k_rearms_its_counters(poisoned_empty):
    """The split-K fix-up leaves its arrival counters at zero, so the next call (or graph replay) works."""
    w_fp8, w_scale = make_weight(200, 1024, per_channel=True, seed=2)
    x_fp8, x_scale = fp8.ref_per_token_quant_fp8(random_rows((4, 1024), torch.float32, seed=4))
    ref = fp8.ref_fp8_matmul(x_fp8, x_scale, w_fp8, w_scale, torch.float32)
    for _ in range(2):
        out = fp8.fp8_gemv(
            x_fp8, x_scale, w_fp8, w_scale, torch.float32, config={"SPLIT_K": 4, "BLOCK_K": 128}
        )
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=GEMV_ATOL * ref.abs().max().item())
        assert not fp8._counters[(x_fp8.device, "fp8_gemv")].any()


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_fp8_gemv_static_input_scale_and_out_dtype(poisoned_empty, out_dtype):
    w_fp8, w_scale = make_weight(128, 384, per_channel=True, seed=7)
    x_scale = torch.tensor([0.02], device=DEVICE)
    x_fp8 = fp8.ref_static_quant_fp8(random_rows((2, 384), torch.float32, seed=3), x_scale)
    out = fp8.fp8_gemv(x_fp8, x_scale, w_fp8, w_scale, out_dtype)
    ref = fp8.ref_fp8_matmul(x_fp8, x_scale, w_fp8, w_scale, torch.float32)
    assert out.dtype == out_dtype
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


def test_fp8_gemv_rejects_bad_shapes():
    w_fp8, w_scale = make_weight(64, 128, per_channel=True, seed=0)
    x_fp8, x_scale = fp8.ref_per_token_quant_fp8(random_rows((2, 96), torch.float32, seed=0))
    with pytest.raises(ValueError, match="K="):
        fp8.fp8_gemv(x_fp8, x_scale, w_fp8, w_scale)
    with pytest.raises(ValueError, match="w_scale"):
        fp8.fp8_gemv(x_fp8, x_scale, w_fp8, w_scale[:3])
    x_fp8, x_scale = fp8.ref_per_token_quant_fp8(random_rows((2, 128), torch.float32, seed=0))
    with pytest.raises(ValueError, match="even number of rows"):
        fp8.fp8_gemv_silu_mul(x_fp8, x_scale, w_fp8[:63], w_scale[:63])
    with pytest.raises(ValueError, match="amax_parts"):
        fp8.fp8_gemv_deferred(fp8.DeferredQuant(x_fp8.float(), x_scale.double()), w_fp8, w_scale)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("M", [1, 5, 33])
def test_fp8_linear_close_to_float_linear(M, static, per_channel):
    """The FP8 linear equals the float linear up to e4m3 rounding of both operands (3 mantissa bits)."""
    K, N = 256, 128
    g = torch.Generator().manual_seed(M)
    w = (torch.randn(N, K, generator=g) * 0.05).to(DEVICE)
    x = torch.randn(2, M, K, generator=g).to(DEVICE)
    bias = torch.randn(N, generator=g).to(DEVICE)
    w_scale = w.abs().amax(dim=1) / 448.0 if per_channel else w.abs().amax().reshape(1) / 448.0
    w_fp8 = (w / w_scale.reshape(-1, 1)).to(FP8)
    input_scale = x.abs().amax().reshape(1) / 448.0 if static else None
    y = fp8.fp8_linear(x, w_fp8, w_scale, input_scale=input_scale, bias=bias, out_dtype=torch.float32)
    ref = x @ w.T + bias
    assert y.shape == (2, M, N)
    # e4m3 rounds each operand by up to 2^-4 relative (rms ~2.5%): the product's error norm is a few %.
    assert rel_err(y - bias, ref - bias) < 0.06


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the CPU emulation path")
def test_fp8_linear_cpu_path_is_dequantized_matmul():
    w_fp8, w_scale = make_weight(48, 64, per_channel=True, seed=1)
    x = random_rows((3, 64), torch.bfloat16, seed=2)
    x_fp8, x_scale = fp8.ref_per_token_quant_fp8(x)
    y = fp8.fp8_linear(x, w_fp8, w_scale)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, fp8.ref_fp8_matmul(x_fp8, x_scale, w_fp8, w_scale, torch.bfloat16))


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("static", [False, True])
def test_scaled_mm_wrapper_matches_ref(per_channel, static):
    """Our torch._scaled_mm call convention (column-major weight, scale shapes) on whatever device has it."""
    w_fp8, w_scale = make_weight(64, 128, per_channel, seed=5)
    x = random_rows((32, 128), torch.float32, seed=6)
    if static:
        x_scale = x.abs().amax().reshape(1) / 448.0
        x_fp8 = fp8.ref_static_quant_fp8(x, x_scale)
    else:
        x_fp8, x_scale = fp8.ref_per_token_quant_fp8(x)
    try:
        out = fp8.scaled_mm(x_fp8, x_scale, w_fp8, w_scale, torch.bfloat16)
    except (RuntimeError, NotImplementedError) as e:  # CPU builds without FP8 GEMMs
        pytest.skip(f"torch._scaled_mm unavailable here: {e}")
    ref = fp8.ref_fp8_matmul(x_fp8, x_scale, w_fp8, w_scale, torch.float32)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


# fp8_gemv_silu_mul / fp8_gemv_deferred: the decode MLP in two launches (gate/up GEMV with the SiLU-mul in
# its epilogue, then the down GEMV quantizing its input as it loads it) must give the bits of the three
# unfused launches (fp8_gemv, silu_and_mul's FP8 output, fp8_gemv) with the same configs.
FUSED_MLP_CASES = [
    # M, I, K, gate/up config, down config
    (1, 96, 512, None, None),
    (
        3,
        80,
        1000,
        {"SPLIT_K": 1, "BLOCK_K": 128, "BLOCK_N": 64},
        {"SPLIT_K": 1, "BLOCK_K": 128},
    ),  # ragged K, N
    (5, 64, 768, {"SPLIT_K": 3, "BLOCK_K": 128, "BLOCK_N": 32}, {"SPLIT_K": 2, "BLOCK_K": 128}),  # split-K
    (3, 64, 768, {"STREAM_K": 5, "BLOCK_K": 128, "BLOCK_N": 64}, {"STREAM_K": 7, "BLOCK_K": 128}),  # stream-K
    (
        20,
        48,
        256,
        {"SPLIT_K": 2, "BLOCK_K": 128, "BLOCK_N": 32},
        {"SPLIT_K": 1, "BLOCK_K": 128},
    ),  # 2 row blocks
]


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize(("M", "inter", "K", "cfg_gu", "cfg_down"), FUSED_MLP_CASES)
def test_fused_silu_mul_gemvs_equal_unfused_launches(
    poisoned_empty, M, inter, K, cfg_gu, cfg_down, per_channel, out_dtype
):
    from hopperllm.kernels.activation import silu_and_mul

    w_gu, s_gu = make_weight(2 * inter, K, per_channel, seed=inter)
    w_down, s_down = make_weight(K, inter, per_channel, seed=K)
    x = random_rows((M, K), torch.float32, seed=M)
    if per_channel:  # per-token input scales; with per-tensor weights, a static one (a checkpoint's)
        x_fp8, x_scale = fp8.ref_per_token_quant_fp8(x)
    else:
        x_scale = (x.abs().amax() / 448.0).reshape(1)
        x_fp8 = fp8.ref_static_quant_fp8(x, x_scale)

    fused = fp8.fp8_gemv_silu_mul(x_fp8, x_scale, w_gu, s_gu, out_dtype, config=cfg_gu)
    # The unfused GEMV over the gate rows and over the up rows, each with the fused launch's tiles and K
    # slices (gated_config), tiled from its first row as the fused launch tiles each half: the
    # interpreter's dot is a BLAS matmul, whose float32 summation order depends on the tile's shape and
    # rows.
    cfg = fp8.gated_config({**fp8.fp8_gemv_config(M, 2 * inter, K, 132), **(cfg_gu or {})})
    halves = [
        fp8.fp8_gemv(x_fp8, x_scale, w_gu[rows], s_gu if s_gu.numel() == 1 else s_gu[rows], out_dtype, cfg)
        for rows in (slice(0, inter), slice(inter, 2 * inter))
    ]
    gate_up = torch.cat(halves, dim=1)
    y_fp8, y_scale = silu_and_mul(gate_up, out_fp8=True)
    assert fused.values.shape == (M, inter) and fused.values.dtype == out_dtype
    assert torch.equal(fused.values, silu_and_mul(gate_up))
    assert torch.equal(fused.amax_parts.amax(dim=1, keepdim=True), fused.values.float().abs().amax(1, True))

    out = fp8.fp8_gemv_deferred(fused, w_down, s_down, out_dtype, config=cfg_down)
    assert torch.equal(out, fp8.fp8_gemv(y_fp8, y_scale, w_down, s_down, out_dtype, config=cfg_down))

    # and both against the float32 references (the unfused meaning, up to accumulation order). Each GEMV
    # output is off by up to e = GEMV_ATOL of the outputs' scale (the tests above), so silu(gate) * up is
    # off by up to e (|silu'(gate)| |up| + |silu(gate)|) per element, plus out_dtype rounding (rtol).
    ref = fp8.ref_fp8_gemv_silu_mul(x_fp8, x_scale, w_gu, s_gu, out_dtype)
    exact = fp8.ref_fp8_matmul(x_fp8, x_scale, w_gu, s_gu, torch.float32)
    gate, up = exact[:, :inter], exact[:, inter:]
    sig = torch.sigmoid(gate)
    e = GEMV_ATOL * exact.abs().max()
    bound = e * ((sig * (1 + gate * (1 - sig))).abs() * up.abs() + (gate * sig).abs())
    err = (fused.values.float() - ref.values.float()).abs()
    assert (err <= bound + 2e-2 * ref.values.float().abs() + 1e-6).all(), (err - bound).max()
