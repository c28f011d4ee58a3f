"""EngineArgs: the user-facing engine options (LLM kwargs and CLI flags, vLLM's spelling)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import torch

from hopperllm.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    resolve_dtype,
)
from hopperllm.engine.speculative import SpeculativeConfig


@dataclass
class EngineArgs:
    model: str | None = None
    dtype: str = "auto"
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    max_num_seqs: int = 512
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    cuda_graph_sizes: list[int] | None = None
    seed: int = 0
    device: str = "auto"
    max_waiting_requests: int | None = None
    generation_config: str = "auto"
    speculative_config: str | dict | None = None
    max_logprobs: int = 20
    scheduling_policy: str = "fcfs"

    @staticmethod
    def add_cli_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        d = EngineArgs()
        g = p.add_argument_group("engine")
        g.add_argument(
            "--model",
            default=None,
            help="HF directory, .gguf file or dummy:<preset> (default: SmolLM2-135M-Instruct)",
        )
        g.add_argument(
            "--dtype", default=d.dtype, help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32"
        )
        g.add_argument(
            "--quantization", "-q", default=None, choices=["fp8"], help="quantize weights on the fly"
        )
        g.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype, choices=["auto", "fp8", "fp8_e4m3"])
        g.add_argument("--tensor-parallel-size", "-tp", type=int, default=d.tensor_parallel_size)
        g.add_argument("--max-model-len", type=int, default=None)
        g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
        g.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
        g.add_argument("--block-size", type=int, default=d.block_size)
        g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
        g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
        g.add_argument(
            "--scheduling-policy",
            default=d.scheduling_policy,
            choices=["fcfs", "priority"],
            help="fcfs: requests in arrival order; priority: by each request's priority (lower first), then "
            "arrival, preempting the last in that order when the KV cache is full (as vLLM)",
        )
        g.add_argument("--num-kv-blocks", type=int, default=None, help="fix the KV cache size in blocks")
        g.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
        g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
        g.add_argument(
            "--cuda-graph-sizes",
            type=int,
            nargs="+",
            default=None,
            help="decode batch sizes to capture as CUDA graphs; a batch replays the smallest one that holds "
            "it, larger batches run eagerly (default: 1-8, 12-24 by 4, 32-64 by 8, 80-256 by 16, 288-512 by 32, "
            "up to --max-num-seqs)",
        )
        g.add_argument("--seed", type=int, default=d.seed)
        g.add_argument("--device", default=d.device, choices=["auto", "cuda", "cpu"])
        g.add_argument(
            "--generation-config",
            default=d.generation_config,
            help="sampling defaults for requests that leave them unset: auto (the model's generation_config.json, "
            "as vLLM), vllm (none), or a folder holding a generation_config.json",
        )
        g.add_argument(
            "--max-logprobs",
            type=int,
            default=d.max_logprobs,
            help="the most logprobs (and prompt logprobs) a request may ask for; -1: no limit (as vLLM)",
        )
        g.add_argument(
            "--speculative-config",
            default=None,
            help='speculative decoding, as vLLM\'s JSON: {"method": "ngram", "num_speculative_tokens": 3, '
            '"prompt_lookup_max": 4, "prompt_lookup_min": 1} (drafts from earlier n-grams of the sequence), or '
            '{"model": "DRAFT", "num_speculative_tokens": 5} (drafts from a smaller model of the same vocabulary; '
            'optional "quantization": "fp8")',
        )
        return p

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    def resolve_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA GPU is available")
        return self.device

    def create_engine_config(self):
        """Returns (EngineConfig, ModelSource). Reads the model's config, not its weights."""
        from hopperllm.loader.fp8_checkpoints import kv_cache_is_fp8
        from hopperllm.loader.model_loader import resolve_model

        device = self.resolve_device()
        src = resolve_model(self.model)
        mc = ModelConfig.from_hf_dict(src.hf_config)
        dtype = resolve_dtype(self.dtype, device)
        if self.quantization is not None and self.quantization != "fp8":
            raise ValueError(f"unknown quantization {self.quantization!r}: use fp8")
        max_len = self.max_model_len or mc.max_position_embeddings
        if max_len > mc.max_position_embeddings and not mc.rope_scaling:
            raise ValueError(
                f"max_model_len {max_len} exceeds the model's max_position_embeddings {mc.max_position_embeddings}"
            )
        kv_dtype = self.kv_cache_dtype
        if kv_dtype == "auto" and kv_cache_is_fp8(src.hf_config.get("quantization_config")):
            kv_dtype = "fp8"
        cfg = EngineConfig(
            model=self.model,
            model_config=mc,
            cache_config=CacheConfig(
                block_size=self.block_size,
                kv_cache_dtype=kv_dtype,
                num_kv_blocks=self.num_kv_blocks,
                gpu_memory_utilization=self.gpu_memory_utilization,
                enable_prefix_caching=self.enable_prefix_caching,
            ),
            scheduler_config=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=max(self.max_num_batched_tokens, 1),
                max_model_len=max_len,
                enable_chunked_prefill=self.enable_chunked_prefill,
                max_waiting_requests=self.max_waiting_requests,
                policy=self.scheduling_policy,
            ),
            parallel_config=ParallelConfig(tensor_parallel_size=self.tensor_parallel_size),
            dtype=dtype,
            quantization=self.quantization,
            device=device,
            enforce_eager=self.enforce_eager,
            seed=self.seed,
            cuda_graph_sizes=None if self.cuda_graph_sizes is None else tuple(self.cuda_graph_sizes),
            speculative_config=SpeculativeConfig.parse(self.speculative_config),
            max_logprobs=self.max_logprobs,
        )
        if cfg.speculative_config is not None and cfg.speculative_config.uses_draft_model:
            from hopperllm.engine.speculative import draft_engine_config, draft_max_model_len

            # a draft that cannot serve this target fails here, before any loading; the workers take its
            # ModelSource from the target's (a GGUF draft's file is opened once)
            draft, draft_src = draft_engine_config(cfg)
            spec = cfg.speculative_config
            cfg = cfg.replace(
                speculative_config=dataclasses.replace(
                    spec, max_model_len=draft_max_model_len(spec, draft.model_config)
                )
            )
            src = dataclasses.replace(src, draft=draft_src)
        return cfg, src
