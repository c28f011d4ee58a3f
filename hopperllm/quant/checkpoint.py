"""Write an FP8 model as a ModelOpt-style HF checkpoint (what NVIDIA ModelOpt's `export_hf_checkpoint`
produces, and what vLLM, SGLang, TensorRT-LLM and hopperllm load).

Directory layout:
- `model.safetensors` (or `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` when larger
  than the shard size), with HF tensor names: each linear layer's `weight` (float8_e4m3fn [N, K]),
  `weight_scale` (float32: a scalar per tensor, or [N] per output channel), `input_scale` (float32
  scalar, static activations only), per layer `self_attn.k_proj.k_scale` / `self_attn.v_proj.v_scale`
  (float32 scalars, FP8 KV cache only); embeddings, norms, the LM head and the linear layers on the
  scheme's ignore list unquantized (`dtype`).
- `config.json`: the model config plus `quantization_config` = {quant_method: modelopt, quant_algo,
  kv_cache_quant_algo: FP8 | null, exclude_modules: [lm_head, ...the ignore list], ignore: the same, ...}
  (the ignore list by exact module names, which every loader matches);
- `hf_quant_config.json`: ModelOpt's own file, {producer, quantization: {quant_algo, kv_cache_quant_algo,
  exclude_modules}};
- tokenizer files: copied from an HF source directory, or written from the loaded tokenizer
  (`tokenizer.json` + `tokenizer_config.json` with the chat template and special tokens) for GGUF sources.

quant_algo: ModelOpt's `FP8` is per-tensor weight scales with static per-tensor activation scales;
`FP8_PER_CHANNEL_PER_TOKEN` is per-channel weight scales with dynamic per-token activations. The other
two combinations are written as `FP8` with the scales they have (per-channel `weight_scale` [N], or no
`input_scale`): hopperllm loads them, other engines may expect the canonical pairs.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hopperllm.loader.fp8_checkpoints import checkpoint_module_names, ignored_linear_layers, is_ignored
from hopperllm.quant.calibrate import CalibrationStats
from hopperllm.quant.fp8 import linear_sizes, quantize_merged_weight, scale_from_amax

# FP8 codes [N, K] and per-row float32 scales [N] of a linear layer, keyed by our module name
WeightCodes = dict[str, tuple[torch.Tensor, torch.Tensor]]

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "tokenizer.model",
)
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


@dataclass(frozen=True)
class FP8Scheme:
    per_channel: bool = True  # weight scales per output channel (else per tensor)
    static_activations: bool = False  # calibrated input_scale (else per-token at run time)
    kv_cache_fp8: bool = False  # calibrated k_scale / v_scale
    ignore: tuple[str, ...] = ()  # checkpoint modules kept unquantized (exact names), besides lm_head

    @property
    def quant_algo(self) -> str:
        if self.per_channel and not self.static_activations:
            return "FP8_PER_CHANNEL_PER_TOKEN"
        return "FP8"

    @property
    def excluded_modules(self) -> list[str]:
        return ["lm_head", *self.ignore]

    def quantization_config(self, producer: dict[str, str]) -> dict[str, Any]:
        """config.json's `quantization_config` (flat, ModelOpt's config.json form)."""
        qc: dict[str, Any] = {
            "quant_method": "modelopt",
            "quant_algo": self.quant_algo,
            "kv_cache_quant_algo": "FP8" if self.kv_cache_fp8 else None,
            "exclude_modules": self.excluded_modules,
            "ignore": self.excluded_modules,
            "weight_strategy": "channel" if self.per_channel else "tensor",
            "activation_scheme": "static" if self.static_activations else "dynamic",
            "producer": producer,
        }
        if self.kv_cache_fp8:  # the compressed-tensors-style key newer ModelOpt exports also write
            qc["kv_cache_scheme"] = {"type": "float", "num_bits": 8, "dynamic": False, "strategy": "tensor"}
        return qc

    def hf_quant_config(self, producer: dict[str, str]) -> dict[str, Any]:
        return {
            "producer": producer,
            "quantization": {
                "quant_algo": self.quant_algo,
                "kv_cache_quant_algo": "FP8" if self.kv_cache_fp8 else None,
                "exclude_modules": self.excluded_modules,
            },
        }


def _producer() -> dict[str, str]:
    from hopperllm import __version__

    return {"name": "hopperllm", "version": __version__}


def resolve_ignore(model: nn.Module, patterns: list[str], keep_last_layers: int = 0) -> tuple[str, ...]:
    """The checkpoint modules (exact names, in model order) to keep unquantized: those matching `patterns`
    (names, shell wildcards such as `model.layers.29.*`, or `re:` regexes: llm-compressor's `ignore`,
    ModelOpt's `exclude_modules`) and every linear layer of the last `keep_last_layers` decoder layers.

    A pattern that matches no linear layer is a ValueError (a typo would otherwise quantize silently);
    `lm_head` is accepted and changes nothing, the LM head is never quantized."""
    from hopperllm.layers.linear import LinearBase

    names = [
        p for n, m in model.named_modules() if isinstance(m, LinearBase) for p in checkpoint_module_names(n)
    ]
    num_layers = len(model.model.layers)
    if not 0 <= keep_last_layers <= num_layers:
        raise ValueError(
            f"--keep-last-layers must be between 0 and {num_layers} (the model's decoder layers), "
            f"got {keep_last_layers}"
        )
    last = [f"model.layers.{i}.*" for i in range(num_layers - keep_last_layers, num_layers)]
    for p in patterns:
        if not any(is_ignored(n, [p]) for n in [*names, "lm_head"]):
            raise ValueError(
                f"--ignore pattern {p!r} matches no linear layer of the model "
                f"(their names look like {names[0]!r}; wildcards: 'model.layers.29.*', regexes: 're:...')"
            )
    kept = [n for n in names if is_ignored(n, [*patterns, *last])]
    if kept and len(kept) == len(names):
        raise ValueError("every linear layer is to stay unquantized: there is nothing to quantize")
    ignored_linear_layers(model, kept)  # a fused layer kept only in part is a ValueError
    return tuple(kept)


def quantized_state_dict(
    model: nn.Module,
    scheme: FP8Scheme,
    stats: CalibrationStats | None,
    dtype: torch.dtype,
    codes: WeightCodes | None = None,
) -> dict[str, torch.Tensor]:
    """HF-named CPU tensors of `model` (an unquantized hopperllm LlamaForCausalLM, one rank) with its
    linear layers quantized to FP8 under `scheme`, using `stats` for static input and KV-cache scales.

    `codes` holds FP8 codes already chosen for some linear layers (by GPTQ, with the scales round to
    nearest would use); the others are rounded to nearest here. Layers on `scheme.ignore` are written
    unquantized, in `dtype`."""
    from hopperllm.layers.attention import Attention
    from hopperllm.layers.linear import LinearBase

    if getattr(model, "tp", None) is not None and model.tp.world_size != 1:
        raise ValueError("quantize runs the model on one GPU: use --tensor-parallel-size 1")
    needs_stats = scheme.static_activations or scheme.kv_cache_fp8
    if needs_stats and stats is None:
        raise ValueError("static activation or KV-cache scales need calibration statistics")
    out: dict[str, torch.Tensor] = {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    kept = set(ignored_linear_layers(model, list(scheme.ignore)))
    done: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, LinearBase):
            if module.quantization is not None:
                raise ValueError(f"{name} is already quantized: quantize starts from bf16/fp32 weights")
            w = module.weight.data
            sizes = linear_sizes(module)
            q = s = input_scale = None
            if name not in kept:
                q, s = (codes or {}).get(name) or quantize_merged_weight(w, sizes, scheme.per_channel)
                if scheme.static_activations:
                    if name not in stats.input_amax:
                        raise ValueError(f"calibration never ran {name}: no input scale for it")
                    input_scale = scale_from_amax(stats.input_amax[name]).reshape(())
            start = 0
            # slices are copied: safetensors refuses tensors that share memory
            for base, size in zip(checkpoint_module_names(name), sizes, strict=True):
                rows = slice(start, start + size)
                if q is None:
                    out[f"{base}.weight"] = w[rows].to("cpu", dtype, copy=True)
                else:
                    out[f"{base}.weight"] = q[rows].to("cpu", copy=True)
                    piece_scale = s[rows] if scheme.per_channel else s[start].reshape(())
                    out[f"{base}.weight_scale"] = piece_scale.to("cpu", copy=True)
                if input_scale is not None:
                    out[f"{base}.input_scale"] = input_scale.clone()
                if module.bias is not None:
                    out[f"{base}.bias"] = module.bias.data[rows].to("cpu", dtype, copy=True)
                start += size
            done.update(f"{name}.{p}" for p, _ in module.named_parameters(recurse=False))
        elif isinstance(module, Attention) and scheme.kv_cache_fp8:
            prefix = name.rpartition(".")[0]  # model.layers.i.self_attn
            if name not in stats.k_amax:
                raise ValueError(f"calibration never ran {name}: no KV-cache scales for it")
            out[f"{prefix}.k_proj.k_scale"] = scale_from_amax(stats.k_amax[name]).reshape(())
            out[f"{prefix}.v_proj.v_scale"] = scale_from_amax(stats.v_amax[name]).reshape(())
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in done or name.endswith((".k_scale", ".v_scale")):
            continue
        if tied and name == "lm_head.weight":
            continue
        t = p.data
        if name == "lm_head.weight" or name == "model.embed_tokens.weight":
            t = t[: model.config.vocab_size]  # drop the padding of a vocab-parallel layout
        out[name] = t.to(dtype).contiguous().cpu()
    return out


def _save_shards(tensors: dict[str, torch.Tensor], out_dir: str, max_shard_bytes: int) -> list[str]:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards, strict=True):
        save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


def _write_tokenizer(tokenizer, out_dir: str, source_dir: str | None) -> None:
    if source_dir is not None and os.path.isfile(os.path.join(source_dir, "tokenizer.json")):
        for fname in _TOKENIZER_FILES:
            path = os.path.join(source_dir, fname)
            if os.path.isfile(path):
                shutil.copyfile(path, os.path.join(out_dir, fname))
        return
    # GGUF (or dummy) sources: the tokenizer object is all there is; save what Tokenizer.from_dir reads.
    tokenizer._tok.save(os.path.join(out_dir, "tokenizer.json"))
    cfg = {
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "add_bos_token": tokenizer.add_bos_token,
        "chat_template": tokenizer.chat_template,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def write_modelopt_checkpoint(
    model: nn.Module,
    hf_config: dict[str, Any],
    tokenizer,
    out_dir: str,
    scheme: FP8Scheme,
    stats: CalibrationStats | None,
    dtype: torch.dtype = torch.bfloat16,
    source_dir: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    codes: WeightCodes | None = None,
) -> dict[str, Any]:
    """Quantize `model` under `scheme` and write the checkpoint into `out_dir` (created; must be empty).

    `hf_config` is the source's config dict (HF config.json, or the one read from a GGUF); `source_dir` an
    HF directory to copy tokenizer files from; `codes` FP8 codes already chosen (`quantized_state_dict`).
    Returns a summary (files, tensors, bytes)."""
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"output {out_dir!r} exists and is not an empty directory: choose a new path")
    tensors = quantized_state_dict(model, scheme, stats, dtype, codes)
    os.makedirs(out_dir, exist_ok=True)
    files = _save_shards(tensors, out_dir, max_shard_bytes)
    producer = _producer()
    config = {k: v for k, v in hf_config.items() if k not in ("quantization_config", "compression_config")}
    dtype_name = str(dtype).removeprefix("torch.")
    config["torch_dtype"] = dtype_name  # transformers < 5 reads torch_dtype, >= 5 writes dtype
    if "dtype" in config:
        config["dtype"] = dtype_name
    eos = config.get("eos_token_id")
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    eos_ids |= set(getattr(tokenizer, "eos_token_ids", ()))  # GGUF end-of-turn ids live in the tokenizer
    if eos_ids:
        config["eos_token_id"] = sorted(eos_ids)[0] if len(eos_ids) == 1 else sorted(eos_ids)
    config["quantization_config"] = scheme.quantization_config(producer)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "hf_quant_config.json"), "w") as f:
        json.dump(scheme.hf_quant_config(producer), f, indent=2)
    _write_tokenizer(tokenizer, out_dir, source_dir)
    return {
        "output": out_dir,
        "files": files,
        "num_tensors": len(tensors),
        "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        "quant_algo": scheme.quant_algo,
    }
