"""RowParallelLinear over a prefill-sized step in token chunks, each chunk's all-reduce started while the next
chunk computes (`_forward_overlapped`): the same rows as one GEMM and one all-reduce.

On the CPU through a one-rank gloo group standing in for the tensor-parallel group (its all-reduce is the
identity, so the reference is the layer's own unchunked GEMM); the two-GPU tests (tests/gpu) run it with
NCCL against TP=1.
"""

import tempfile

import pytest
import torch
import torch.distributed as dist

from hopperllm.distributed.parallel_state import TPGroup
from hopperllm.layers import linear
from hopperllm.layers.linear import RowParallelLinear, quantize_weight_per_channel


@pytest.fixture(scope="module")
def group():
    with tempfile.NamedTemporaryFile() as f:
        dist.init_process_group("gloo", init_method=f"file://{f.name}", rank=0, world_size=1)
        try:
            yield dist.group.WORLD
        finally:
            dist.destroy_process_group()


def _layer(group, quantization, bias):
    tp = TPGroup(rank=0, world_size=2, group=group)  # a two-way layer whose all-reduce has one member
    layer = RowParallelLinear(
        256, 96, bias=bias, quantization=quantization, params_dtype=torch.float32, tp=tp
    )
    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 128, generator=g) * 0.1
    if quantization == "fp8":
        q, s = quantize_weight_per_channel(w)
        layer.weight.data.copy_(q)
        layer.weight_scale.data.copy_(s)
    else:
        layer.weight.data.copy_(w)
    if bias:
        layer.bias.data.copy_(torch.randn(96, generator=g))
    return layer


@pytest.mark.parametrize("quantization", [None, "fp8"])
@pytest.mark.parametrize(
    "tokens, chunks, want", [(2048, 4, 4), (1300, 4, 2), (1023, 4, 1), (4096, 3, 3), (4100, 4, 4)]
)
def test_chunked_all_reduce_gives_the_unchunked_rows(group, monkeypatch, quantization, tokens, chunks, want):
    layer = _layer(group, quantization, bias=True)
    x = torch.randn(tokens, 128, generator=torch.Generator().manual_seed(tokens))
    ref = layer(x)  # OVERLAP_CHUNKS 1: one GEMM, one all-reduce
    monkeypatch.setattr(linear, "OVERLAP_CHUNKS", chunks)
    assert layer._overlap_chunks(x) == want  # chunks of at least OVERLAP_MIN_CHUNK tokens
    calls = []
    real = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, **kw: calls.append(t.shape[0]) or real(t, **kw))
    out = layer(x)
    step = -(-tokens // (want * 128)) * 128 if want > 1 else tokens  # whole 128-token tiles, remainder last
    assert calls == [min(step, tokens - a) for a in range(0, tokens, step)]
    assert all(n % 128 == 0 for n in calls[:-1]) and len(calls) <= want
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_prequantized_input_is_cut_with_its_scales(group, monkeypatch):
    """An FP8 (x_fp8, scale) input from the fused SiLU-mul / norm: per-token scales are cut with their rows,
    a static scale is shared by every chunk."""
    from hopperllm.kernels.fp8 import ref_per_token_quant_fp8, ref_static_quant_fp8

    layer = _layer(group, "fp8", bias=False)
    x = torch.randn(2048, 128, generator=torch.Generator().manual_seed(1))
    static = torch.tensor([0.02])
    for xq in (ref_per_token_quant_fp8(x), (ref_static_quant_fp8(x, static), static)):
        monkeypatch.setattr(linear, "OVERLAP_CHUNKS", 1)
        ref = layer(xq)
        monkeypatch.setattr(linear, "OVERLAP_CHUNKS", 4)
        torch.testing.assert_close(layer(xq), ref, rtol=0, atol=0)
