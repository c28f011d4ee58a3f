"""Hand-made FP8 checkpoints in each format hopperllm loads, and an independent reference for their logits:
transformers' Llama with the dequantized weights and the same activation quantization applied by hooks."""

from __future__ import annotations

import json
import os
import shutil

import torch

from hopperllm.quant.fp8 import (
    dequantize,
    quantize_per_token,
    quantize_static,
    quantize_weight,
    scale_from_amax,
)

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _is_proj_weight(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in PROJ


def hf_input_amax(src: str, token_ids: list[int]) -> dict[str, float]:
    """Absolute max of every projection's input under transformers, keyed `model.layers.i.self_attn.q_proj`."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    amax: dict[str, float] = {}
    handles = []
    for name, m in model.named_modules():
        if name.split(".")[-1] in PROJ:

            def hook(mod, args, name=name):
                amax[name] = max(amax.get(name, 0.0), float(args[0].abs().max()))

            handles.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(torch.tensor([token_ids]))
    for h in handles:
        h.remove()
    return amax


def make_fp8_checkpoint(
    src: str,
    dst: str,
    fmt: str,
    per_channel: bool,
    static: bool,
    calib_ids: list[int],
    kv_scales: dict[int, tuple[float, float]] | None = None,
) -> dict[str, torch.Tensor]:
    """Quantize the HF Llama in `src` into `dst` in format `fmt` ('compressed-tensors', 'fp8', 'modelopt').

    Returns the tensors written. kv_scales: {layer: (k_scale, v_scale)}, written under each format's names."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(os.path.join(src, "model.safetensors"))
    amax = hf_input_amax(src, calib_ids) if static else {}
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not _is_proj_weight(name):
            out[name] = t
            continue
        module = name[: -len(".weight")]
        q, s = quantize_weight(t, per_channel=per_channel)
        out[name] = q
        if fmt == "compressed-tensors":
            out[module + ".weight_scale"] = s[:, None] if per_channel else s  # [N, 1] or [1]
        else:
            out[module + ".weight_scale"] = s if per_channel else s.reshape(())
        if static:
            in_scale = scale_from_amax(amax[module])
            out[module + ".input_scale"] = in_scale.reshape(1 if fmt == "compressed-tensors" else ())
    for layer, (ks, vs) in (kv_scales or {}).items():
        p = f"model.layers.{layer}.self_attn"
        k_name, v_name = {
            "compressed-tensors": (f"{p}.k_proj.output_scale", f"{p}.v_proj.output_scale"),
            "fp8": (f"{p}.k_scale", f"{p}.v_scale"),
            "modelopt": (f"{p}.k_proj.k_scale", f"{p}.v_proj.v_scale"),
        }[fmt]
        out[k_name] = torch.tensor(ks, dtype=torch.float32)
        out[v_name] = torch.tensor(vs, dtype=torch.float32)
    os.makedirs(dst, exist_ok=True)
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = _quantization_config(fmt, per_channel, static, kv_scales is not None)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return out


def _quantization_config(fmt: str, per_channel: bool, static: bool, kv: bool) -> dict:
    if fmt == "compressed-tensors":
        fp8 = {"type": "float", "num_bits": 8, "symmetric": True}
        qc = {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": dict(fp8, strategy="channel" if per_channel else "tensor", dynamic=False),
                    "input_activations": dict(
                        fp8, strategy="tensor" if static else "token", dynamic=not static
                    ),
                }
            },
            "ignore": ["lm_head"],
        }
        if kv:
            qc["kv_cache_scheme"] = dict(fp8, strategy="tensor", dynamic=False)
        return qc
    if fmt == "fp8":
        return {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic"}
    if fmt == "modelopt":
        return {
            "quant_method": "modelopt",
            "quant_algo": "FP8" if static or not per_channel else "FP8_PER_CHANNEL_PER_TOKEN",
            "kv_cache_quant_algo": "FP8" if kv else None,
            "exclude_modules": ["lm_head"],
        }
    raise ValueError(fmt)


def reference_logits(src: str, ckpt: dict[str, torch.Tensor], token_ids: list[int]) -> torch.Tensor:
    """transformers' float32 Llama from `src`, with each projection's weight replaced by the dequantized
    checkpoint weight and its input quantized and dequantized (per token, or with the checkpoint's static
    input_scale), as FP8 execution does; attention and the KV cache in float32. A projection the checkpoint
    keeps unquantized (no weight_scale) runs its stored weight on unquantized inputs."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    handles = []
    for name, m in model.named_modules():
        if name.split(".")[-1] not in PROJ:
            continue
        if name + ".weight_scale" not in ckpt:
            m.weight.data.copy_(ckpt[name + ".weight"].float())
            continue
        w_scale = ckpt[name + ".weight_scale"]
        m.weight.data.copy_(dequantize(ckpt[name + ".weight"], w_scale.reshape(-1)))
        in_scale = ckpt.get(name + ".input_scale")

        def hook(mod, args, in_scale=in_scale):
            x = args[0]
            if in_scale is None:
                return (dequantize(*quantize_per_token(x)),)
            return (dequantize(quantize_static(x, in_scale), in_scale.reshape(1)),)

        handles.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0].float()
    for h in handles:
        h.remove()
    return logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())
