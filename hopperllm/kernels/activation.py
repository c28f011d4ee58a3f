"""SwiGLU activation: silu(gate) * up over the fused gate/up projection output, optionally to FP8."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hopperllm.kernels.fp8 import (
    FP8_DTYPE,
    fp8_inv_scale,
    fp8_scale_from_amax,
    quantize_fp8,
    ref_per_token_quant_fp8,
    row_launch,
    silu_mul,
)
from hopperllm.kernels.launch import cdiv, next_power_of_2
from hopperllm.kernels.pdl import pdl_kwargs, pdl_prologue


def ref_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] -> silu(x[..., :I]) * x[..., I:] (float32 math, rounded to x.dtype)."""
    inter = x.shape[-1] // 2
    gate, up = x[..., :inter].float(), x[..., inter:].float()
    return (gate * torch.sigmoid(gate) * up).to(x.dtype)


def ref_silu_and_mul_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return ref_per_token_quant_fp8(ref_silu_and_mul(x))


@triton.jit
def _silu_and_mul_chunk(x_row, offs, inter):
    """silu(gate) * up for columns offs of one row, rounded to x's dtype, returned in float32."""
    mask = offs < inter
    gate = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + inter + offs, mask=mask, other=0.0).to(tl.float32)
    return silu_mul(gate, up, x_row.dtype.element_ty)


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, inter, stride_x, stride_out, BLOCK: tl.constexpr, USE_PDL: tl.constexpr
):
    pdl_prologue(USE_PDL)
    # Program (row, c) writes columns [c * BLOCK, (c + 1) * BLOCK) of one row.
    # Floor: read 2I and write I elements per row.
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    y = _silu_and_mul_chunk(x_ptr + row * stride_x, offs, inter)
    tl.store(out_ptr + row * stride_out + offs, y.to(out_ptr.dtype.element_ty), mask=offs < inter)


