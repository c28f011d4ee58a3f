"""Rotary position embeddings (HF Llama's rotate_half layout), incl. Llama-3 and linear scaling."""

from __future__ import annotations

import math
from typing import Any

import torch


def rope_inv_freq(head_dim: int, rope_theta: float, rope_scaling: dict[str, Any] | None) -> torch.Tensor:
    """The per-pair inverse frequencies, exactly as transformers computes them (float32)."""
    inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not rope_scaling:
        return inv_freq
    rtype = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if rtype == "linear":
        return inv_freq / float(rope_scaling["factor"])
    if rtype == "llama3":
        factor = float(rope_scaling["factor"])
        low_freq_factor = float(rope_scaling.get("low_freq_factor", 1.0))
        high_freq_factor = float(rope_scaling.get("high_freq_factor", 4.0))
        old_context_len = int(rope_scaling.get("original_max_position_embeddings", 8192))
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, inv_freq_llama)
    raise ValueError(f"unsupported rope_scaling type {rtype!r}: use default, linear or llama3")


def build_cos_sin_cache(
    head_dim: int, max_position: int, rope_theta: float, rope_scaling: dict[str, Any] | None = None
) -> torch.Tensor:
    """float32 [max_position, head_dim] = cat(cos(p * inv_freq), sin(p * inv_freq)) for p < max_position.

    rope_scaling is HF's `rope_scaling` / `rope_parameters` dict: None or rope_type "default", "linear"
    (factor) or "llama3" (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings).
    """
    if head_dim % 2:
        raise ValueError(f"rotary needs an even head_dim, got {head_dim}")
    inv_freq = rope_inv_freq(head_dim, rope_theta, rope_scaling)
    t = torch.arange(max_position, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def apply_rotary_native(
    x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> torch.Tensor:
    """x [T, H, D] -> rotated x (same dtype). Matches HF: cos/sin cast to x's dtype before use."""
    half = x.shape[-1] // 2
    cs = cos_sin_cache.index_select(0, positions)
    cos = cs[:, None, :half].to(x.dtype)
    sin = cs[:, None, half:].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
