"""RMSNorm, optionally fused with the residual add and with FP8 quantization of its output.

Rounding follows HF's LlamaRMSNorm (and vLLM's kernel): r = round(x + residual), normalize r in float32,
round the normalized value to the model dtype, then multiply by the weight and round again.
"""

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
    ref_static_quant_fp8,
)
from hopperllm.kernels.launch import next_power_of_2
from hopperllm.kernels.pdl import pdl_kwargs, pdl_prologue


def ref_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """Torch reference; with `residual`, first r = x + residual is written into `residual` in place."""
    if residual is not None:
        residual.copy_(x + residual)
        x = residual
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (normed.float() * weight.float()).to(x.dtype)


def ref_rms_norm_fp8(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    static_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ref_rms_norm, then FP8 quantization (per token, or with static_scale)."""
    out = ref_rms_norm(x, weight, eps, residual).float()
    if static_scale is None:
        return ref_per_token_quant_fp8(out)
    return ref_static_quant_fp8(out, static_scale), static_scale


@triton.jit
def rms_norm_row_store(
    x, row, offs, mask, H, eps, w, out_ptr, scale_ptr, stride_out,
    OUT_FP8: tl.constexpr,
    STATIC_SCALE: tl.constexpr,
):  # fmt: skip
    """Normalize row `row` (x: its H values in the activation dtype, any residual already added) in float32,
    round to the activation dtype, scale by the weight `w` (its H values as float32, loaded by the caller
    before its PDL wait: a constant), round again (HF's order); store it, or its FP8 codes and per-token
    (or static) scale. Shared by the norm kernels here and in allreduce_norm.py."""
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / H + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)
    out = (normed * w).to(x.dtype)
    if OUT_FP8:
        outf = out.to(tl.float32)
        if STATIC_SCALE:
            scale = tl.load(scale_ptr)
        else:
            scale = fp8_scale_from_amax(tl.max(tl.abs(outf), axis=0))
            tl.store(scale_ptr + row, scale)
        tl.store(out_ptr + row * stride_out + offs, quantize_fp8(outf, fp8_inv_scale(scale)), mask=mask)
    else:
        tl.store(out_ptr + row * stride_out + offs, out, mask=mask)


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, scale_ptr,
    H, stride_x, stride_res, stride_out, eps,
    HAS_RESIDUAL: tl.constexpr,
    OUT_FP8: tl.constexpr,
    STATIC_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    # One program per row, the whole row in registers. Floor: read x (and residual, and write it back),
    # write out: (2 or 4) * H * sizeof(x) + H * sizeof(out) bytes per row.
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # a constant: before the wait
    pdl_prologue(USE_PDL)
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(residual_ptr + row * stride_res + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_ptr + row * stride_res + offs, x, mask=mask)
    rms_norm_row_store(x, row, offs, mask, H, eps, w, out_ptr, scale_ptr, stride_out, OUT_FP8, STATIC_SCALE)


def norm_outputs(
    T: int, H: int, x: torch.Tensor, out_fp8: bool, static_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The norm kernels' outputs for T rows of H: out (x.dtype, or e4m3 with out_fp8) and the scale
    argument (float32 [T, 1] per-token scales to fill, the static scale, or an unused placeholder)."""
    out = torch.empty((T, H), dtype=FP8_DTYPE if out_fp8 else x.dtype, device=x.device)
    if out_fp8 and static_scale is None:
        return out, torch.empty((T, 1), dtype=torch.float32, device=x.device)
    return out, (static_scale.float() if out_fp8 else out)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    out_fp8: bool = False,
    static_scale: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim of x [..., H] (H <= 8192 or so: one row per program, in registers).

    residual: same shape as x; r = x + residual is stored into it in place and normalized (vLLM's
    fused_add_rms_norm). Returns out (x.dtype), or with out_fp8 (out_fp8, scale): the per-token scale
    float32 [..., 1], or static_scale when given. The FP8 codes are exactly the quantization of the
    kernel's own x.dtype result; the non-FP8 variant is a separate compilation whose sum of squares may
    associate differently, so its output can differ by one ulp in rare elements (on an H100, 11 of 67M
    FP8 codes differed from quantizing it at 8192 x 8192).
    """
    H = x.shape[-1]
    if weight.shape != (H,):
        raise ValueError(f"weight must have shape ({H},), got {tuple(weight.shape)}")
    x2 = x.reshape(-1, H)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    T = x2.shape[0]
    res2 = x2
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"residual must match x ({tuple(x.shape)}, {x.dtype}), got "
                f"{tuple(residual.shape)}, {residual.dtype}"
            )
        res2 = residual.view(-1, H)  # a view, so the in-place update reaches the caller
    out, scale = norm_outputs(T, H, x, out_fp8, static_scale)
    block = next_power_of_2(H)
    if T > 0:
        _rms_norm_kernel[(T,)](
            x2, res2, weight, out, scale,
            H, x2.stride(0), res2.stride(0), out.stride(0), eps,
            HAS_RESIDUAL=residual is not None,
            OUT_FP8=out_fp8,
            STATIC_SCALE=static_scale is not None,
            BLOCK=block,
            num_warps=min(max(block // 512, 1), 16),
            **pdl_kwargs(x2.device, T),
        )  # fmt: skip
    out = out.view(x.shape)
    if not out_fp8:
        return out
    return out, (scale.view(*x.shape[:-1], 1) if static_scale is None else static_scale)