@triton.jit
def _silu_and_mul_fp8_kernel(x_ptr, out_ptr, scale_ptr, inter, stride_x, stride_out, BLOCK: tl.constexpr,
                             SINGLE_PASS: tl.constexpr, USE_PDL: tl.constexpr):  # fmt: skip
    pdl_prologue(USE_PDL)
    # One program per row (the scale needs the whole row's amax). Floor: read 2I elements, write I bytes.
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    out_row = out_ptr + row * stride_out
    if SINGLE_PASS:  # the whole row in registers
        offs = tl.arange(0, BLOCK)
        y = _silu_and_mul_chunk(x_row, offs, inter)
        scale = fp8_scale_from_amax(tl.max(tl.abs(y), axis=0))
        tl.store(scale_ptr + row, scale)
        inv_scale = fp8_inv_scale(scale)
        tl.store(out_row + offs, quantize_fp8(y, inv_scale), mask=offs < inter)
    else:  # pass 1 computes amax, pass 2 recomputes from the row (now L2-resident) and quantizes
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, inter, BLOCK):
            amax = tl.maximum(amax, tl.abs(_silu_and_mul_chunk(x_row, start + tl.arange(0, BLOCK), inter)))
        scale = fp8_scale_from_amax(tl.max(amax, axis=0))
        tl.store(scale_ptr + row, scale)
        inv_scale = fp8_inv_scale(scale)
        for start in range(0, inter, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            y = _silu_and_mul_chunk(x_row, offs, inter)
            tl.store(out_row + offs, quantize_fp8(y, inv_scale), mask=offs < inter)


@triton.jit
def _silu_and_mul_amax_kernel(x_ptr, y_ptr, amax_ptr, inter, stride_x, NUM_CHUNKS, BLOCK: tl.constexpr,
                              USE_PDL: tl.constexpr):  # fmt: skip
    pdl_prologue(USE_PDL)
    # Few long rows, step 1 of 2: program (row, c) writes silu(gate) * up for columns [c * BLOCK, ...)
    # in x's dtype and the chunk's amax.
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    y = _silu_and_mul_chunk(x_ptr + row * stride_x, offs, inter)
    tl.store(y_ptr + row * inter + offs, y.to(y_ptr.dtype.element_ty), mask=offs < inter)
    tl.store(amax_ptr + row * NUM_CHUNKS + c, tl.max(tl.abs(y), axis=0))


@triton.jit
def _quant_chunks_kernel(y_ptr, amax_ptr, q_ptr, scale_ptr, inter, NUM_CHUNKS, BLOCK: tl.constexpr,
                         BLOCK_C: tl.constexpr, USE_PDL: tl.constexpr):  # fmt: skip
    pdl_prologue(USE_PDL)
    # Step 2 of 2: every program of a row reduces the row's chunk maxima (a few floats) to the scale and
    # quantizes its own chunk. Floor: read I elements of x's dtype, write I bytes.
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    amax = tl.max(tl.load(amax_ptr + row * NUM_CHUNKS + offs_c, mask=offs_c < NUM_CHUNKS, other=0.0), axis=0)
    scale = fp8_scale_from_amax(amax)
    if c == 0:
        tl.store(scale_ptr + row, scale)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    y = tl.load(y_ptr + row * inter + offs, mask=offs < inter, other=0.0).to(tl.float32)
    tl.store(q_ptr + row * inter + offs, quantize_fp8(y, fp8_inv_scale(scale)), mask=offs < inter)


# FP8 SiLU-mul of at most this many rows whose row does not fit one program's registers runs as two
# row-parallel launches (chunk values + maxima, then quantize) instead of one program per row looping
# over the row twice: at batch 1 on Llama-2-70B (I = 28672) that loop took 37 us a layer on one SM.
SPLIT_ROW_MAX_ROWS = 256
SPLIT_ROW_CHUNK = 1024  # ab-decode-70b: 0.03 ms per 70B step faster than 2048, 0.16 faster than 4096


def silu_and_mul(x: torch.Tensor, out_fp8: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [..., 2I] -> silu(x[..., :I]) * x[..., I:] in x.dtype, or with out_fp8 (y_fp8, scale [..., 1]).

    The FP8 codes equal per-token quantization of the x.dtype result.
    """
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dimension, got {x.shape[-1]}")
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    T = x2.shape[0]
    out_shape = (*x.shape[:-1], inter)
    out = torch.empty((T, inter), dtype=FP8_DTYPE if out_fp8 else x.dtype, device=x.device)
    if not out_fp8:
        if T > 0:
            block = min(next_power_of_2(inter), 1024)
            _silu_and_mul_kernel[(T, cdiv(inter, block))](
                x2,
                out,
                inter,
                x2.stride(0),
                out.stride(0),
                BLOCK=block,
                num_warps=4,
                **pdl_kwargs(out.device, T),
            )
        return out.view(out_shape)
    scale = torch.empty((T, 1), dtype=torch.float32, device=x.device)
    launch = row_launch(inter)
    if 0 < T <= SPLIT_ROW_MAX_ROWS and not launch["SINGLE_PASS"]:
        chunks = cdiv(inter, SPLIT_ROW_CHUNK)
        y = torch.empty((T, inter), dtype=x.dtype, device=x.device)
        amax = torch.empty((T, chunks), dtype=torch.float32, device=x.device)
        _silu_and_mul_amax_kernel[(T, chunks)](
            x2, y, amax, inter, x2.stride(0), chunks, BLOCK=SPLIT_ROW_CHUNK, num_warps=4,
            **pdl_kwargs(out.device, T),
        )  # fmt: skip
        _quant_chunks_kernel[(T, chunks)](
            y, amax, out, scale, inter, chunks, BLOCK=SPLIT_ROW_CHUNK, BLOCK_C=next_power_of_2(chunks),
            num_warps=4, **pdl_kwargs(out.device, T),
        )  # fmt: skip
    elif T > 0:
        _silu_and_mul_fp8_kernel[(T,)](
            x2,
            out,
            scale,
            inter,
            x2.stride(0),
            out.stride(0),
            **launch,
            **pdl_kwargs(out.device, T),
        )
    return out.view(out_shape), scale.view(*x.shape[:-1], 1)
