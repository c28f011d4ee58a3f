"""Llama (2, 3, SmolLM2, ...) as a plain nn.Module over the flat token batch.

Reads top to bottom: MLP, attention, decoder layer, model, causal-LM head, weight loading.
Input is the step's flat token batch (no padding): `input_ids` [T], `positions` [T], one KV-cache
tensor per layer and the step's AttentionMetadata.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn

from hopperllm.config import ModelConfig
from hopperllm.distributed.parallel_state import SINGLE, TPGroup
from hopperllm.layers.attention import Attention, AttentionMetadata
from hopperllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from hopperllm.layers.linear import MergedGateUpLinear, QKVParallelLinear, RowParallelLinear
from hopperllm.layers.norm import RMSNorm
from hopperllm.layers.rotary import build_cos_sin_cache


def silu_and_mul(x: torch.Tensor, quant_fp8: bool = False):
    """SiLU(gate) * up; with quant_fp8 on CUDA, (x_fp8, per-token scale) for the next FP8 GEMM."""
    if x.is_cuda:
        from hopperllm.kernels.activation import silu_and_mul as fused

        return fused(x, out_fp8=quant_fp8)
    half = x.shape[-1] // 2
    return torch.nn.functional.silu(x[..., :half]) * x[..., half:]


def _fuse_quant(linear) -> tuple[bool, torch.Tensor | None]:
    """Whether the kernel before `linear` should emit FP8 for it, and the static scale to use."""
    return linear.takes_fp8_input, linear.input_scale if linear.takes_fp8_input else None


# Decode batches of FP8 models run gate/up + SiLU-mul as one GEMV launch and quantize the down projection's
# input inside its GEMV (fp8_gemv_silu_mul / fp8_gemv_deferred): one kernel fewer per layer, same bits,
# where the fused tiles are the measured kind (silu_mul_fusion_pays). HOPPERLLM_FUSED_MLP=0 keeps the three
# launches everywhere, =2 fuses at every decode shape (both for A/B runs).
FUSED_MLP = os.environ.get("HOPPERLLM_FUSED_MLP", "1")


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, quantization: str | None, tp: TPGroup):
        super().__init__()
        kw = dict(bias=cfg.mlp_bias, quantization=quantization, params_dtype=dtype, tp=tp)
        self.gate_up_proj = MergedGateUpLinear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, **kw)

    def forward(self, x, reduce: bool = True) -> torch.Tensor:
        # SiLU-mul emits per-token FP8 only; a static down_proj input scale takes the unfused path
        quant = self.down_proj.takes_fp8_input and self.down_proj.input_scale is None
        if quant and self._fused_decode(x):
            return self.down_proj(self.gate_up_proj.silu_mul_fp8(x), reduce=reduce)
        return self.down_proj(silu_and_mul(self.gate_up_proj(x), quant_fp8=quant), reduce=reduce)

    def _fused_decode(self, x) -> bool:
        from hopperllm.kernels.fp8 import GEMV_MAX_M, silu_mul_fusion_pays

        return (
            FUSED_MLP != "0"
            and type(x) is tuple  # FP8 (x_fp8, scale) from the norm kernel: CUDA, FP8 gate/up
            and x[0].shape[0] <= GEMV_MAX_M
            and self.gate_up_proj.bias is None
            and self.down_proj.bias is None
            and (
                FUSED_MLP == "2"
                or silu_mul_fusion_pays(x[0].shape[0], *self.gate_up_proj.weight.shape, x[0].device)
            )
        )


def _rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x's rows at idx (FP8 through its bytes: index_select need not support float8 on every device)."""
    if x.element_size() == 1 and x.is_floating_point():
        return x.view(torch.uint8).index_select(0, idx).view(x.dtype)
    return x.index_select(0, idx)


class LlamaAttention(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        dtype: torch.dtype,
        quantization: str | None,
        tp: TPGroup,
        cos_sin: torch.Tensor,
    ):
        super().__init__()
        self.num_heads = cfg.num_attention_heads // tp.world_size
        self.num_kv_heads = cfg.num_key_value_heads // tp.world_size
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        kw = dict(bias=cfg.attention_bias, quantization=quantization, params_dtype=dtype, tp=tp)
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, **kw
        )
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, **kw)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, cos_sin)

    def forward(
        self, positions, x, kv_cache, meta: AttentionMetadata, reduce: bool = True, keep_rows=None
    ) -> torch.Tensor | None:
        """`keep_rows` (int64 indices): o_proj runs on those rows of the attention output only (the
        model's last layer, where only the sampled rows go on); None when it keeps no row."""
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # decode attention can hand an FP8 o_proj its per-token quantized input from the same kernel
        quant = self.o_proj.takes_fp8_input and self.o_proj.input_scale is None and qkv.is_cuda
        out = self.attn(positions, q, k, v, kv_cache, meta, quant_out=quant)
        if keep_rows is not None:
            if keep_rows.numel() == 0:
                return None
            if isinstance(out, tuple):  # (FP8 rows, their scales)
                out = tuple(_rows(t, keep_rows) for t in out)
            else:
                out = _rows(out, keep_rows)
        return self.o_proj(out, reduce=reduce)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg, dtype, quantization, tp, cos_sin):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(cfg, dtype, quantization, tp, cos_sin)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(cfg, dtype, quantization, tp)

    def forward(self, positions, hidden, residual, kv_cache, meta, fused_ar=None, keep_rows=None):
        """`fused_ar` (a `FusedAllReduceNorm`, tensor-parallel decode): the row-parallel projections return
        partial sums and each norm all-reduces them in its own kernel; so does the caller's next norm with
        the MLP's output this returns. The first layer's input (the embedding) is already whole.
        `keep_rows`: every row's k / v go into the cache, but from the attention output on only these rows
        go on (o_proj, the norm, the MLP) and are returned, with their residual rows; no row -> (None, None)."""
        # On CUDA the norms emit FP8 (+ scale) straight for FP8 GEMMs; on CPU they return activations.
        q1, s1 = _fuse_quant(self.self_attn.qkv_proj)
        q2, s2 = _fuse_quant(self.mlp.gate_up_proj)
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden, quant_fp8=q1, static_scale=s1)
        else:
            hidden, residual = self.input_layernorm(
                hidden, residual, quant_fp8=q1, static_scale=s1, all_reduce=fused_ar
            )
        hidden = self.self_attn(
            positions, hidden, kv_cache, meta, reduce=fused_ar is None, keep_rows=keep_rows
        )
        if keep_rows is not None:
            if hidden is None:
                return None, None
            residual = _rows(residual, keep_rows)
        hidden, residual = self.post_attention_layernorm(
            hidden, residual, quant_fp8=q2, static_scale=s2, all_reduce=fused_ar
        )
        return self.mlp(hidden, reduce=fused_ar is None), residual


