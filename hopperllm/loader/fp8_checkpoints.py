"""FP8 checkpoints as users bring them: NVIDIA ModelOpt, compressed-tensors (llm-compressor), and the
`fp8` method's own format (AutoFP8 / vLLM). All three store `weight` as float8_e4m3fn with a
`weight_scale` (per tensor or per output channel), optionally a static `input_scale`, and optionally
per-layer KV-cache `k_scale` / `v_scale`; they differ in `quantization_config` and in where the KV
scales live, which `LlamaForCausalLM.load_weights` already accepts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


def checkpoint_fp8_format(qc: dict[str, Any]) -> str | None:
    """'modelopt', 'compressed-tensors' or 'fp8' for an FP8 checkpoint's quantization_config; None for
    a config that does not quantize weights. Unsupported schemes raise ValueError."""
    method = str(qc.get("quant_method", "")).lower()
    if method == "fp8":
        if qc.get("weight_block_size"):
            raise ValueError("block-wise FP8 checkpoints (weight_block_size) are not supported yet")
        return "fp8"
    if method == "modelopt":
        algo = str(qc.get("quant_algo") or qc.get("quantization", {}).get("quant_algo", "")).upper()
        if algo != "FP8":
            raise ValueError(f"ModelOpt quant_algo {algo!r} is not supported: hopperllm loads FP8")
        return "modelopt"
    if method == "compressed-tensors":
        for group in (qc.get("config_groups") or {}).values():
            w = group.get("weights") or {}
            if w.get("type") != "float" or int(w.get("num_bits", 0)) != 8:
                raise ValueError(
                    f"compressed-tensors weight scheme {w} is not supported: hopperllm loads FP8"
                )
            if w.get("strategy") not in ("tensor", "channel"):
                raise ValueError(f"compressed-tensors weight strategy {w.get('strategy')!r} is not supported")
        return "compressed-tensors"
    if method in ("", "gguf"):
        return None
    raise ValueError(f"unsupported quantization method {method!r} in the checkpoint's config.json")


def kv_cache_is_fp8(qc: dict[str, Any] | None) -> bool:
    """Whether the checkpoint was calibrated for an FP8 KV cache (it then carries k/v scales)."""
    if not qc:
        return False
    if str(qc.get("kv_cache_quant_algo", "")).upper() == "FP8":
        return True
    kv = qc.get("kv_cache_scheme")
    return bool(kv) and kv.get("type") == "float" and int(kv.get("num_bits", 0)) == 8


def normalize_fp8_checkpoint(
    weights: Iterator[tuple[str, torch.Tensor]], qc: dict[str, Any]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Map each format's tensor names to ours and drop what carries no information for FP8 e4m3."""
    for name, t in weights:
        if name.endswith(("_zero_point", ".weight_g_idx")):
            continue  # symmetric float quantization: zero points are 0
        if name.endswith(".kv_cache_scale"):  # older ModelOpt exports: one scale for K and V
            base = name[: -len(".kv_cache_scale")]
            yield base + ".k_scale", t
            yield base + ".v_scale", t
            continue
        if name.endswith(".weight_scale") and t.dim() == 2:
            t = t.reshape(-1)  # [N, 1] per channel -> [N]
        yield name, t
