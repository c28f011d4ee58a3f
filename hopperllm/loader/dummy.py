"""`dummy:<preset>`: real architectures with random weights, made directly on the target device."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_LLAMA2 = dict(
    vocab_size=32000,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
_LLAMA3 = dict(
    vocab_size=128256,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    bos_token_id=128000,
    eos_token_id=[128001, 128009],
    tie_word_embeddings=False,
)

PRESETS: dict[str, dict[str, Any]] = {
    # tiny: for tests; GQA and tied embeddings like SmolLM2
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    ),
    "llama-2-7b": dict(
        _LLAMA2,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
    ),
    "llama-2-13b": dict(
        _LLAMA2,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
    ),
    "llama-2-70b": dict(
        _LLAMA2,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
    ),
    "llama-3-8b": dict(
        _LLAMA3,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
    # draft models for speculative decoding (the shapes of JackFram/llama-68m and llama-160m, Llama-2's
    # vocabulary; of meta-llama/Llama-3.2-1B, Llama-3's)
    "llama-68m": dict(
        _LLAMA2,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=2,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=2048,
    ),
    "llama-160m": dict(
        _LLAMA2,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=2048,
    ),
    "llama-3.2-1b": dict(
        _LLAMA3,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
    ),
    "llama-3-70b": dict(
        _LLAMA3,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
    ),
}
for _cfg in PRESETS.values():
    _cfg.setdefault("architectures", ["LlamaForCausalLM"])
    _cfg.setdefault("model_type", "llama")


def preset_config(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"unknown dummy preset {name!r}: use one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Random weights in place, on whatever device the model is on, one tensor at a time (a 70B model
    never needs a host copy). Norm weights are 1; FP8 weights get per-channel scales for `std`."""
    gen_device = next(model.parameters()).device
    g = torch.Generator(device=gen_device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(("k_scale", "v_scale", "input_scale")):
            continue
        if name.endswith("weight_scale"):
            continue  # set with its weight below
        if "norm" in name:
            p.data.fill_(1.0)
            continue
        if p.dtype == torch.float8_e4m3fn:
            # uniform fp8 codes in [-448, 448]; scale so that values have about `std` spread
            tmp = torch.empty(p.shape, dtype=torch.bfloat16, device=gen_device)
            tmp.normal_(0.0, 448.0 / 4, generator=g).clamp_(-448, 448)
            p.data.copy_(tmp)  # casts in place: no second full-size temporary
            del tmp
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            owner.weight_scale.data.fill_(std * 4 / 448.0)
            continue
        p.data.normal_(0.0, std, generator=g)
