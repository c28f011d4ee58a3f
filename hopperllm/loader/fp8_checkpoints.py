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
        # FP8: per-tensor weight scales (+ static input scales); FP8_PER_CHANNEL_PER_TOKEN: per-channel
        # weight scales, dynamic per-token activations. Both load as per-channel scales here.
        if algo not in ("FP8", "FP8_PER_CHANNEL_PER_TOKEN"):
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
    """Whether the checkpoint was calibrated for an FP8 KV cache (it then carries k/v scales).

    ModelOpt says so with `kv_cache_quant_algo: FP8` (flat in config.json, or nested under
    `quantization` as in hf_quant_config.json) or `kv_cache_scheme: "FP8"`; compressed-tensors with a
    `kv_cache_scheme` {type: float, num_bits: 8}."""
    if not qc:
        return False
    nested = qc.get("quantization") if isinstance(qc.get("quantization"), dict) else {}
    for algo in (qc.get("kv_cache_quant_algo"), nested.get("kv_cache_quant_algo")):
        if str(algo or "").upper() == "FP8":
            return True
    kv = qc.get("kv_cache_scheme")
    if isinstance(kv, str):
        return kv.strip().upper() in ("FP8", "FLOAT8")
    return isinstance(kv, dict) and kv.get("type") == "float" and int(kv.get("num_bits", 0)) == 8


def dynamic_activations(qc: dict[str, Any]) -> bool:
    """Whether the checkpoint asks for dynamic (per-token) activation scales; any `input_scale` tensors it
    holds are then not used (as in vLLM)."""
    method = str(qc.get("quant_method", "")).lower()
    if method == "fp8":
        return str(qc.get("activation_scheme", "dynamic")).lower() == "dynamic"
    if method == "compressed-tensors":
        groups = (qc.get("config_groups") or {}).values()
        acts = [g.get("input_activations") for g in groups]
        return bool(acts) and all(a is not None and bool(a.get("dynamic")) for a in acts)
    if method == "modelopt":
        algo = str(qc.get("quant_algo") or qc.get("quantization", {}).get("quant_algo", "")).upper()
        return algo == "FP8_PER_CHANNEL_PER_TOKEN"
    return False


def normalize_fp8_checkpoint(
    weights: Iterator[tuple[str, torch.Tensor]], qc: dict[str, Any]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Map each format's tensor names to ours and drop what carries no information for FP8 e4m3."""
    drop_input_scales = dynamic_activations(qc)
    for name, t in weights:
        if name.endswith(("_zero_point", ".weight_g_idx")):
            continue  # symmetric float quantization: zero points are 0
        if drop_input_scales and name.endswith(".input_scale"):
            continue
        if name.endswith((".kv_cache_scale", ".kv_scale")):  # older exports: one scale for K and V
            base = name.rsplit(".", 1)[0]
            yield base + ".k_scale", t
            yield base + ".v_scale", t
            continue
        # compressed-tensors before kv_cache_scheme had its own names: k_proj / v_proj.output_scale
        if name.endswith((".k_proj.output_scale", ".v_proj.output_scale")):
            yield name.rsplit(".", 2)[0] + (".k_scale" if ".k_proj." in name else ".v_scale"), t
            continue
        if name.endswith((".output_scale", ".q_scale", ".prob_scale")):
            continue  # query / attention-probability scales: FP8 attention math hopperllm does not do
        if name.endswith(".weight_scale") and t.dim() == 2:
            t = t.reshape(-1)  # [N, 1] per channel -> [N]
        yield name, t


def ignored_module_patterns(qc: dict[str, Any]) -> list[str]:
    """The modules a checkpoint keeps unquantized: compressed-tensors `ignore` (names or `re:` regexes),
    the fp8 method's `ignored_layers`, ModelOpt's `exclude_modules` (shell wildcards)."""
    pats = qc.get("ignore") or qc.get("ignored_layers") or qc.get("exclude_modules")
    if pats is None and isinstance(qc.get("quantization"), dict):
        pats = qc["quantization"].get("exclude_modules")
    return [str(p) for p in (pats or [])]


def is_ignored(name: str, patterns: list[str]) -> bool:
    """Whether checkpoint module `name` matches one of `patterns` (exact names, shell wildcards, `re:`)."""
    import fnmatch
    import re

    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return True
        elif name == p or fnmatch.fnmatchcase(name, p):
            return True
    return False


# our merged linear layers -> the checkpoint's modules they are made of, in row order
MERGED_LINEARS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def checkpoint_module_names(name: str) -> list[str]:
    """The checkpoint's module names of our linear layer `name` (`...qkv_proj` -> `...q_proj`, `k_proj`, `v_proj`)."""
    prefix, _, leaf = name.rpartition(".")
    return [f"{prefix}.{p}" for p in MERGED_LINEARS.get(leaf, (leaf,))]


def ignored_linear_layers(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """Our linear layers (names) whose checkpoint modules all match `patterns`. A fused layer matched only
    in part is a ValueError: hopperllm runs it as one layer, so it is quantized whole or not at all."""
    from hopperllm.layers.linear import LinearBase

    out = []
    if not patterns:
        return out
    for name, module in model.named_modules():
        if not isinstance(module, LinearBase):
            continue
        parts = checkpoint_module_names(name)
        hits = [is_ignored(p, patterns) for p in parts]
        if any(hits) and not all(hits):
            raise ValueError(
                f"{', '.join(parts)} run as one fused layer in hopperllm, but only some of them are on the "
                f"ignore list: keep all of them unquantized or none"
            )
        if all(hits):
            out.append(name)
    return out
