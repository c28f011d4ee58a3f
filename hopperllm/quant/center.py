"""Centering the V cache: subtract each V channel's mean before it is cached, add it back after attention.

An attention output is a convex combination of the cached V rows (the softmax weights sum to 1), so for
any vector m per KV head,

    sum_j p_j v_j = sum_j p_j (v_j - m) + m.

`center_v_cache_` moves m, the mean of V over calibration text, into v_proj's bias (minus m) and o_proj's
bias (plus W_o m, m repeated over the query heads of each KV head): the model computes the same function
in exact arithmetic, but the cache stores v - m. Where V has a large common component per channel, FP8
rounds the centered values with a smaller absolute error (e4m3's error is relative to the value), and
o_proj's input, the centered attention output, is rounded to FP8 the same way. Measured on SmolLM2 in
docs/fp8-accuracy.md.

The result is a standard Llama checkpoint with `attention_bias: true` (q_proj and k_proj biases zero),
which HF transformers, vLLM and hopperllm all load. K cannot be centered this way: the cache holds K
after the rotary embedding, and a bias before the rotation is rotated by each key's position.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch
from torch import nn


def v_means(
    model: nn.Module,
    run_chunk: Callable[[list[int]], object],
    chunks: Iterable[list[int]],
    show_progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Mean V per attention layer, KV head and channel over the calibration chunks (a calibration pass:
    `calibrate.AmaxObserver` sums V as it takes the ranges)."""
    from hopperllm.quant.calibrate import calibrate

    return calibrate(model, run_chunk, chunks, show_progress=show_progress).v_mean


def _add_bias_(linear: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """bias += delta (float64 sum, stored in the layer's parameter dtype); creates a zero bias if none.
    Returns what the stored bias changed by (float64): delta after rounding to that dtype."""
    if linear.bias is None:
        linear.bias = nn.Parameter(
            torch.zeros(linear.output_size, dtype=linear.params_dtype, device=linear.weight.device),
            requires_grad=False,
        )
    old = linear.bias.data.double()
    linear.bias.data.copy_((old + delta.to(linear.bias.device)).to(linear.bias.dtype))
    return linear.bias.data.double() - old


def _attention_blocks(
    model: nn.Module, means: dict[str, torch.Tensor]
) -> list[tuple[str, nn.Module, nn.Module]]:
    """(name, attention layer, its parent self_attn block) for every attention layer, after checking that
    each can be centered: unquantized projections and a mean of shape [num_kv_heads, head_dim]."""
    from hopperllm.layers.attention import Attention

    if getattr(model, "tp", None) is not None and model.tp.world_size != 1:
        raise ValueError("centering the V cache runs on one GPU: use --tensor-parallel-size 1")
    blocks = []
    for name, attn in model.named_modules():
        if not isinstance(attn, Attention):
            continue
        parent = model.get_submodule(name.rpartition(".")[0])  # model.layers.i.self_attn
        if parent.qkv_proj.quantization is not None or parent.o_proj.quantization is not None:
            raise ValueError(
                f"{name}: the V cache is centered before quantizing, on bf16/fp32 weights "
                "(this model's attention projections are already FP8)"
            )
        if name not in means:
            raise ValueError(f"calibration never ran {name}: no V mean for it")
        shape = (attn.num_kv_heads, attn.head_dim)
        if tuple(means[name].shape) != shape:
            raise ValueError(f"{name}: the V mean has shape {tuple(means[name].shape)}, expected {shape}")
        blocks.append((name, attn, parent))
    return blocks


@torch.no_grad()  # not inference_mode: the new biases must stay ordinary tensors, updatable later
def center_v_cache_(model: nn.Module, means: dict[str, torch.Tensor]) -> int:
    """Move each layer's mean V into v_proj's and o_proj's biases (module docstring), in place, on an
    unquantized single-rank model. Returns the number of attention layers changed; sets the model
    config's `attention_bias`. Every layer is checked before any is changed (a ValueError leaves the
    model as it was)."""
    blocks = _attention_blocks(model, means)
    for name, attn, parent in blocks:
        qkv, o = parent.qkv_proj, parent.o_proj
        m = means[name].double()  # [Hkv, D]
        delta = torch.zeros(qkv.output_size, dtype=torch.float64, device=m.device)
        delta[parent.q_size + parent.kv_size :] = -m.reshape(-1)
        # what V actually moved by, once rounded to the bias dtype: o_proj adds exactly that back
        shift = -_add_bias_(qkv, delta)[parent.q_size + parent.kv_size :].reshape(attn.num_kv_heads, -1)
        group = attn.num_heads // attn.num_kv_heads
        m_q = shift.repeat_interleave(group, dim=0).reshape(-1)  # query head h reads KV head h // group
        _add_bias_(o, o.weight.data.double() @ m_q.to(o.weight.device))
    if blocks and hasattr(model, "config"):
        model.config = dataclasses.replace(model.config, attention_bias=True)
    return len(blocks)
