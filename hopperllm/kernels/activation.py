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
)
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
    # silu(g) = g / (1 + exp(-g)) with the fast (approximate) division: a few float32 ulps from torch's
    # sigmoid, invisible after rounding to bf16 (an IEEE division here made the FP8 variant ALU-bound).
    y = gate / (1.0 + tl.exp(-gate)) * up
    return y.to(x_row.dtype.element_ty).to(tl.float32)


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
            block = min(triton.next_power_of_2(inter), 1024)
            _silu_and_mul_kernel[(T, triton.cdiv(inter, block))](
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
    if T > 0:
        _silu_and_mul_fp8_kernel[(T,)](
            x2,
            out,
            scale,
            inter,
            x2.stride(0),
            out.stride(0),
            **row_launch(inter),
            **pdl_kwargs(out.device, T),
        )
    return out.view(out_shape), scale.view(*x.shape[:-1], 1)
