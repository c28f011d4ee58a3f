"""FP8 (e4m3) numerics for quantizing a model: weight scales, activation scales, dequantization.

The conventions are those of `hopperllm.kernels.fp8` (which the FP8 linear layer runs), restated:
- a scale maps a tensor's absolute maximum to the largest e4m3 value: scale = max(amax * (1/448), 1e-12);
- quantize: x_fp8 = clamp(x / scale, -448, 448) rounded to nearest even (activations multiply by the float32
  reciprocal of the scale, bit for bit as the CUDA kernels do); dequantize: x_fp8.float() * scale;
- weights [N, K] take one scale per tensor ([1]) or per output channel ([N]); activations take one scale
  per token (dynamic, computed at run time) or one static scale per tensor ([1], from calibration).

Round-trip error. e4m3 keeps 3 mantissa bits, so a value in the normal range (|x / scale| >= 2^-6) is off
by at most half a step, 2^-4 of its magnitude; below that (subnormals) steps are 2^-9, so the error is at
most 2^-10 * scale. Hence |dequantize(quantize(x)) - x| <= max(2^-4 |x|, 2^-10 scale) (`roundtrip_bound`)
for every x within the scale's range. Per-channel scales bound each row by its own amax, so rows of small
weights keep their precision next to an outlier row; a per-tensor scale pushes them towards subnormals.
"""

from __future__ import annotations

import torch
from torch import nn

from hopperllm.kernels.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    FP8_MAX_INV,
    FP8_MIN_SCALE,
    ref_fp8_linear,
    ref_per_token_quant_fp8,
    ref_static_quant_fp8,
)

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "scale_from_amax",
    "quantize_weight",
    "weight_scales",
    "round_weight",
    "quantize_merged_weight",
    "quantize_per_token",
    "quantize_static",
    "dequantize",
    "roundtrip_bound",
    "fp8_linear_emulated",
    "fake_quantize_weights_",
    "dequantize_fp8_weights_",
    "fake_quantize_activations_",
    "linear_sizes",
]

# Relative half-step of e4m3 in its normal range, and the absolute half-step of its subnormals (per unit scale).
E4M3_REL_ERR = 2.0**-4
E4M3_SUBNORMAL_ERR = 2.0**-10


def scale_from_amax(amax: torch.Tensor | float) -> torch.Tensor:
    """float32 scale(s) that map `amax` to 448 (never below 1e-12, so all-zero inputs stay finite)."""
    a = torch.as_tensor(amax, dtype=torch.float32)
    return (a * FP8_MAX_INV).clamp(min=FP8_MIN_SCALE)


