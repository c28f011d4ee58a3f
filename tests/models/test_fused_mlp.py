"""LlamaMLP's fused decode path (FP8 gate/up GEMV with SiLU-mul in its epilogue, down GEMV quantizing its
input on load) against the unfused path, on CPU through Triton's interpreter.

On a GPU the norm kernel hands the MLP an (x_fp8, scale) pair; here the test hands it one.
"""

from __future__ import annotations

import pytest
import torch

from hopperllm.config import ModelConfig
from hopperllm.kernels import fp8
from hopperllm.kernels.fp8 import ref_per_token_quant_fp8
from hopperllm.layers.linear import quantize_weight_per_channel
from hopperllm.models import llama

CFG = ModelConfig(
    vocab_size=64, hidden_size=128, intermediate_size=96, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=1, head_dim=64,
)  # fmt: skip


def fp8_mlp(seed: int) -> llama.LlamaMLP:
    mlp = llama.LlamaMLP(CFG, torch.float32, "fp8", llama.SINGLE)
    g = torch.Generator().manual_seed(seed)
    for layer in (mlp.gate_up_proj, mlp.down_proj):
        q, s = quantize_weight_per_channel(torch.randn(layer.weight.shape, generator=g) * 0.05)
        layer.weight.data.copy_(q)
        layer.weight_scale.data.copy_(s)
    return mlp


@pytest.mark.parametrize("tokens", [1, 3])
def test_fused_decode_mlp_equals_unfused(monkeypatch, tokens):
    monkeypatch.setattr(fp8, "silu_mul_fusion_pays", lambda *a: True)  # this tiny MLP's tiles are narrow
    mlp = fp8_mlp(seed=tokens)
    x = ref_per_token_quant_fp8(
        torch.randn(tokens, CFG.hidden_size, generator=torch.Generator().manual_seed(7))
    )
    assert mlp._fused_decode(x)
    fused = mlp(x)
    monkeypatch.setattr(llama, "FUSED_MLP", "0")
    assert not mlp._fused_decode(x)
    unfused = mlp(x)  # gate/up GEMV, torch SiLU-mul, FP8 linear (per-token quantize + dequantized matmul)
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5 * unfused.abs().max().item())


def test_static_down_input_scale_keeps_the_unfused_path():
    mlp = fp8_mlp(seed=0)
    mlp.down_proj.load_shard("input_scale", torch.tensor([0.01]))
    x = ref_per_token_quant_fp8(torch.randn(1, CFG.hidden_size))
    calls = []
    mlp.gate_up_proj.silu_mul_fp8 = lambda x: calls.append(x)
    mlp(x)
    assert not calls


def test_fusion_only_where_measured(monkeypatch):
    """The fused MLP runs where its tiles are the measured kind: Llama-2-70B at TP=1/2, batches up to 16
    (the tuned batch-1 configs serve one 16-token tile; at batch 5, TP=2: v18 in docs/perf-notes.md), and
    Llama-2-7B with its stream-K gate/up tile of 128 rows (v23: TPOT 3.14 ms unfused, 3.10 fused)."""
    cpu = torch.device("cpu")
    assert fp8.silu_mul_fusion_pays(1, 57344, 8192, cpu) and fp8.silu_mul_fusion_pays(1, 28672, 8192, cpu)
    assert fp8.silu_mul_fusion_pays(4, 28672, 8192, cpu) and fp8.silu_mul_fusion_pays(16, 28672, 8192, cpu)
    assert fp8.silu_mul_fusion_pays(1, 22016, 4096, cpu)  # Llama-2-7B, stream-K: 128-row tiles
    monkeypatch.setattr(fp8, "GEMV_STREAM_K", "0")
    assert not fp8.silu_mul_fusion_pays(1, 22016, 4096, cpu)  # its split-K config: 32-row fused tiles
    monkeypatch.undo()
    assert not fp8.silu_mul_fusion_pays(17, 28672, 8192, cpu)  # larger batches: the M > 1 rule's narrow tiles
    x = ref_per_token_quant_fp8(torch.randn(1, CFG.hidden_size))
    assert not fp8_mlp(seed=0)._fused_decode(x)


def test_fused_mlp_everywhere_on_request(monkeypatch):
    monkeypatch.setattr(llama, "FUSED_MLP", "2")  # HOPPERLLM_FUSED_MLP=2: fuse at every decode shape
    assert fp8_mlp(seed=0)._fused_decode(ref_per_token_quant_fp8(torch.randn(2, CFG.hidden_size)))


def test_gated_config_keeps_wgmma_tiles_and_fits_shared_memory():
    base = {"BLOCK_M": 16, "BLOCK_K": 256, "SPLIT_K": 1, "num_stages": 4, "num_warps": 8}
    g = fp8.gated_config({**base, "BLOCK_N": 128})  # the 70B's: 64 gate + 64 up rows, 4 stages fit
    assert (g["BLOCK_N"], g["SPLIT_K"], g["num_stages"]) == (64, 1, 4)
    g = fp8.gated_config({**base, "BLOCK_N": 64, "BLOCK_K": 512})  # the 7B's: keep 64 rows, split K
    assert (g["BLOCK_N"], g["SPLIT_K"]) == (64, 2) and g["num_stages"] * (2 * 64 + 16) * 512 <= 200 * 1024
    assert fp8.gated_config({**base, "BLOCK_N": 32})["BLOCK_N"] == 16  # batches: narrow tiles halve
