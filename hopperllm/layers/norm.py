"""RMSNorm with the fused residual add (vLLM's semantics: returns the normed output and the new residual)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, params_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype), requires_grad=False)

    def forward_native(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        # HF order: normalise in float32, cast to the input dtype, then scale by the weight.
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * x32.to(dtype)
        return out if residual is None else (out, residual)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None,
        quant_fp8: bool = False,
        static_scale: torch.Tensor | None = None,
        all_reduce=None,
    ):
        """With quant_fp8 on CUDA, the output is (x_fp8, scale) for the next FP8 GEMM (one kernel instead
        of norm + quantize); elsewhere the plain output (the FP8 linear layer quantizes it).

        `all_reduce` (a `FusedAllReduceNorm`, with a residual): x is this rank's partial sums; the ranks'
        sum is added to the residual and normalized in the same kernel."""
        if all_reduce is not None:
            return all_reduce(
                x, residual, self.weight, self.eps, out_fp8=quant_fp8, static_scale=static_scale
            )
        if x.is_cuda:
            from hopperllm.kernels.norm import rms_norm

            out = rms_norm(
                x, self.weight, self.eps, residual=residual, out_fp8=quant_fp8, static_scale=static_scale
            )
            return out if residual is None else (out, residual)  # the kernel wrote x + residual into it
        return self.forward_native(x, residual)
