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

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if x.is_cuda:
            from hopperllm.kernels.norm import rms_norm

            if residual is None:
                return rms_norm(x, self.weight, self.eps)
            out = rms_norm(x, self.weight, self.eps, residual=residual)
            return out, residual  # the kernel wrote x + residual into `residual`
        return self.forward_native(x, residual)
