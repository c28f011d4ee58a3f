"""Shared by the profiling and A/B scripts here: an engine for decode profiling with running decodes,
and paged decode- and prefill-attention problems."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from bench_kernels import num_sets  # benchmarks/ is on sys.path when run as a script

from hopperllm import LLM, SamplingParams


def add_decode_args(p, model: str = "dummy:llama-2-7b", gpu_memory_utilization: float = 0.85) -> None:
    """The flags decode_llm and start_decodes read: --model, --quantization, --kv-cache-dtype, --context,
    --batch-size, --gpu-memory-utilization (and --output-json)."""
    p.add_argument("--model", default=model)
    p.add_argument("--quantization", default="fp8")
    p.add_argument("--kv-cache-dtype", default="fp8")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--gpu-memory-utilization", type=float, default=gpu_memory_utilization)
    p.add_argument("--output-json", default=None)


def decode_llm(
    a, batch_size: int = 1, gpu_memory_utilization: float = 0.85, max_model_len: int = 4096, **kw
) -> LLM:
    """An LLM for batch-`batch_size` decode profiling from the scripts' --model / --quantization /
    --kv-cache-dtype flags: `max_model_len` tokens a sequence, no prefix caching (every prompt is computed)."""
    return LLM(
        model=a.model,
        quantization=a.quantization,
        kv_cache_dtype=a.kv_cache_dtype,
        max_num_seqs=max(8, batch_size),
        max_model_len=max_model_len,
        enable_prefix_caching=False,
        gpu_memory_utilization=gpu_memory_utilization,
        **kw,
    )


def start_decodes(eng, batch_size: int, context: int, settle_steps: int = 3) -> None:
    """Add `batch_size` random prompts of `context` tokens (400 greedy tokens each) and step through
    their prefill (in budget-sized chunks) and `settle_steps` decodes."""
    g = torch.Generator().manual_seed(0)
    for i in range(batch_size):
        ids = torch.randint(100, 30000, (context,), generator=g).tolist()
        eng.add_request(
            f"r{i}", {"prompt_token_ids": ids}, SamplingParams(max_tokens=400, ignore_eos=True, temperature=0)
        )
    budget = eng.scheduler.max_num_batched_tokens
    for _ in range(settle_steps + -(-batch_size * context // budget)):
        eng.step()


def prefill_problem(B: int, ctx: int, hq: int, hkv: int, d: int, block_size: int = 16, shuffle: bool = False):
    """B prompts of ctx tokens on a paged FP8 cache (blocks in order, or shuffled), bf16 queries, unit
    scales, and the causal attention's FLOPs."""
    nblk = B * ctx // block_size
    dev = "cuda"
    blocks = torch.randperm(nblk, device=dev) if shuffle else torch.arange(nblk, device=dev)
    return SimpleNamespace(
        cache=torch.randn(2, nblk + 8, block_size, hkv, d, device=dev).to(torch.float8_e4m3fn),
        tables=blocks.to(torch.int32).view(B, -1),
        seq_lens=torch.full((B,), ctx, dtype=torch.int32, device=dev),
        cu=torch.arange(0, B * ctx + 1, ctx, dtype=torch.int32, device=dev),
        q=torch.randn(B * ctx, hq, d, device=dev, dtype=torch.bfloat16),
        one=torch.ones(1, device=dev),
        flops=4 * B * (ctx * (ctx + 1) / 2) * hq * d,
    )


def decode_problem(B: int, ctx: int, hq: int, hkv: int, d: int, cache_blocks: int = 0, l2_bytes: int = 0,
                   block_size: int = 16):  # fmt: skip
    """B sequences of ctx keys on paged FP8 caches (the tables scattered over a cache of at least
    `cache_blocks` blocks), one bf16 query each, unit scales, and the K / V bytes a call reads. With `l2_bytes`,
    enough caches of the same layout (`caches`) that calls taking them in turn read no L2-resident data."""
    per_seq = -(-ctx // block_size)
    nb = max(B * per_seq + 8, cache_blocks)
    n = num_sets(2 * nb * block_size * hkv * d, l2_bytes) if l2_bytes else 1
    dev = "cuda"
    caches = [torch.randn(2, nb, block_size, hkv, d, device=dev).to(torch.float8_e4m3fn) for _ in range(n)]
    return SimpleNamespace(
        caches=caches,
        cache=caches[0],
        tables=torch.randperm(nb - 8, device=dev, dtype=torch.int32)[: B * per_seq].view(B, -1),
        seq_lens=torch.full((B,), ctx, dtype=torch.int32, device=dev),
        q=torch.randn(B, hq, d, device=dev, dtype=torch.bfloat16),
        one=torch.ones(1, device=dev),
        blocks=nb,
        kv_bytes=B * ctx * hkv * d * 2,
    )
