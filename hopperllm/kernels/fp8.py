"""FP8 (e4m3) quantization and the skinny FP8 GEMM used for decode, each beside its torch reference.

Conventions (shared by every kernel that produces FP8):
- activations: per-token dynamic scale[t] = max(amax(x[t]) * (1 / 448), 1e-12) (float32 [T, 1]), or one
  static float32 scale [1]; x_fp8 = clamp(x * (1 / scale), -448, 448) rounded to nearest even.
  Both divisions are written as products with a float32 reciprocal (torch computes `amax / 448` that
  way on CUDA, and one IEEE reciprocal per row beats a division per element): the torch references
  then give the same bits on the CPU and the GPU, and the kernels match them bit for bit.
- weights: w_fp8 [N, K] with w_scale float32 [1] (per tensor) or [N] / [N, 1] (per output channel).
- y = (x_fp8 * x_scale) @ (w_fp8 * w_scale).T, accumulated in float32.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from hopperllm.kernels import timeline
from hopperllm.kernels.launch import cdiv, next_power_of_2, num_sms
from hopperllm.kernels.pdl import pdl_kwargs, pdl_prologue
from hopperllm.kernels.timeline import stamp

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
FP8_MIN_SCALE = 1e-12
FP8_MAX_INV = 1.0 / FP8_MAX

# fp8_linear sends batches of up to this many tokens to fp8_gemv (1.2-1.9x faster than torch._scaled_mm
# on the Llama-2-7B decode matrices at M = 1..16 on an H100), larger ones to torch._scaled_mm (cuBLASLt).
GEMV_MAX_M = 16

# torch._scaled_mm with fast FP8 accumulation: on the H100 (benchmarks/ab_scaled_mm.py,
# results/ab-scaled-mm-fast-accum-h100.json) a Llama-3-8B layer at 8192 tokens 2.85 -> 2.65 ms and a
# Llama-2-7B layer at 2048 tokens 0.70 -> 0.60 ms, relative error against float64 of the same FP8
# operands 1.7e-3 -> 2.1e-3 (K = 4096) and 3.3e-3 (K = 14336); at K = 28672 (Llama-2-70B down) it was
# slower (0.72 -> 0.77 ms) and 4.7e-3, so longer reductions keep float32 promotion.
FP8_FAST_ACCUM = os.environ.get("HOPPERLLM_FP8_FAST_ACCUM", "1") != "0"
FAST_ACCUM_MAX_K = 16384

# fp8_gemv prefetches this many 128-byte lines of each weight row of its K slice into L2 before its PDL
# wait (a power of two; 0 turns it off). HOPPERLLM_GEMV_PREFETCH overrides it for A/B runs.
GEMV_PREFETCH_LINES = int(os.environ.get("HOPPERLLM_GEMV_PREFETCH", "4"))


# ----------------------------------------------------------------------------------------------------------
# Torch references
# ----------------------------------------------------------------------------------------------------------


def ref_per_token_quant_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (x_fp8 [..., K], scale float32 [..., 1])."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) * FP8_MAX_INV).clamp(min=FP8_MIN_SCALE)
    return ref_static_quant_fp8(xf, scale), scale


def ref_static_quant_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x -> e4m3 codes of x * (1 / scale), saturated; scale float32, broadcastable to x."""
    return (x.float() * scale.float().reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def ref_fp8_matmul(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Dequantize both operands to float32, multiply, cast: the meaning of every FP8 GEMM here."""
    x = x_fp8.float() * x_scale.float()
    w = w_fp8.float() * w_scale.float().reshape(-1, 1)
    return (x @ w.T).to(out_dtype)


def ref_fp8_linear(
    x: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    input_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """x [M, K] quantized per token (or statically with input_scale), times the FP8 weight: fp8_linear's
    meaning without the bias, in float32 math (its CPU path)."""
    if input_scale is None:
        x_fp8, x_scale = ref_per_token_quant_fp8(x)
    else:
        x_fp8, x_scale = ref_static_quant_fp8(x, input_scale), input_scale
    return ref_fp8_matmul(x_fp8, x_scale, w_fp8, w_scale, out_dtype)


# ----------------------------------------------------------------------------------------------------------
# Shared Triton helpers (norm, activation and rotary import these so all FP8 producers round alike)
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def fp8_scale_from_amax(amax):
    # amax * float32(1 / 448), as the torch reference computes it (and as torch does `amax / 448` on CUDA).
    return tl.maximum(amax * (1.0 / 448.0), 1e-12)


@triton.jit
def fp8_inv_scale(scale):
    # IEEE reciprocal, as torch's Tensor.reciprocal(): once per row (or per tensor), not per element.
    return tl.div_rn(1.0, scale)


@triton.jit
def quantize_fp8(v, inv_scale):
    """float32 v -> e4m3 of v * inv_scale, saturated to +-448 (cvt.rn.satfinite rounds to nearest even)."""
    q = tl.minimum(tl.maximum(v * inv_scale, -448.0), 448.0)
    return q.to(tl.float8e4nv)


@triton.jit
def silu_mul(gate, up, OUT_DTYPE: tl.constexpr):
    """silu(gate) * up of float32 operands, rounded to OUT_DTYPE and returned in float32: the SwiGLU of
    the SiLU-mul kernels and of fp8_gemv_silu_mul's epilogue (one definition, so both give the same bits).
    silu(g) = g / (1 + exp(-g)) with the fast (approximate) division: a few float32 ulps from torch's
    sigmoid, invisible after rounding to bf16 (an IEEE division made the FP8 SiLU-mul ALU-bound)."""
    return (gate / (1.0 + tl.exp(-gate)) * up).to(OUT_DTYPE).to(tl.float32)


def _use_rne_in_triton_interpreter() -> None:
    """Make TRITON_INTERPRET=1 round float downcasts like the GPU does.

    Triton's CPU interpreter truncates float32 -> bfloat16 and rounds float32 -> e4m3 half-up without
    carrying into the exponent (7.75 becomes 4.0); the GPU rounds to nearest even (cvt.rn[.satfinite]).
    Kernel tests compare against torch bit for bit, so route those conversions through torch, which rounds
    like the hardware. Only ever active under the interpreter.
    """
    from triton.runtime import interpreter

    if getattr(interpreter._convert_float, "_hopperllm_rne", False):
        return
    original = interpreter._convert_float
    torch_dtypes = {
        tl.float32: (torch.float32, torch.int32),
        tl.bfloat16: (torch.bfloat16, torch.int16),
        tl.float16: (torch.float16, torch.int16),
        tl.float8e4nv: (FP8_DTYPE, torch.uint8),
    }

    def convert(data, input_dtype, output_dtype, rounding_mode):
        src, dst = torch_dtypes.get(input_dtype), torch_dtypes.get(output_dtype)
        downcast = input_dtype.primitive_bitwidth > output_dtype.primitive_bitwidth
        if src is None or dst is None or not downcast or rounding_mode == interpreter._ir.ROUNDING_MODE.RTZ:
            return original(data, input_dtype, output_dtype, rounding_mode)
        bits = torch.from_numpy(data.copy()).view(src[1]).view(src[0]).float()
        if output_dtype == tl.float8e4nv:
            bits = bits.clamp(-FP8_MAX, FP8_MAX)  # cvt.rn.satfinite saturates instead of making NaN
        out = bits.to(dst[0]).view(dst[1]).numpy()
        return out.view(f"uint{output_dtype.primitive_bitwidth}").reshape(data.shape)

    convert._hopperllm_rne = True
    interpreter._convert_float = convert


if os.environ.get("TRITON_INTERPRET") == "1":
    _use_rne_in_triton_interpreter()


# ----------------------------------------------------------------------------------------------------------
# Activation quantization
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _per_token_quant_kernel(x_ptr, q_ptr, scale_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr,
                            SINGLE_PASS: tl.constexpr, USE_PDL: tl.constexpr):  # fmt: skip
    pdl_prologue(USE_PDL)
    # One program per row. Floor: read K * sizeof(x) + write K bytes per row.
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    if SINGLE_PASS:  # the whole row in registers
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        scale = fp8_scale_from_amax(tl.max(tl.abs(x), axis=0))
        tl.store(scale_ptr + row, scale)
        tl.store(q_row + offs, quantize_fp8(x, fp8_inv_scale(scale)), mask=offs < K)
    else:  # pass 1 finds amax, pass 2 re-reads the row (now L2-resident) and quantizes
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, K, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            amax = tl.maximum(amax, tl.abs(tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)))
        scale = fp8_scale_from_amax(tl.max(amax, axis=0))
        tl.store(scale_ptr + row, scale)
        inv_scale = fp8_inv_scale(scale)
        for start in range(0, K, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            tl.store(q_row + offs, quantize_fp8(x, inv_scale), mask=offs < K)


def row_launch(n: int, max_single: int = 16384) -> dict:
    """Launch parameters for a one-program-per-row kernel over n columns: the whole row in registers when
    it fits (BLOCK = next_power_of_2(n) <= max_single), else 4096-wide chunks in two passes."""
    block = next_power_of_2(n)
    if block <= max_single:
        return {"BLOCK": block, "SINGLE_PASS": True, "num_warps": min(max(block // 512, 1), 8)}
    return {"BLOCK": 4096, "SINGLE_PASS": False, "num_warps": 8}


@triton.jit
def _static_quant_kernel(
    x_ptr, q_ptr, scale_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr, USE_PDL: tl.constexpr
):
    pdl_prologue(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    scale = tl.load(scale_ptr)
    x = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
    tl.store(q_ptr + row * stride_q + offs, quantize_fp8(x, fp8_inv_scale(scale)), mask=offs < K)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """View x as [rows, last_dim] with a unit inner stride."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def per_token_quant_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (x_fp8 [..., K], scale float32 [..., 1]); matches ref_per_token_quant_fp8 bit for bit."""
    x2 = _rows(x)
    M, K = x2.shape
    q = torch.empty((M, K), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    if M > 0:
        _per_token_quant_kernel[(M,)](
            x2, q, scale, K, x2.stride(0), q.stride(0), **row_launch(K), **pdl_kwargs(x2.device, M)
        )
    return q.view(x.shape), scale.view(*x.shape[:-1], 1)


def static_quant_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] * (1 / scale) (float32 [1]) -> x_fp8 [..., K]; matches ref_static_quant_fp8 bit for bit."""
    if scale.numel() != 1:
        raise ValueError(f"static_quant_fp8 takes one float32 scale, got shape {tuple(scale.shape)}")
    x2 = _rows(x)
    M, K = x2.shape
    q = torch.empty((M, K), dtype=FP8_DTYPE, device=x.device)
    if M > 0:
        block = min(next_power_of_2(K), 2048)
        grid = (M, cdiv(K, block))
        _static_quant_kernel[grid](
            x2,
            q,
            scale.float(),
            K,
            x2.stride(0),
            q.stride(0),
            BLOCK=block,
            num_warps=4,
            **pdl_kwargs(x2.device, M),
        )
    return q.view(x.shape)


# ----------------------------------------------------------------------------------------------------------
# Skinny FP8 GEMM (decode)
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _prefetch_l2(ptrs):
    # prefetch.global.L2 per address (a hint: no register result, no fault on the fetched line)
    tl.inline_asm_elementwise(
        "mov.u32 $0, 0; prefetch.global.L2 [$1];", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def _gemv_store(acc, acc_up, out_ptrs, mask, amax_ptr, offs_m, M, pid_n, NUM_AMAX, GATED: tl.constexpr):
    out_dtype = out_ptrs.dtype.element_ty
    if GATED:
        # The SiLU-mul kernel's input is the bf16 (out dtype) gate/up output: round both halves first.
        y = silu_mul(acc.to(out_dtype).to(tl.float32), acc_up.to(out_dtype).to(tl.float32), out_dtype)
        tl.store(out_ptrs, y.to(out_dtype), mask=mask)
        # This tile's share of each row's amax; the consumer reduces a row's NUM_AMAX pieces to its scale.
        tile_amax = tl.max(tl.where(mask, tl.abs(y), 0.0), axis=0)
        tl.store(amax_ptr + offs_m.to(tl.int64) * NUM_AMAX + pid_n, tile_amax, mask=offs_m < M)
    else:
        tl.store(out_ptrs, acc.to(out_dtype), mask=mask)


@triton.jit
def _gemv_prefetch(w_ptr, rows_n, up_offset, stride_wn, k_begin, k_end, PREFETCH_LINES: tl.constexpr,
                   GATED: tl.constexpr):  # fmt: skip
    # the first PREFETCH_LINES 128-byte lines of each of the rows' range [k_begin, k_end) into L2
    if PREFETCH_LINES > 0:
        offs_p = tl.minimum(k_begin + tl.arange(0, PREFETCH_LINES) * 128, k_end - 1)
        _prefetch_l2(w_ptr + rows_n[:, None] * stride_wn + offs_p[None, :])
        if GATED:
            _prefetch_l2(w_ptr + up_offset + rows_n[:, None] * stride_wn + offs_p[None, :])


@triton.jit
def _gemv_w_scales(w_scale_ptr, rows_n, N, W_SCALE_PER_CHANNEL: tl.constexpr, GATED: tl.constexpr):
    if W_SCALE_PER_CHANNEL:
        w_scale = tl.load(w_scale_ptr + rows_n)[:, None]
        w_scale_up = tl.load(w_scale_ptr + N + rows_n)[:, None] if GATED else w_scale
    else:
        w_scale = tl.load(w_scale_ptr)
        w_scale_up = w_scale
    return w_scale, w_scale_up


@triton.jit
def _gemv_x_scales(x_scale_ptr, rows_m, NUM_AMAX, X_SCALE_PER_ROW: tl.constexpr, QUANT_X: tl.constexpr,
                   BLOCK_AMAX: tl.constexpr):  # fmt: skip
    """(x_scale, 1 / x_scale): x's per-row or per-tensor scale, or with QUANT_X each row's scale from the
    max of its NUM_AMAX amax pieces (the bits per_token_quant_fp8 would give)."""
    if QUANT_X:
        offs_a = tl.arange(0, BLOCK_AMAX)
        pieces = tl.load(
            x_scale_ptr + rows_m[:, None] * NUM_AMAX + offs_a[None, :],
            mask=offs_a[None, :] < NUM_AMAX,
            other=0.0,
        )
        x_scale = fp8_scale_from_amax(tl.max(pieces, axis=1))
        x_inv_scale = fp8_inv_scale(x_scale)
    else:
        x_scale = tl.load(x_scale_ptr + rows_m)[None, :] if X_SCALE_PER_ROW else tl.load(x_scale_ptr)
        x_inv_scale = 0.0  # unused
    return x_scale, x_inv_scale


@triton.jit
def _gemv_k_range(
    w_ptr, x_ptr, rows_n, rows_m, up_offset, stride_wn, stride_xm, k_begin, k_end, x_inv_scale,
    EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    MAX_IMPRECISE_ACC: tl.constexpr, GATED: tl.constexpr, QUANT_X: tl.constexpr,
):  # fmt: skip
    """W[rows_n, k_begin:k_end] @ X[rows_m, k_begin:k_end]^T as float32 [BLOCK_N, BLOCK_M] (and the up rows'
    product when GATED). k_begin is a multiple of BLOCK_K; only a range ending at K itself (not EVEN_K) can
    end inside a block."""
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows_n[:, None] * stride_wn + (k_begin + offs_k)[None, :]
    x_ptrs = x_ptr + rows_m[:, None] * stride_xm + (k_begin + offs_k)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k in range(k_begin, k_end, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs)
        else:
            k_mask = (k + offs_k) < k_end
            w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
        if QUANT_X:
            x = quantize_fp8(x.to(tl.float32), x_inv_scale[:, None])
        # Hopper's fp8 MMA adds into a reduced-precision accumulator; Triton's default lets it run over the
        # whole K (errors ~1e-3 relative). MAX_IMPRECISE_ACC = 32 moves the partial sums into the float32
        # accumulator after every MMA k-step, as cuBLAS does without fast accumulation.
        acc = tl.dot(w, tl.trans(x), acc, max_num_imprecise_acc=MAX_IMPRECISE_ACC)
        if GATED:
            if EVEN_K:
                w_up = tl.load(w_ptrs + up_offset)
            else:
                w_up = tl.load(w_ptrs + up_offset, mask=k_mask[None, :], other=0.0)
            acc_up = tl.dot(w_up, tl.trans(x), acc_up, max_num_imprecise_acc=MAX_IMPRECISE_ACC)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    return acc, acc_up


@triton.jit
def _gemv_apply_scales(acc, acc_up, w_scale, w_scale_up, x_scale, QUANT_X: tl.constexpr):
    # Scales factor out of the K sum, so they are applied once, to the accumulator.
    acc *= w_scale
    acc_up *= w_scale_up
    if QUANT_X:
        acc *= x_scale[None, :]
        acc_up *= x_scale[None, :]
    else:
        acc *= x_scale
        acc_up *= x_scale
    return acc, acc_up


@triton.jit
def _fp8_gemv_kernel(
    x_ptr, x_scale_ptr, w_ptr, w_scale_ptr, out_ptr, partial_ptr, counter_ptr, amax_ptr,
    M, N, K, K_PER_SPLIT, SLICE_STRIDE, NUM_AMAX,
    stride_xm, stride_wn, stride_om,
    X_SCALE_PER_ROW: tl.constexpr,
    W_SCALE_PER_CHANNEL: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    MAX_IMPRECISE_ACC: tl.constexpr,
    PREFETCH_LINES: tl.constexpr,
    GATED: tl.constexpr,
    QUANT_X: tl.constexpr,
    BLOCK_AMAX: tl.constexpr,
    USE_PDL: tl.constexpr,
    ts_ptr=None,  # TIMESTAMPS: int64 [programs, 8] phase times (kernels/timeline.py)
    TIMESTAMPS: tl.constexpr = False,
):  # fmt: skip
    # Program (pid_n, pid_m, pid_k) computes out[BLOCK_M rows, BLOCK_N cols] over the K slice pid_k.
    # The product is formed transposed, W_tile [BLOCK_N, BLOCK_K] @ X_tile^T [BLOCK_K, BLOCK_M], so the
    # weight tile sits on the MMA's M side and the few tokens on its N side (16): fp8 tensor-core MMAs
    # (wgmma) with both operands K-major, no conversion of the weights. Each weight row segment is BLOCK_K
    # contiguous bytes (>= 128: whole 16-byte vectors). Floor: N * K bytes of weights over memory
    # bandwidth (x and out are M * (K + 2N) bytes, noise for M <= 16): 16.8 MB at 3.35 TB/s = 5 us for
    # a 4096x4096 matrix. Under CUDA graphs on an H100 it reaches 57-86% of the measured copy bandwidth
    # (the small matrices pay the launch and pipeline ramp most).
    # GATED (fused gate/up + SiLU-mul): the weight has 2N rows, gate [0, N) and up [N, 2N); the program
    # also multiplies the up rows matching its gate rows and stores silu(gate) * up [M, N] plus its
    # tile's row maxima amax[M, pid_n]. QUANT_X: x is unquantized (e.g. that SiLU-mul output) and each
    # row's per-token scale comes from the max of its NUM_AMAX pieces in x_scale_ptr; the program
    # quantizes x to FP8 as it loads it, with the bits per_token_quant_fp8 would give.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    prog = (pid_k * tl.num_programs(1) + pid_m) * tl.num_programs(0) + pid_n
    stamp(ts_ptr, prog, 0, TIMESTAMPS)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # Out-of-range rows of the last tile re-read valid rows (no mask on the hot weight stream); the
    # store below drops them.
    rows_n = (offs_n % N).to(tl.int64)
    rows_m = (offs_m % M).to(tl.int64)
    up_offset = N.to(tl.int64) * stride_wn  # GATED: from a gate row to its up row
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    # The weights and their scales are never written by an earlier kernel, so they may be touched before
    # the PDL wait: an L2 prefetch of the first lines while the previous kernel (often a one-program norm
    # or quantize) still runs, and the scales, which are then not a dependent round trip in the epilogue.
    _gemv_prefetch(w_ptr, rows_n, up_offset, stride_wn, k_begin, k_end, PREFETCH_LINES, GATED)
    w_scale, w_scale_up = _gemv_w_scales(w_scale_ptr, rows_n, N, W_SCALE_PER_CHANNEL, GATED)
    pdl_prologue(USE_PDL)
    stamp(ts_ptr, prog, 1, TIMESTAMPS)
    # the activation scales (written by the previous kernel) right after the wait
    x_scale, x_inv_scale = _gemv_x_scales(x_scale_ptr, rows_m, NUM_AMAX, X_SCALE_PER_ROW, QUANT_X, BLOCK_AMAX)
    acc, acc_up = _gemv_k_range(
        w_ptr, x_ptr, rows_n, rows_m, up_offset, stride_wn, stride_xm, k_begin, k_end, x_inv_scale,
        EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, MAX_IMPRECISE_ACC, GATED, QUANT_X,
    )  # fmt: skip
    acc, acc_up = _gemv_apply_scales(acc, acc_up, w_scale, w_scale_up, x_scale, QUANT_X)
    stamp(ts_ptr, prog, 2, TIMESTAMPS)

    out_ptrs = out_ptr + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None]
    mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    if SPLIT_K == 1:
        _gemv_store(acc, acc_up, out_ptrs, mask, amax_ptr, offs_m, M, pid_n, NUM_AMAX, GATED)
        stamp(ts_ptr, prog, 3, TIMESTAMPS)
    else:
        # Split-K fix-up inside this launch (no memset or cast kernels around it): each K slice stores its
        # float32 partial tile and bumps the tile's arrival counter; the last slice to arrive sums the
        # SPLIT_K partials in slice order (deterministic), writes the output and re-arms the counter.
        # Partials are [SPLIT_K, M, weight rows]: GATED keeps the up half at column offset N.
        w_rows = 2 * N if GATED else N
        partial_ptrs = partial_ptr + offs_m[None, :].to(tl.int64) * w_rows + offs_n[:, None]
        tl.store(partial_ptrs + pid_k.to(tl.int64) * SLICE_STRIDE, acc, mask=mask)
        if GATED:
            tl.store(partial_ptrs + N + pid_k.to(tl.int64) * SLICE_STRIDE, acc_up, mask=mask)
        tl.debug_barrier()  # every thread's partial is stored before the release below
        tile = pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel")
        stamp(ts_ptr, prog, 3, TIMESTAMPS)
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            total_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for _ in tl.static_range(SPLIT_K):
                total += tl.load(partial_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
                if GATED:
                    total_up += tl.load(partial_ptrs + N, mask=mask, other=0.0, cache_modifier=".cg")
                partial_ptrs += SLICE_STRIDE
            _gemv_store(total, total_up, out_ptrs, mask, amax_ptr, offs_m, M, pid_n, NUM_AMAX, GATED)
            tl.atomic_xchg(counter_ptr + tile, 0, sem="relaxed")
            stamp(ts_ptr, prog, 4, TIMESTAMPS)


@triton.jit
def _fp8_gemv_stream_k_kernel(
    x_ptr, x_scale_ptr, w_ptr, w_scale_ptr, out_ptr, partial_ptr, counter_ptr, amax_ptr,
    M, N, K, NUM_AMAX,
    stride_xm, stride_wn, stride_om,
    MAX_CONTRIB: tl.constexpr,
    X_SCALE_PER_ROW: tl.constexpr,
    W_SCALE_PER_CHANNEL: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    MAX_IMPRECISE_ACC: tl.constexpr,
    PREFETCH_LINES: tl.constexpr,
    GATED: tl.constexpr,
    QUANT_X: tl.constexpr,
    BLOCK_AMAX: tl.constexpr,
    USE_PDL: tl.constexpr,
    ts_ptr=None,  # TIMESTAMPS: int64 [programs, 8] phase times (kernels/timeline.py)
    TIMESTAMPS: tl.constexpr = False,
):  # fmt: skip
    # _fp8_gemv_kernel's product with a stream-K split (Osama et al., 2023): the work is the tile-major list
    # of (output tile, BLOCK_K chunk) iterations, and each of the grid's programs takes one contiguous, equal
    # share of it (within one iteration), so every SM streams the same bytes and no second wave of programs
    # runs on a few SMs while the rest idle (a split-K grid rounds its tiles x slices to whole waves). A
    # tile whose iterations span several programs is finished like a split-K tile: each stores its float32
    # partial in the tile's slot for it and bumps the tile's arrival counter; the last to arrive sums the
    # partials in program order (deterministic) and stores the output.
    pid = tl.program_id(0)
    stamp(ts_ptr, pid, 0, TIMESTAMPS)
    num_programs = tl.num_programs(0)
    k_chunks = tl.cdiv(K, BLOCK_K)
    tiles_n = tl.cdiv(N, BLOCK_N)
    total = tiles_n * tl.cdiv(M, BLOCK_M) * k_chunks
    it_begin = pid * total // num_programs
    it_end = (pid + 1) * total // num_programs
    first_tile = it_begin // k_chunks
    last_tile = (it_end - 1) // k_chunks
    up_offset = N.to(tl.int64) * stride_wn  # GATED: from a gate row to its up row
    # before the PDL wait: the first lines of the first tile's share (the weights are constants)
    rows_first = ((first_tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    k_first = (it_begin - first_tile * k_chunks) * BLOCK_K
    _gemv_prefetch(w_ptr, rows_first.to(tl.int64), up_offset, stride_wn, k_first, K, PREFETCH_LINES, GATED)
    pdl_prologue(USE_PDL)
    stamp(ts_ptr, pid, 1, TIMESTAMPS)
    tile_m = tl.arange(0, BLOCK_M)
    tile_n = tl.arange(0, BLOCK_N)
    SLOT_WIDTH: tl.constexpr = 2 * BLOCK_N if GATED else BLOCK_N  # a partial slot: [BLOCK_M, SLOT_WIDTH]
    slot_ptrs = partial_ptr + tile_m[None, :] * SLOT_WIDTH + tile_n[:, None]
    for tile in range(first_tile, last_tile + 1):
        pid_m = tile // tiles_n
        pid_n = tile - pid_m * tiles_n
        offs_n = pid_n * BLOCK_N + tile_n
        offs_m = pid_m * BLOCK_M + tile_m
        rows_n = (offs_n % N).to(tl.int64)
        rows_m = (offs_m % M).to(tl.int64)
        tile_it = tile * k_chunks
        chunk_begin = tl.maximum(it_begin - tile_it, 0)
        chunk_end = tl.minimum(it_end - tile_it, k_chunks)
        w_scale, w_scale_up = _gemv_w_scales(w_scale_ptr, rows_n, N, W_SCALE_PER_CHANNEL, GATED)
        x_scale, x_inv_scale = _gemv_x_scales(
            x_scale_ptr, rows_m, NUM_AMAX, X_SCALE_PER_ROW, QUANT_X, BLOCK_AMAX
        )
        acc, acc_up = _gemv_k_range(
            w_ptr, x_ptr, rows_n, rows_m, up_offset, stride_wn, stride_xm, chunk_begin * BLOCK_K,
            tl.minimum(chunk_end * BLOCK_K, K), x_inv_scale,
            EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, MAX_IMPRECISE_ACC, GATED, QUANT_X,
        )  # fmt: skip
        acc, acc_up = _gemv_apply_scales(acc, acc_up, w_scale, w_scale_up, x_scale, QUANT_X)
        out_ptrs = out_ptr + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None]
        mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
        if chunk_begin == 0 and chunk_end == k_chunks:  # the whole tile in this program
            _gemv_store(acc, acc_up, out_ptrs, mask, amax_ptr, offs_m, M, pid_n, NUM_AMAX, GATED)
        else:
            # the programs holding the tile's first and last iterations (program p starts at p * total // P)
            first_prog = ((tile_it + 1) * num_programs - 1) // total
            last_prog = ((tile_it + k_chunks) * num_programs - 1) // total
            # < 2**31 elements: tiles x MAX_CONTRIB slots of BLOCK_M x SLOT_WIDTH floats (the launcher checks)
            tile_slots = slot_ptrs + tile * (MAX_CONTRIB * BLOCK_M * SLOT_WIDTH)
            my_slot = tile_slots + (pid - first_prog) * (BLOCK_M * SLOT_WIDTH)
            tl.store(my_slot, acc)
            if GATED:
                tl.store(my_slot + BLOCK_N, acc_up)
            tl.debug_barrier()  # every thread's partial is stored before the release below
            arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel")
            if arrived == last_prog - first_prog:
                # unrolled over the most pieces a tile can have, the absent ones masked: the slots' loads are
                # issued together, not one L2 round trip after another
                total_acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                total_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                for c in tl.static_range(MAX_CONTRIB):
                    slot = tile_slots + c * (BLOCK_M * SLOT_WIDTH)
                    present = tl.full((BLOCK_N, BLOCK_M), c, tl.int32) <= last_prog - first_prog
                    total_acc += tl.load(slot, mask=present, other=0.0, cache_modifier=".cg")
                    if GATED:
                        total_up += tl.load(slot + BLOCK_N, mask=present, other=0.0, cache_modifier=".cg")
                _gemv_store(total_acc, total_up, out_ptrs, mask, amax_ptr, offs_m, M, pid_n, NUM_AMAX, GATED)
                tl.atomic_xchg(counter_ptr + tile, 0, sem="relaxed")
    stamp(ts_ptr, pid, 3, TIMESTAMPS)


# Arrival counters for in-launch fix-ups (fp8_gemv's split-K, decode attention's merge), one int32 per
# output tile, per device and user. They are zero between launches (each launch re-arms the ones it used),
# so a buffer is allocated and zeroed once, not per call. Like a cuBLAS workspace it assumes launches of
# one user on one device do not overlap on different streams. A buffer that grows is kept alive: CUDA
# graphs captured earlier still point at it.
_counters: dict[tuple[torch.device, str], torch.Tensor] = {}
_retired_counters: list[torch.Tensor] = []


def tile_counters(device: torch.device, num_tiles: int, user: str = "fp8_gemv") -> torch.Tensor:
    counters = _counters.get((device, user))
    if counters is None or counters.numel() < num_tiles:
        if counters is not None:
            _retired_counters.append(counters)
        counters = torch.zeros(max(num_tiles, 4096), dtype=torch.int32, device=device)
        _counters[(device, user)] = counters
    return counters


# Batch-1 configs measured best per weight shape (N, K) on an H100 (benchmarks/tune_gemv.py,
# benchmarks/results/tune-gemv-h100.json: 21 configs per matrix, cold weights, in CUDA graphs); shapes
# not listed use the rule in fp8_gemv_config. Llama-2-7B / Llama-2-70B decode matrices at TP=1. They serve
# every M up to GEMV_TUNED_MAX_M: one 16-token tile (BLOCK_M 16) streams the same weight bytes through the
# same programs for 1 token as for 16 (HOPPERLLM_GEMV_TUNED_MAX_M=1 keeps them to batch 1, as before v18).
GEMV_TUNED_MAX_M = int(os.environ.get("HOPPERLLM_GEMV_TUNED_MAX_M", "16"))
# Entries with a sixth field launch stream-K (that many programs an SM; HOPPERLLM_GEMV_STREAM_K=0 runs their
# split-K config instead). GEMV_STREAM_K_TUNED: stream-K launches that beat the split-K configs on one H200,
# as single kernels (the long gate/up streams and the 7B's qkv, where split-K grids leave SMs idle or run a
# short second wave; small matrices lose to the fix-up) and end to end (v23 in docs/perf-notes.md: Llama-2-7B
# TPOT 3.25 -> 3.10 ms, Llama-3-8B 3.23 -> 3.16). They go in front of GEMV_TUNED by default;
# HOPPERLLM_GEMV_STREAM_K=0 keeps to GEMV_TUNED's split-K configs (the 7B's 128-row gate/up tile also turns
# on the fused SiLU-mul launch, silu_mul_fusion_pays).
GEMV_STREAM_K = os.environ.get("HOPPERLLM_GEMV_STREAM_K", "auto")
GEMV_STREAM_K_TUNED: dict[tuple[int, int], tuple[int, ...]] = {
    (12288, 4096): (128, 256, 1, 4, 8, 1),  # 7B qkv: 16.5 us vs 19.8 (H100 config), 128-row split-K 17.5
    (22016, 4096): (128, 256, 1, 4, 8, 1),  # 7B gate_up, unfused: 26.6 vs 28.7
    (28672, 4096): (128, 256, 1, 4, 8, 1),  # 8B gate_up, fused: 34.4 vs 35.8
    (7168, 8192): (128, 256, 4, 4, 8, 1),  # 70B TP=8 gate_up, fused: 20.1 vs 21.8
    # one rank of the 70B at TP=2 and TP=4 (tune-gemv-stream-k-70b-tp2-tp4-h200-v23.json, fused MLP launches)
    (28672, 8192): (128, 256, 1, 4, 8, 1),  # TP=2 gate_up: 61.1 vs 62.3
    (14336, 8192): (128, 256, 2, 4, 8, 1),  # TP=4 gate_up: 33.4 vs 36.9
    (8192, 7168): (128, 256, 4, 3, 8, 1),  # TP=4 down, quantizing its input: 20.5 vs 21.9
    (2560, 8192): (64, 256, 4, 4, 4, 2),  # TP=4 qkv: 10.1 vs 10.7
}
GEMV_TUNED: dict[tuple[int, int], tuple[int, ...]] = {
    # (N, K): (BLOCK_N, BLOCK_K, SPLIT_K, num_stages, num_warps[, stream-K programs an SM: SPLIT_K unused])
    (12288, 4096): (32, 512, 1, 4, 4),  # 7B qkv: 21.4 us vs 23.5 with the rule
    (22016, 4096): (64, 512, 1, 4, 8),  # 7B gate_up: 35.5 vs 36.1
    (10240, 8192): (128, 256, 4, 6, 8),  # 70B qkv: 34.4 vs 35.4
    (57344, 8192): (128, 256, 1, 4, 8),  # 70B gate_up: 157.2 vs 160.1
    (8192, 28672): (128, 256, 4, 4, 8),  # 70B down: 82.3 vs 82.8
    # Llama-2-7B's down and Llama-3-8B's matrices, tuned on one H200 as the three-launch MLP runs them
    # (tune-gemv-7b-8b-splitk-h200-v22.json, explicit split-K sweep). The 7B qkv / gate_up keep their H100
    # configs (H200: 17.5 / 28.6 us with 128-row tiles against 19.8 / 28.8); square o stays with the rule
    # (7.2 vs 7.3).
    (4096, 11008): (128, 256, 4, 4, 8),  # 7B down: 14.0 vs 14.7 with the rule
    (6144, 4096): (128, 256, 2, 4, 4),  # 8B qkv: 11.1 vs 13.2
    (28672, 4096): (128, 256, 1, 4, 8),  # 8B gate_up: 33.3 vs 38.0 (128-row tiles: fused with SiLU-mul)
    (4096, 14336): (128, 256, 4, 4, 8),  # 8B down: 17.2 vs 18.8
    # one rank of the 70B at tensor_parallel_size 2, tuned on an H200 (tune-gemv-70b-tp2-h200.json; qkv, o
    # and down with explicit split-K and the fused MLP launches: tune-gemv-70b-tp2-splitk-h200.json)
    (28672, 8192): (128, 256, 1, 4, 8),  # gate_up: 60.4 us vs 65.4 with the rule (fused: 62.2)
    (8192, 14336): (128, 256, 2, 4, 8),  # down, quantizing its input (fused MLP): 32.8 vs 37.2 at SPLIT_K 4
    (5120, 8192): (128, 256, 3, 4, 8),  # qkv: 13.9 vs 18.0 with the rule
    (8192, 4096): (128, 256, 2, 4, 8),  # o: 11.2 vs 12.3
    # one rank at tensor_parallel_size 4, tuned on one H200 (tune-gemv-70b-tp4-h200.json, fused MLP launches)
    (14336, 8192): (128, 256, 2, 6, 8),  # gate_up: 37.6 us vs 40.1 with the rule
    (8192, 7168): (128, 256, 4, 4, 8),  # down, quantizing its input: 21.8 vs 22.7
    (2560, 8192): (32, 256, 4, 4, 4),  # qkv: 10.3 vs 11.7
    (8192, 2048): (64, 512, 1, 4, 8),  # o: 6.8 vs 7.7
    # one rank at tensor_parallel_size 8, tuned on one H200 (tune-gemv-70b-tp8-h200.json, fused MLP launches)
    (7168, 8192): (128, 256, 4, 4, 8),  # gate_up: 22.0 us vs 22.3 with the rule
    (8192, 3584): (128, 256, 2, 4, 8),  # down, quantizing its input: 11.3 vs 12.8
    (1280, 8192): (32, 256, 8, 4, 4),  # qkv: 6.4 vs 7.5
    (8192, 1024): (64, 512, 1, 4, 8),  # o: 4.5 vs 5.5
}


def fp8_gemv_config(M: int, N: int, K: int, num_sms: int) -> dict[str, int]:
    """Block sizes and split-K for fp8_gemv (a small explicit table; tune on the GPU with the benchmark).

    Every SM must stream weights. Measured on an H100 (benchmarks/bench_kernels.py --tune) with the
    Llama-2-7B decode matrices: M == 1 runs best on 64-row tiles split along K up to ~1.5 waves of
    programs; M > 1 on 32-row tiles (64 for tall matrices) split only below one wave. A shape in
    GEMV_TUNED takes its tuned config for every M <= 16 (one token tile, the same weight stream).
    """
    block_m = max(16, next_power_of_2(min(M, 64)))
    tuned = None
    if M <= min(GEMV_TUNED_MAX_M, 16):
        tuned = (GEMV_STREAM_K != "0" and GEMV_STREAM_K_TUNED.get((N, K))) or GEMV_TUNED.get((N, K))
    if tuned is not None:
        bn, bk, sk, st, nw, *stream_k = tuned
        cfg = {"BLOCK_M": block_m, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": nw,
               "num_stages": st, "MAX_IMPRECISE_ACC": 32}  # fmt: skip
        if stream_k and GEMV_STREAM_K != "0":  # programs an SM
            cfg["STREAM_K"] = stream_k[0] * num_sms
        return cfg
    block_k = 256
    if M == 1:
        block_n, waves, min_chunks_per_slice = 64, 1.5, 4
    else:
        block_n, waves, min_chunks_per_slice = (32 if N <= 16384 else 64), 1.0, 8
    tiles = cdiv(N, block_n) * cdiv(M, block_m)
    k_chunks = cdiv(K, block_k)
    split_k = 1
    while tiles * split_k < waves * num_sms and k_chunks >= min_chunks_per_slice * 2 * split_k:
        split_k *= 2
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_K": block_k,
        "SPLIT_K": split_k,
        "num_warps": 4,
        "num_stages": 4,
        "MAX_IMPRECISE_ACC": 32,
    }


def _check_weight(w_fp8: torch.Tensor, w_scale: torch.Tensor) -> None:
    if w_fp8.dtype != FP8_DTYPE or w_fp8.dim() != 2 or w_fp8.stride(1) != 1:
        raise ValueError(
            f"w_fp8 must be a row-major float8_e4m3fn [N, K] matrix, got {w_fp8.dtype} "
            f"{tuple(w_fp8.shape)} strides {w_fp8.stride()}"
        )
    if w_scale.numel() not in (1, w_fp8.shape[0]):
        raise ValueError(f"w_scale must have 1 or N={w_fp8.shape[0]} elements, got {tuple(w_scale.shape)}")


class DeferredQuant(NamedTuple):
    """An activation its consumer quantizes to FP8 per token while loading it (fp8_gemv_silu_mul's output,
    fp8_gemv_deferred's input): `values` [M, K] and `amax_parts` float32 [M, C], pieces of each row's
    max |value| (the row's per-token scale is max(amax_parts[m]) / 448, as per_token_quant_fp8 computes)."""

    values: torch.Tensor
    amax_parts: torch.Tensor


def ref_fp8_gemv_silu_mul(x_fp8, x_scale, w_fp8, w_scale, out_dtype=torch.bfloat16) -> DeferredQuant:
    """The unfused meaning of fp8_gemv_silu_mul: the gate/up GEMM in out_dtype, then SiLU-mul."""
    from hopperllm.kernels.activation import ref_silu_and_mul

    y = ref_silu_and_mul(ref_fp8_matmul(x_fp8, x_scale, w_fp8, w_scale, out_dtype))
    return DeferredQuant(y, y.float().abs().amax(dim=-1, keepdim=True))


def _check_x_fp8(x_fp8: torch.Tensor, x_scale: torch.Tensor, K: int) -> None:
    if x_fp8.dim() != 2 or x_fp8.dtype != FP8_DTYPE or x_fp8.stride(1) != 1:
        raise ValueError(
            f"x_fp8 must be a float8_e4m3fn [M, K] matrix with unit inner stride, got "
            f"{x_fp8.dtype} {tuple(x_fp8.shape)}"
        )
    if x_fp8.shape[1] != K:
        raise ValueError(f"x_fp8 has K={x_fp8.shape[1]} but w_fp8 has K={K}")
    if x_scale.numel() not in (1, x_fp8.shape[0]):
        raise ValueError(f"x_scale must have 1 or M={x_fp8.shape[0]} elements, got {tuple(x_scale.shape)}")


def _gemv_num_sms(device: torch.device) -> int:
    """The SM count fp8_gemv_config plans for (an H100's 132 off the GPU, where the interpreter runs)."""
    return num_sms(device, default=132)


# Shared memory a GEMV program may take for its pipeline stages (an H100 / H200 SM has 227 KB).
_GEMV_SMEM_BYTES = 200 * 1024


def gated_config(cfg: dict[str, int]) -> dict[str, int]:
    """The fused gate/up launch's config from the unfused GEMV's. A program streams BLOCK_N / 2 gate rows
    and as many up rows (the unfused tile's bytes) while that leaves >= 64 rows (wgmma MMAs, as the
    unfused tile); a 64-row unfused tile keeps 64 gate rows and doubles SPLIT_K instead (as many programs
    with as many bytes each). Stages are cut to what fits in shared memory."""
    g = dict(cfg)
    if cfg["BLOCK_N"] == 64:
        g["SPLIT_K"] = cfg["SPLIT_K"] * 2
    else:
        g["BLOCK_N"] = max(cfg["BLOCK_N"] // 2, 16)
    per_stage = (2 * g["BLOCK_N"] + g["BLOCK_M"]) * g["BLOCK_K"]
    while g["num_stages"] > 2 and g["num_stages"] * per_stage > _GEMV_SMEM_BYTES:
        g["num_stages"] -= 1
    return g


def _launch_fp8_gemv(x, x_scale, w_fp8, w_scale, out_dtype, config, gated=False, quant_x=False):
    """The launcher behind fp8_gemv, fp8_gemv_silu_mul and fp8_gemv_deferred (inputs already checked).
    Returns out [M, N] (N = weight rows, or half of them when gated) and, when gated, its amax pieces."""
    M, K = x.shape
    N = w_fp8.shape[0] // 2 if gated else w_fp8.shape[0]
    device = x.device
    cfg = {**fp8_gemv_config(M, w_fp8.shape[0], K, _gemv_num_sms(device)), **(config or {})}
    if gated:
        cfg = gated_config(cfg)
    if not x.is_cuda:
        cfg["PREFETCH_LINES"] = 0  # inline PTX: GPU only
    else:
        cfg.setdefault("PREFETCH_LINES", GEMV_PREFETCH_LINES)
    split_k = cfg.pop("SPLIT_K")
    stream_k = cfg.pop("STREAM_K", 0)
    if stream_k:
        return _launch_fp8_gemv_stream_k(x, x_scale, w_fp8, w_scale, out_dtype, cfg, stream_k, gated, quant_x)
    block_k = cfg["BLOCK_K"]
    k_per_split = cdiv(cdiv(K, block_k), split_k) * block_k
    split_k = cdiv(K, k_per_split)  # no empty K slices
    out = torch.empty((M, N), dtype=out_dtype, device=device)
    grid = (cdiv(N, cfg["BLOCK_N"]), cdiv(M, cfg["BLOCK_M"]), split_k)
    if split_k > 1:
        partials = torch.empty((split_k, M, w_fp8.shape[0]), dtype=torch.float32, device=device)
        counters = tile_counters(device, grid[0] * grid[1])
    else:
        partials = counters = out  # unused
    amax = torch.empty((M, grid[0]), dtype=torch.float32, device=device) if gated else out
    num_amax = grid[0] if gated else (x_scale.shape[-1] if quant_x else 1)
    ts = timeline.buffer("fp8_gemv", grid[0] * grid[1] * grid[2], device, M=M, N=w_fp8.shape[0], K=K,
                         gated=gated, split_k=split_k)  # fmt: skip
    _fp8_gemv_kernel[grid](
        x, x_scale.float(), w_fp8, w_scale.float(), out, partials, counters, amax,
        M, N, K, k_per_split, M * w_fp8.shape[0], num_amax,
        x.stride(0), w_fp8.stride(0), out.stride(0),
        X_SCALE_PER_ROW=x_scale.numel() != 1,
        W_SCALE_PER_CHANNEL=w_scale.numel() != 1,
        SPLIT_K=split_k,
        EVEN_K=K % block_k == 0,
        GATED=gated,
        QUANT_X=quant_x,
        BLOCK_AMAX=next_power_of_2(num_amax) if quant_x else 1,
        **cfg,
        **pdl_kwargs(device),
        **({} if ts is None else {"ts_ptr": ts, "TIMESTAMPS": True}),
    )  # fmt: skip
    return (out, amax) if gated else out


def _launch_fp8_gemv_stream_k(x, x_scale, w_fp8, w_scale, out_dtype, cfg, programs, gated, quant_x):
    """_launch_fp8_gemv's stream-K launch: `programs` programs (at most one a tile x K-chunk iteration)."""
    M, K = x.shape
    N = w_fp8.shape[0] // 2 if gated else w_fp8.shape[0]
    device = x.device
    tiles_n = cdiv(N, cfg["BLOCK_N"])
    tiles = tiles_n * cdiv(M, cfg["BLOCK_M"])
    k_chunks = cdiv(K, cfg["BLOCK_K"])
    programs = min(programs, tiles * k_chunks)
    # a tile's k_chunks iterations meet at most this many programs (each takes >= total // programs)
    max_contrib = min(programs, cdiv(k_chunks, tiles * k_chunks // programs) + 1)
    slot_width = cfg["BLOCK_N"] * (2 if gated else 1)
    partials = torch.empty(
        (tiles * max_contrib, cfg["BLOCK_M"], slot_width), dtype=torch.float32, device=device
    )
    if partials.numel() >= 2**31:
        raise ValueError(
            f"stream-K fp8_gemv: {partials.numel()} partial floats need 64-bit offsets; use split-K"
        )
    counters = tile_counters(device, tiles)
    out = torch.empty((M, N), dtype=out_dtype, device=device)
    amax = torch.empty((M, tiles_n), dtype=torch.float32, device=device) if gated else out
    num_amax = tiles_n if gated else (x_scale.shape[-1] if quant_x else 1)
    ts = timeline.buffer("fp8_gemv_stream_k", programs, device, M=M, N=w_fp8.shape[0], K=K, gated=gated)
    _fp8_gemv_stream_k_kernel[(programs,)](
        x, x_scale.float(), w_fp8, w_scale.float(), out, partials, counters, amax,
        M, N, K, num_amax,
        x.stride(0), w_fp8.stride(0), out.stride(0),
        MAX_CONTRIB=max_contrib,
        X_SCALE_PER_ROW=x_scale.numel() != 1,
        W_SCALE_PER_CHANNEL=w_scale.numel() != 1,
        EVEN_K=K % cfg["BLOCK_K"] == 0,
        GATED=gated,
        QUANT_X=quant_x,
        BLOCK_AMAX=next_power_of_2(num_amax) if quant_x else 1,
        **cfg,
        **pdl_kwargs(device),
        **({} if ts is None else {"ts_ptr": ts, "TIMESTAMPS": True}),
    )  # fmt: skip
    return (out, amax) if gated else out


def fp8_gemv(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    config: dict[str, int] | None = None,
    *,
    silu_mul: bool = False,
) -> torch.Tensor | DeferredQuant:
    """x_fp8 [M, K] (M small), x_scale [M, 1] or [1], w_fp8 [N, K], w_scale [1] or [N] -> [M, N] out_dtype.

    `config` overrides fp8_gemv_config (keys BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages,
    MAX_IMPRECISE_ACC, PREFETCH_LINES, STREAM_K).
    With SPLIT_K > 1 the last K slice of each tile to finish sums the float32 partials (in slice order,
    so results are deterministic) in the same launch. STREAM_K = P > 0 launches P programs that split the
    (tile, BLOCK_K chunk) iterations evenly instead (stream-K; SPLIT_K is then unused), with the same
    in-launch fix-up for tiles that span programs.
    With silu_mul, see fp8_gemv_silu_mul.
    """
    _check_weight(w_fp8, w_scale)
    _check_x_fp8(x_fp8, x_scale, w_fp8.shape[1])
    if not silu_mul:
        if x_fp8.shape[0] == 0:
            return torch.empty((0, w_fp8.shape[0]), dtype=out_dtype, device=x_fp8.device)
        return _launch_fp8_gemv(x_fp8, x_scale, w_fp8, w_scale, out_dtype, config)
    if w_fp8.shape[0] % 2:
        raise ValueError(f"a gate/up weight has an even number of rows, got {w_fp8.shape[0]}")
    if x_fp8.shape[0] == 0:
        empty = torch.empty((0, w_fp8.shape[0] // 2), dtype=out_dtype, device=x_fp8.device)
        return DeferredQuant(empty, torch.zeros((0, 1), dtype=torch.float32, device=x_fp8.device))
    return DeferredQuant(*_launch_fp8_gemv(x_fp8, x_scale, w_fp8, w_scale, out_dtype, config, gated=True))


def silu_mul_fusion_pays(M: int, N: int, K: int, device: torch.device) -> bool:
    """Whether the decode MLP should take fp8_gemv_silu_mul for M tokens and a [N = 2I, K] gate/up weight:
    where the unfused config has tiles of >= 128 rows, so the fused one halves them to >= 64 gate rows, the
    regime measured to pay (Llama-2-70B at TP=1 and 2, batch 1: v15 in docs/perf-notes.md). The 7B / 8B
    shapes and batches (64- or 32-row unfused tiles) keep the three launches until measured
    (HOPPERLLM_FUSED_MLP=2 fuses them too, for that measurement)."""
    return fp8_gemv_config(M, N, K, _gemv_num_sms(device))["BLOCK_N"] >= 128


def fp8_gemv_silu_mul(x_fp8, x_scale, w_fp8, w_scale, *args, **kwargs) -> DeferredQuant:
    """The merged gate/up projection and SiLU-mul in one launch: w_fp8 [2I, K] (gate rows, then up rows)
    -> DeferredQuant(silu(gate) * up [M, I] in out_dtype, amax pieces). The values are the bits of
    silu_and_mul over fp8_gemv's out_dtype output with the same tiles; no FP8 SiLU-mul launch, and
    fp8_gemv_deferred quantizes them for the down projection. Arguments as fp8_gemv's; `config` is the
    unfused GEMV's, from which gated_config derives the fused launch's tiles."""
    return fp8_gemv(x_fp8, x_scale, w_fp8, w_scale, *args, silu_mul=True, **kwargs)


def fp8_gemv_deferred(
    x: DeferredQuant,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """fp8_gemv of per_token_quant_fp8(x.values), quantizing inside the GEMV's loads: the same result as
    the two launches (the same FP8 codes and scales), with one launch."""
    _check_weight(w_fp8, w_scale)
    values, parts = x
    if values.dim() != 2 or values.stride(1) != 1 or values.shape[1] != w_fp8.shape[1]:
        raise ValueError(
            f"deferred values must be a [M, K={w_fp8.shape[1]}] matrix with unit inner stride, got "
            f"{tuple(values.shape)}"
        )
    M = values.shape[0]
    if parts.dim() != 2 or parts.shape[0] != M or parts.dtype != torch.float32:
        raise ValueError(f"amax_parts must be float32 [M={M}, C], got {parts.dtype} {tuple(parts.shape)}")
    if M == 0:
        return torch.empty((0, w_fp8.shape[0]), dtype=out_dtype, device=values.device)
    return _launch_fp8_gemv(values, parts.contiguous(), w_fp8, w_scale, out_dtype, config, quant_x=True)


# ----------------------------------------------------------------------------------------------------------
# FP8 linear: quantize the activation, then the GEMM that suits the shape and device
# ----------------------------------------------------------------------------------------------------------


def scaled_mm(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """torch._scaled_mm (cuBLASLt / CUTLASS) with our scale shapes; needs K and N multiples of 16.

    torch 2.9-2.13 take (a row-major [M, K], b column-major [K, N], scale_a, scale_b, bias, scale_result,
    out_dtype, use_fast_accum) and return one tensor. Scales are either both single-element tensors
    (tensor-wise) or float32 [M, 1] and [1, N] (row-wise). Row-wise produces bfloat16 only, so a mixed
    pair is expanded to row-wise and other output dtypes are cast afterwards.

    Fast FP8 accumulation (no periodic promotion of the tensor-core sums to float32, as vLLM's CUTLASS
    FP8 kernels and TensorRT-LLM run) for K <= FAST_ACCUM_MAX_K, unless HOPPERLLM_FP8_FAST_ACCUM=0.
    """
    M, N = x_fp8.shape[0], w_fp8.shape[0]
    if x_scale.numel() == 1 and w_scale.numel() == 1:
        scale_a = x_scale.float().reshape(())
        scale_b = w_scale.float().reshape(())
        mm_dtype = out_dtype
    else:
        scale_a = x_scale.float().reshape(-1, 1).expand(M, 1).contiguous()
        scale_b = w_scale.float().reshape(1, -1).expand(1, N).contiguous()
        mm_dtype = torch.bfloat16
    fast = FP8_FAST_ACCUM and x_fp8.shape[1] <= FAST_ACCUM_MAX_K
    y = torch._scaled_mm(
        x_fp8, w_fp8.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=mm_dtype, use_fast_accum=fast
    )
    if isinstance(y, tuple):  # torch < 2.5 also returned amax
        y = y[0]
    return y if mm_dtype == out_dtype else y.to(out_dtype)


def fp8_linear(
    x: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    input_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """y = x @ (w_fp8 * w_scale).T + bias with x quantized to FP8 (per token, or static with input_scale).

    CUDA: fp8_gemv for up to GEMV_MAX_M tokens, torch._scaled_mm above (when K, N are multiples of 16).
    CPU (and odd shapes): dequantize both operands to float32 and multiply; this emulation is the
    reference the GPU paths match within float32 accumulation-order rounding.
    """
    _check_weight(w_fp8, w_scale)
    out_dtype = out_dtype or x.dtype
    N, K = w_fp8.shape
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features but the weight expects {K}")
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if x.is_cuda:
        if input_scale is None:
            x_fp8, x_scale = per_token_quant_fp8(x2)
        else:
            x_fp8, x_scale = static_quant_fp8(x2, input_scale), input_scale
        if M <= GEMV_MAX_M:
            y = fp8_gemv(x_fp8, x_scale, w_fp8, w_scale, out_dtype)
        elif K % 16 == 0 and N % 16 == 0:
            y = scaled_mm(x_fp8, x_scale, w_fp8, w_scale, out_dtype)
        else:
            y = ref_fp8_matmul(x_fp8, x_scale, w_fp8, w_scale, out_dtype)
    else:
        y = ref_fp8_linear(x2, w_fp8, w_scale, input_scale, out_dtype)
    if bias is not None:
        y = y + bias.to(out_dtype)
    return y.view(*x.shape[:-1], N)
