"""Dense (bf16 / fp16 / fp32) GEMV of a few rows: the LM head at decode batch sizes.

cuBLAS runs y = x W^T with M = 1 and bf16 W at ~1.8 TB/s on an H100 (the issue's measurement); the
Llama-2-70B LM head (32000 x 8192, 524 MB) is then ~0.29 ms of each decode step. This kernel streams W
once, in BLOCK_N-row tiles, accumulating in float32: one row with a multiply-and-sum, up to GEMV_MAX_ROWS
rows with one MMA a tile against all of them (the weight bytes are the same, the rows ride along). Larger
batches go through F.linear (cuBLAS).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from hopperllm.kernels.pdl import pdl_kwargs, pdl_prologue


def ref_gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T in float32, rounded to x's dtype."""
    return (x.float() @ w.float().T).to(x.dtype)


# Rows (tokens) one launch takes: a 16-row MMA tile.
GEMV_MAX_ROWS = 16
# (BLOCK_N, BLOCK_K) of the multi-row launch on the GPU; HOPPERLLM_GEMV_ROWS_CONFIG="n,k" for A/B runs.
GEMV_ROWS_CONFIG = tuple(int(v) for v in os.environ.get("HOPPERLLM_GEMV_ROWS_CONFIG", "64,128").split(","))


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                 USE_PDL: tl.constexpr):  # fmt: skip
    # Program n: rows [n * BLOCK_N, (n + 1) * BLOCK_N) of W against the M rows of x. Floor: N * K * elem
    # bytes of W over memory bandwidth (x is re-read from L2).
    pdl_prologue(USE_PDL)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (offs_n % N).to(tl.int64)  # the last tile re-reads valid rows; the store drops them
    offs_k = tl.arange(0, BLOCK_K)
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            kk = k + offs_k
            w = tl.load(w_ptr + rows[:, None] * stride_wn + kk[None, :], mask=kk[None, :] < K, other=0.0)
            x = tl.load(x_ptr + kk, mask=kk < K, other=0.0)
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
        tl.store(out_ptr + offs_n, acc.to(out_ptr.dtype.element_ty), mask=offs_n < N)
    else:
        # W tile [BLOCK_N, BLOCK_K] @ x tile^T [BLOCK_K, BLOCK_M]: the weight on the MMA's M side, the few
        # tokens (padded to BLOCK_M, re-reading row 0) on its N side; float32 accumulation.
        offs_m = tl.arange(0, BLOCK_M)
        xrows = tl.where(offs_m < M, offs_m, 0).to(tl.int64)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            kk = k + offs_k
            w = tl.load(w_ptr + rows[:, None] * stride_wn + kk[None, :], mask=kk[None, :] < K, other=0.0)
            x = tl.load(x_ptr + xrows[:, None] * stride_xm + kk[None, :], mask=kk[None, :] < K, other=0.0)
            if PRECISION == "ieee":  # float32 operands (or the interpreter, whose bf16 dot is wrong)
                w = w.to(tl.float32)
                x = x.to(tl.float32)
            acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
        out_ptrs = out_ptr + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None]
        tl.store(
            out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_n[:, None] < N) & (offs_m[None, :] < M)
        )


def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T -> [M, N] in x's dtype (float32 accumulation), for 1 <= M <= GEMV_MAX_ROWS."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1] or x.dtype != w.dtype:
        raise ValueError(f"gemv needs x [M, K] and w [N, K] of one dtype, got {tuple(x.shape)} {x.dtype} and "
                         f"{tuple(w.shape)} {w.dtype}")  # fmt: skip
    M, K = x.shape
    N = w.shape[0]
    if not 1 <= M <= GEMV_MAX_ROWS:
        raise ValueError(f"gemv takes 1 to {GEMV_MAX_ROWS} rows, got {M} rows")
    x = x.contiguous()
    if w.stride(1) != 1:
        raise ValueError("gemv needs w with a contiguous last dimension")
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 1:
        block_m, (block_n, block_k) = 1, ((16, 512) if x.is_cuda else (8, 32))
    else:  # tl.dot: tiles of at least 16 on every side
        block_m, (block_n, block_k) = 16, (GEMV_ROWS_CONFIG if x.is_cuda else (16, 32))
    precision = "ieee" if x.dtype == torch.float32 or not x.is_cuda else "tf32"  # tf32: ignored for bf16
    _gemv_kernel[(triton.cdiv(N, block_n),)](
        x, w, out, M, N, K, x.stride(0), w.stride(0), out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, PRECISION=precision, num_warps=4, num_stages=4 if x.is_cuda else 1,
        **pdl_kwargs(x.device, M),
    )  # fmt: skip
    return out
