"""Linear layers: bf16/fp32 or FP8 weights, tensor-parallel slicing in each layer's weight loader.

FP8 layers keep `weight` as float8_e4m3fn [N, K], `weight_scale` float32 [N] (per output channel: a
per-tensor checkpoint scale is expanded to its rows, which dequantizes to the same values) and an
optional static `input_scale` [1]; without it activations are quantized per token at run time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hopperllm.distributed.parallel_state import SINGLE, TPGroup

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_weight_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (fp8 [N, K], float32 scale [N]) with each row's amax mapped to 448.

    The scale multiplies by the float32 reciprocal of 448, as the activation kernels do: torch's CUDA
    division by a scalar does exactly that, its CPU division does not, and the scales must not depend on
    the device the weights were loaded on (hopperllm.quant.fp8.quantize_weight gives the same bits)."""
    w32 = w.float()
    amax = w32.abs().amax(dim=1)
    scale = (amax * (1.0 / FP8_MAX)).clamp(min=1e-12)
    q = (w32 / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def _fp8_prequantized(x: tuple, w_fp8, w_scale, bias, out_dtype) -> torch.Tensor:
    """x is an (x_fp8, scale) pair, or a DeferredQuant that the GEMV quantizes as it loads it."""
    from hopperllm.kernels.fp8 import GEMV_MAX_M, DeferredQuant, fp8_gemv, fp8_gemv_deferred, scaled_mm

    if isinstance(x, DeferredQuant):
        y = fp8_gemv_deferred(x, w_fp8, w_scale, out_dtype)
    elif x[0].shape[0] <= GEMV_MAX_M:
        y = fp8_gemv(x[0], x[1], w_fp8, w_scale, out_dtype)
    else:
        y = scaled_mm(x[0], x[1], w_fp8, w_scale, out_dtype)
    return y if bias is None else y + bias.to(out_dtype)


class LinearBase(nn.Module):
    """y = x W^T over this rank's slice. Subclasses say how checkpoint tensors are sliced."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        quantization: str | None = None,
        params_dtype: torch.dtype = torch.float32,
        tp: TPGroup = SINGLE,
    ):
        super().__init__()
        if quantization not in (None, "fp8"):
            raise ValueError(f"unknown quantization {quantization!r}: use fp8 or none")
        self.input_size = input_size  # local sizes
        self.output_size = output_size
        self.quantization = quantization
        self.tp = tp
        self.params_dtype = params_dtype
        wdtype = FP8_DTYPE if quantization == "fp8" else params_dtype
        self.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=wdtype), requires_grad=False)
        if quantization == "fp8":
            self.weight_scale = nn.Parameter(
                torch.ones(output_size, dtype=torch.float32), requires_grad=False
            )
            self.input_scale: nn.Parameter | None = None  # static activation scale, set by a checkpoint
        self.bias = (
            nn.Parameter(torch.zeros(output_size, dtype=params_dtype), requires_grad=False) if bias else None
        )

    # -- loading ----------------------------------------------------------------------------
    def _load_rows(self, kind: str, loaded: torch.Tensor, row_offset: int, num_rows: int) -> None:
        """Copy an already-sliced checkpoint tensor into rows [row_offset, row_offset + num_rows)."""
        if kind == "weight":
            if self.quantization == "fp8" and loaded.dtype != FP8_DTYPE:
                q, s = quantize_weight_per_channel(loaded.to(self.weight.device))
                self.weight.data[row_offset : row_offset + num_rows].copy_(q)
                self.weight_scale.data[row_offset : row_offset + num_rows].copy_(s)
            else:
                if loaded.shape != (num_rows, self.input_size):
                    raise ValueError(
                        f"weight shape {tuple(loaded.shape)} != expected {(num_rows, self.input_size)}"
                    )
                self.weight.data[row_offset : row_offset + num_rows].copy_(loaded)
        elif kind == "weight_scale":
            if self.quantization != "fp8":
                raise ValueError("checkpoint has FP8 weight scales but the layer is not FP8")
            s = loaded.float().reshape(-1)
            self.weight_scale.data[row_offset : row_offset + num_rows].copy_(
                s.expand(num_rows) if s.numel() == 1 else s
            )
        elif kind == "input_scale":
            s = loaded.float().reshape(1).to(self.weight.device)
            # One activation feeds every merged shard: keep the largest scale (no shard saturates).
            if self.input_scale is None:
                self.input_scale = nn.Parameter(s.clone(), requires_grad=False)
            else:
                self.input_scale.data.copy_(torch.maximum(self.input_scale.data, s))
        elif kind == "bias":
            if self.bias is None:
                raise ValueError("checkpoint has a bias the model config does not declare")
            self.bias.data[row_offset : row_offset + num_rows].copy_(loaded)
        else:
            raise ValueError(f"unknown linear tensor kind {kind!r}")

    def drop_quantization(self, weight: torch.Tensor | None = None) -> None:
        """Make an FP8 layer an unquantized one in `params_dtype`, holding `weight` [N, K] (default: left
        uninitialized, for a checkpoint to fill)."""
        if weight is None:
            weight = torch.empty(self.weight.shape, dtype=self.params_dtype, device=self.weight.device)
        self.quantization = None
        self.weight = nn.Parameter(weight.to(self.params_dtype), requires_grad=False)
        if hasattr(self, "weight_scale"):
            del self.weight_scale
        self.input_scale = None

    # -- forward ----------------------------------------------------------------------------
    @property
    def takes_fp8_input(self) -> bool:
        return self.quantization == "fp8"

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x is an activation, or for FP8 layers on CUDA an already quantized (x_fp8, scale) pair from a
        fused norm / activation kernel, or a DeferredQuant from fp8_gemv_silu_mul (FP8, decode sizes)."""
        if isinstance(x, tuple):
            return _fp8_prequantized(x, self.weight, self.weight_scale, self.bias, self.params_dtype)
        if self.quantization == "fp8":
            from hopperllm.kernels.fp8 import fp8_linear

            return fp8_linear(
                x,
                self.weight,
                self.weight_scale,
                input_scale=self.input_scale,
                bias=self.bias,
                out_dtype=x.dtype,
            )
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output dimension split across ranks. `output_sizes` lists the logical matrices merged into
    this one (e.g. [I, I] for gate_up); each is split separately so a rank holds its slice of each."""

    def __init__(self, input_size: int, output_sizes: list[int], **kw):
        tp: TPGroup = kw.get("tp", SINGLE)
        self.output_sizes = list(output_sizes)
        self.local_sizes = [tp.shard(s, "output size") for s in output_sizes]
        super().__init__(input_size, sum(self.local_sizes), **kw)

    def load_shard(self, kind: str, loaded: torch.Tensor, shard: int = 0) -> None:
        size = self.local_sizes[shard]
        offset = sum(self.local_sizes[:shard])
        if kind in ("weight", "bias") or (kind == "weight_scale" and loaded.numel() > 1):
            loaded = loaded.narrow(0, self.tp.rank * size, size)
        self._load_rows(kind, loaded, offset, size)


class MergedGateUpLinear(ColumnParallelLinear):
    """gate_proj and up_proj in one [2I, K] weight (this rank's gate rows, then its up rows)."""

    def __init__(self, input_size: int, intermediate_size: int, **kw):
        super().__init__(input_size, [intermediate_size] * 2, **kw)

    def silu_mul_fp8(self, x: tuple[torch.Tensor, torch.Tensor]):
        """silu(gate) * up of an FP8 (x_fp8, scale) input in one GEMV launch, as a DeferredQuant for an FP8
        down projection (fp8_gemv_silu_mul); FP8 weights, no bias, decode batch sizes, CUDA."""
        from hopperllm.kernels.fp8 import fp8_gemv_silu_mul

        return fp8_gemv_silu_mul(x[0], x[1], self.weight, self.weight_scale, self.params_dtype)


class QKVParallelLinear(ColumnParallelLinear):
    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, **kw):
        tp: TPGroup = kw.get("tp", SINGLE)
        tp.shard(num_heads, "number of attention heads")
        tp.shard(num_kv_heads, "number of key/value heads")
        super().__init__(
            hidden_size, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], **kw
        )


class RowParallelLinear(LinearBase):
    """Input dimension split across ranks; partial results are summed with an all-reduce."""

    def __init__(self, input_size: int, output_size: int, **kw):
        tp: TPGroup = kw.get("tp", SINGLE)
        super().__init__(tp.shard(input_size, "input size"), output_size, **kw)

    def load_shard(self, kind: str, loaded: torch.Tensor, shard: int = 0) -> None:
        if kind == "weight":
            loaded = loaded.narrow(1, self.tp.rank * self.input_size, self.input_size)
        if kind == "bias" and self.tp.rank != 0:
            loaded = torch.zeros_like(loaded)  # added once, not once per rank
        self._load_rows(kind, loaded, 0, self.output_size)

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """The sum over the ranks, or with `reduce=False` this rank's partial sums (the caller reduces them:
        the fused all-reduce + RMSNorm of the next norm)."""
        y = super().forward(x)
        return self.tp.all_reduce(y) if reduce else y
