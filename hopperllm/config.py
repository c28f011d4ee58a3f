"""Configuration dataclasses. Config flows down the layers as frozen dataclasses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """'auto' means bfloat16 on a GPU and float32 on the CPU (CPU bf16 matmuls are slow and inexact)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family model, with HF `config.json` names."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type", "llama")
        if model_type not in ("llama", "mistral") and not any("Llama" in a for a in archs):
            raise ValueError(
                f"unsupported model type {model_type!r} (architectures {archs}): hopperllm runs Llama-family models"
            )
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ):
            if key not in cfg:
                raise ValueError(f"model config lacks {key!r}: is this a Llama config.json?")
        hidden_act = cfg.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {hidden_act!r}: Llama uses silu")
        num_heads = int(cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        eos = cfg.get("eos_token_id", 2)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        rope_scaling = cfg.get("rope_scaling")
        rope_theta = cfg.get("rope_theta", 10000.0)
        # transformers >= 5 folds theta and scaling into `rope_parameters`.
        rope_params = cfg.get("rope_parameters")
        if rope_params:
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = dict(rope_params)
        if rope_scaling is not None:
            rope_scaling = dict(rope_scaling)
            rtype = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            rope_scaling["rope_type"] = rtype
            if rtype == "default":
                rope_scaling = None
            elif rtype not in ("llama3", "linear"):
                raise ValueError(
                    f"unsupported rope scaling type {rtype!r}: hopperllm supports llama3 and linear"
                )
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=num_heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        d = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids)
            if len(self.eos_token_ids) != 1
            else self.eos_token_ids[0],
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
        }
        return d

    @property
    def linear_params(self) -> int:
        """Parameters of the attention and MLP projections over all layers (no biases)."""
        h, q = self.hidden_size, self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        return self.num_hidden_layers * (h * (q + 2 * kv) + q * h + 3 * h * self.intermediate_size)

    @property
    def kv_elems_per_token(self) -> int:
        """K and V elements one token keeps in the cache over all layers: 2 * layers * kv_heads * head_dim."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim

    @property
    def num_params(self) -> int:
        emb = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.linear_params + emb + (2 * self.num_hidden_layers + 1) * self.hidden_size


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    kv_cache_dtype: str = "auto"  # "auto" (model dtype) or "fp8" (e4m3)
    num_kv_blocks: int | None = None  # None: size from gpu_memory_utilization (GPU) or max_model_len (CPU)
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True

    def __post_init__(self):
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_dtype not in ("auto", "fp8", "fp8_e4m3", "bfloat16", "float16", "float32"):
            raise ValueError(f"unknown kv_cache_dtype {self.kv_cache_dtype!r}: use auto or fp8")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be at least 1")

    @property
    def is_fp8(self) -> bool:
        return self.kv_cache_dtype.startswith("fp8")


@dataclass(frozen=True)
class SchedulerConfig:
    # 512: Llama-3-8B FP8 1000 x 2048/128 on one H200, 3,306-3,334 output tok/s against 3,236-3,254 at 256
    # (the 257th sequence waited for one to finish, so a decode-only stretch of ~64 steps came with every
    # wave; perf-notes v25); 1024 measured no better (3,323). vLLM's default on >= 70 GiB GPUs is 1024.
    max_num_seqs: int = 512
    max_num_batched_tokens: int = 8192
    max_model_len: int = 4096
    enable_chunked_prefill: bool = True
    max_waiting_requests: int | None = None  # None: unbounded queue
    # "fcfs": waiting requests in arrival order; "priority": by each request's priority (lower first), then
    # arrival, and a full cache preempts the running request that comes last in that order (vLLM's policies)
    policy: str = "fcfs"

    def __post_init__(self):
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling policy must be fcfs or priority, got {self.policy!r}")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be at least 1")
        if self.max_model_len < 1:
            raise ValueError("max_model_len must be at least 1")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) < max_model_len ({self.max_model_len}) "
                "needs chunked prefill"
            )


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1

    def __post_init__(self):
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be at least 1")


@dataclass(frozen=True)
class EngineConfig:
    model: str | None
    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    dtype: torch.dtype = torch.float32
    quantization: str | None = None
    device: str = "cpu"
    enforce_eager: bool = False
    seed: int = 0
    # decode batch sizes captured as CUDA graphs (None: cuda_graphs.DEFAULT_CAPTURE_SIZES)
    cuda_graph_sizes: tuple[int, ...] | None = None
    speculative_config: Any = None  # hopperllm.engine.speculative.SpeculativeConfig, or None
    max_logprobs: int = 20  # vLLM's --max-logprobs: the most (prompt) logprobs a request may ask for; -1: any

    def __post_init__(self):
        if self.cuda_graph_sizes is not None and (
            not self.cuda_graph_sizes or any(s < 1 for s in self.cuda_graph_sizes)
        ):
            raise ValueError(
                f"cuda_graph_sizes must be positive batch sizes, got {list(self.cuda_graph_sizes)}"
            )

    def replace(self, **kw) -> EngineConfig:
        return dataclasses.replace(self, **kw)