def quantize_weight(w: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (w_fp8 [N, K], float32 scale [N] per output channel or [1] per tensor)."""
    if w.dim() != 2:
        raise ValueError(f"weights to quantize must be 2-D [N, K], got shape {tuple(w.shape)}")
    w32 = w.float()
    amax = w32.abs().amax(dim=1) if per_channel else w32.abs().amax().reshape(1)
    scale = scale_from_amax(amax)
    return round_weight(w32, scale), scale


def round_weight(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Round to nearest: the e4m3 codes of w [N, K] (or one column, [N]) under per-row scales [N] (or [1])."""
    s = scale[:, None] if w.dim() == 2 else scale
    return (w.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def weight_scales(w: torch.Tensor, sizes: list[int], per_channel: bool = True) -> torch.Tensor:
    """float32 scale [N] of each row of a merged weight [N, K] whose logical matrices (q/k/v, gate/up) have
    `sizes` rows: the row's own (per channel) or its matrix's (per tensor), as a checkpoint stores them."""
    w32 = w.float()
    if per_channel:
        return scale_from_amax(w32.abs().amax(dim=1))
    return torch.cat([scale_from_amax(m.abs().amax()).expand(m.shape[0]) for m in w32.split(sizes)])


def quantize_merged_weight(
    w: torch.Tensor, sizes: list[int], per_channel: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round to nearest for a merged weight: (codes [N, K], per-row scales [N]); the rows of each logical
    matrix are bit for bit those `quantize_weight` gives that matrix alone."""
    scale = weight_scales(w, sizes, per_channel)
    return round_weight(w, scale), scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization: x [..., K] -> (x_fp8, float32 scale [..., 1]), one scale per token."""
    return ref_per_token_quant_fp8(x)


def quantize_static(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Static activation quantization with one calibrated float32 scale (values beyond it saturate)."""
    return ref_static_quant_fp8(x, torch.as_tensor(scale, dtype=torch.float32).reshape(1))


def dequantize(x_fp8: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """float32 x_fp8 * scale. A weight scale [N] applies per row of [N, K]; [..., 1] or [1] broadcast."""
    return x_fp8.float() * _broadcast_scale(scale, x_fp8)


def _broadcast_scale(scale: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    if s.dim() == 1 and s.numel() > 1 and x.dim() == 2 and s.numel() == x.shape[0]:
        s = s[:, None]  # one scale per row
    return s


def roundtrip_bound(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Elementwise bound on |dequantize(quantize(x)) - x| for x within the scale's range (module docstring).

    `scale` broadcasts like in `dequantize`. A little float32 slack covers the rounding of x / scale."""
    s = _broadcast_scale(scale, x)
    return torch.maximum(E4M3_REL_ERR * x.float().abs(), E4M3_SUBNORMAL_ERR * s) * (1 + 1e-6) + 1e-30


def fp8_linear_emulated(
    x: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    input_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = quantize(x) @ (w_fp8 * w_scale).T + bias, emulated in float32 (x per token, or static).

    Equals what `torch._scaled_mm(x_fp8, w_fp8.t(), scale_a, scale_b)` computes before its cast to the
    output dtype, up to float32 accumulation order: both take the same e4m3 codes and scales, the product
    of two e4m3 values is exact in float32, and cuBLASLt sums in float32 and scales the accumulated dot
    product (scale_a[m] * scale_b[n] * sum_k x[m, k] w[n, k]); here the scales are applied to the operands
    before summing, which differs only by float32 rounding (~1e-6 relative). The CPU path of
    `hopperllm.kernels.fp8.fp8_linear` is this computation; the GPU side is checked in tests/gpu/.
    """
    K = w_fp8.shape[1]
    if input_scale is not None:
        input_scale = torch.as_tensor(input_scale, dtype=torch.float32).reshape(1)
    y = ref_fp8_linear(x.reshape(-1, K), w_fp8, w_scale, input_scale, out_dtype=torch.float32)
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], w_fp8.shape[0])


@torch.no_grad()
def fake_quantize_weights_(model: nn.Module, per_channel: bool = True) -> int:
    """Weight-only FP8 emulation: replace every (unquantized) linear layer's weight by its FP8 round trip.

    Each logical matrix of a merged layer (q/k/v in qkv_proj, gate/up in gate_up_proj) is scaled on its own,
    as a checkpoint stores them. Activations stay in the model dtype, so this isolates the weight error.
    Returns the number of layers changed."""
    from hopperllm.layers.linear import LinearBase

    n = 0
    for module in model.modules():
        if not isinstance(module, LinearBase) or module.quantization is not None:
            continue
        w = module.weight.data
        q, s = quantize_merged_weight(w, linear_sizes(module), per_channel)
        w.copy_(dequantize(q, s).to(w.dtype))
        n += 1
    return n


@torch.no_grad()
def dequantize_fp8_weights_(model: nn.Module) -> int:
    """Make every FP8 linear layer an unquantized one holding its dequantized weights: an FP8 checkpoint's
    weight error alone, with activations unquantized. Returns the number of layers changed."""
    from hopperllm.layers.linear import LinearBase

    n = 0
    for module in model.modules():
        if isinstance(module, LinearBase) and module.quantization is not None:
            module.drop_quantization(dequantize(module.weight.data, module.weight_scale.data))
            n += 1
    return n


def fake_quantize_activations_(model: nn.Module) -> int:
    """Activation-only FP8 emulation: every (unquantized) linear layer's input takes its per-token FP8 round
    trip (forward pre-hooks, for the model's lifetime); weights stay as they are. Returns the layer count."""
    from hopperllm.layers.linear import LinearBase

    def hook(module, args):
        x = args[0]
        return (dequantize(*quantize_per_token(x)).to(x.dtype),)

    n = 0
    for module in model.modules():
        if isinstance(module, LinearBase) and module.quantization is None:
            module.register_forward_pre_hook(hook)
            n += 1
    return n


def linear_sizes(module: nn.Module) -> list[int]:
    """Rows of each logical matrix in a (merged) linear layer: [q, k, v], [gate, up], or [N]."""
    return list(getattr(module, "local_sizes", [module.output_size]))
