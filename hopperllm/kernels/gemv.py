"""Dense (bf16 / fp16 / fp32) GEMV of one row: the LM head at batch 1.

cuBLAS runs y = x W^T with M = 1 and bf16 W at ~1.8 TB/s on an H100 (the issue's measurement); the
Llama-2-70B LM head (32000 x 8192, 524 MB) is then ~0.29 ms of each decode step. This kernel streams W
once, in BLOCK_N-row tiles, accumulating in float32. Larger batches go through F.linear (cuBLAS).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hopperllm.kernels.launch import cdiv
from hopperllm.kernels.pdl import pdl_kwargs, pdl_prologue


def ref_gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [1, K] @ w [N, K]^T in float32, rounded to x's dtype."""
    return (x.float() @ w.float().T).to(x.dtype)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 USE_PDL: tl.constexpr):  # fmt: skip
    # Program n: rows [n * BLOCK_N, (n + 1) * BLOCK_N) of W against x. Floor: N * K * elem bytes of W
    # over memory bandwidth (x is re-read from L2).
    pdl_prologue(USE_PDL)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (offs_n % N).to(tl.int64)  # the last tile re-reads valid rows; the store drops them
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        kk = k + offs_k
        w = tl.load(w_ptr + rows[:, None] * stride_wn + kk[None, :], mask=kk[None, :] < K, other=0.0)
        x = tl.load(x_ptr + kk, mask=kk < K, other=0.0)
        acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    tl.store(out_ptr + offs_n, acc.to(out_ptr.dtype.element_ty), mask=offs_n < N)


def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [1, K] @ w [N, K]^T -> [1, N] in x's dtype (float32 accumulation)."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1] or x.dtype != w.dtype:
        raise ValueError(f"gemv needs x [1, K] and w [N, K] of one dtype, got {tuple(x.shape)} {x.dtype} and "
                         f"{tuple(w.shape)} {w.dtype}")  # fmt: skip
    M, K = x.shape
    N = w.shape[0]
    if M != 1:
        raise ValueError(f"gemv takes one row, got {M} rows")
    x = x.contiguous()
    if w.stride(1) != 1:
        raise ValueError("gemv needs w with a contiguous last dimension")
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    block_n, block_k = (16, 512) if x.is_cuda else (8, 32)
    _gemv_kernel[(cdiv(N, block_n),)](
        x, w, out, N, K, w.stride(0), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
        num_stages=4 if x.is_cuda else 1, **pdl_kwargs(x.device),
    )  # fmt: skip
    return out