class LlamaModel(nn.Module):
    def __init__(
        self, cfg: ModelConfig, dtype: torch.dtype, quantization: str | None, tp: TPGroup, max_pos: int
    ):
        super().__init__()
        self.tp = tp
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, tp)
        cos_sin = build_cos_sin_cache(cfg.head_dim, max_pos, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, dtype, quantization, tp, cos_sin) for _ in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(
        self, input_ids, positions, kv_caches: list[torch.Tensor], meta: AttentionMetadata, keep_rows=None
    ):
        """Final hidden states [T, H]; with `keep_rows` (int64 indices, e.g. the rows a step samples) only
        those rows [len(keep_rows), H]: the last layer still writes every row's k / v to the cache, but
        its o_proj and MLP run on the kept rows alone (in a prefill step, one row a prompt: the skipped
        rows' outputs feed nothing)."""
        hidden = self.embed_tokens(input_ids)
        fused = self.tp.fused_norm
        if fused is not None and not fused.supports(hidden):  # prefill-sized steps all-reduce apart
            fused = None
        residual = None
        last = len(self.layers) - 1
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            keep = keep_rows if i == last else None
            hidden, residual = layer(
                positions, hidden, residual, kv_cache, meta, fused_ar=fused, keep_rows=keep
            )
        if hidden is None:  # no row kept
            return self.embed_tokens.weight.new_empty((0, self.embed_tokens.weight.shape[1]))
        hidden, _ = self.norm(hidden, residual, all_reduce=fused)
        return hidden


# checkpoint name piece -> (our module name piece, shard index)
_STACKED = {
    ".q_proj.": (".qkv_proj.", 0),
    ".k_proj.": (".qkv_proj.", 1),
    ".v_proj.": (".qkv_proj.", 2),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}


class LlamaForCausalLM(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        dtype: torch.dtype = torch.float32,
        quantization: str | None = None,
        tp: TPGroup = SINGLE,
        max_position: int | None = None,
    ):
        super().__init__()
        self.config = cfg
        self.tp = tp
        max_pos = max(max_position or 0, cfg.max_position_embeddings)
        self.model = LlamaModel(cfg, dtype, quantization, tp, max_pos)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype, tp)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, positions, kv_caches, meta, keep_rows=None) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta, keep_rows=keep_rows)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    # -- weights ----------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF-named tensors (`model.layers.0.self_attn.q_proj.weight`, FP8 `weight_scale`,
        `input_scale`, `k_scale`/`v_scale`, ...). Returns the set of our parameter names loaded."""
        modules = dict(self.named_modules())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if self.config.tie_word_embeddings and name == "lm_head.weight":
                continue  # tied: the embedding is the head
            # KV-cache scales: `...self_attn.k_proj.k_scale` (compressed-tensors), `...self_attn.k_scale`
            # or ModelOpt's `...self_attn.k_proj.k_scale` / `...kv_cache_scale`.
            if name.endswith((".k_scale", ".v_scale")):
                layer_prefix = name[: name.index(".self_attn.") + len(".self_attn")]
                attn = modules.get(layer_prefix + ".attn")
                if attn is None:
                    raise ValueError(f"unexpected tensor {name!r} in checkpoint")
                which = "k_scale" if name.endswith(".k_scale") else "v_scale"
                getattr(attn, which).data.copy_(tensor.float().reshape(-1)[:1])
                loaded.add(f"{layer_prefix}.attn.{which}")
                continue
            module_name, _, kind = name.rpartition(".")
            shard = 0
            for ckpt_piece, (ours, idx) in _STACKED.items():
                if ckpt_piece in module_name + ".":
                    module_name = (module_name + ".").replace(ckpt_piece, ours)[:-1]
                    shard = idx
                    break
            module = modules.get(module_name)
            if module is None:
                raise ValueError(f"checkpoint tensor {name!r} matches no layer of the Llama model")
            if hasattr(module, "load_shard"):
                module.load_shard(kind, tensor, shard)
            else:  # norms: plain parameters
                param = getattr(module, kind, None)
                if param is None or param.shape != tensor.shape:
                    raise ValueError(
                        f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected "
                        f"{None if param is None else tuple(param.shape)}"
                    )
                param.data.copy_(tensor)
            loaded.add(f"{module_name}.{kind}")
        return loaded

    def required_weight_names(self) -> set[str]:
        names = set()
        for name, _ in self.named_parameters(remove_duplicate=True):
            if name.endswith((".k_scale", ".v_scale", ".weight_scale", ".input_scale")):
                continue  # optional: default 1.0 / computed on the fly
            names.add(name)
        return names
