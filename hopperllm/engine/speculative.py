"""Speculative decoding, as vLLM's `--speculative-config` JSON:
- n-gram (prompt lookup) drafts: `{"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": N,
  "prompt_lookup_min": M}`. Before a step, a decoding sequence whose last n tokens (n from N down to M)
  occurred earlier in its prompt or output proposes the K tokens that followed that occurrence.
- a draft model: `{"model": "<HF dir | .gguf | dummy:preset>", "num_speculative_tokens": K}` (method
  "draft_model", implied by "model"; optional "quantization": "fp8", "draft_tensor_parallel_size": 1). A
  smaller model of the same vocabulary runs beside the target in every worker (sharded the same way; with
  draft_tensor_parallel_size 1, whole in the first worker), with its own KV cache over the target's block
  tables: each step it catches up on the sequence's tokens it has not seen and then proposes K tokens greedily,
  one decode step each (hopperllm.worker.worker.Worker.propose_drafts).

The step computes the sequence's new token and its drafts together and samples at each of their positions;
draft i is accepted while it equals the token sampled at its position, and the first token sampled after the
accepted drafts is the step's own. For a draft that is one token for sure, accepting exactly when the sample
equals it is speculative sampling's rule (accept with probability p(draft); otherwise a sample of p without
the draft), so outputs follow the same distribution as without drafts (greedy outputs are the same tokens).
The engine steps synchronously while drafting (the drafts need the last token on the host).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np

METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 3
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    model: str | None = None  # the draft model (method draft_model)
    quantization: str | None = None  # the draft's weights: None (as its checkpoint) or "fp8"
    # None or the target's: the draft is sharded as the target, on every rank; 1: the whole draft on the first
    # rank only (a small draft over many GPUs would spend its steps in all-reduces)
    draft_tensor_parallel_size: int | None = None
    # no drafts while at least this many sequences run (vLLM's key): big batches are compute-bound, where a
    # verify step's extra rows cost more than the drafts save; the engine then schedules asynchronously
    disable_by_batch_size: int | None = None
    # no drafts for a sequence past this many tokens (vLLM's key); for a draft model at most the positions it
    # was trained on (create_engine_config sets it: past them its drafts are noise)
    max_model_len: int | None = None

    def __post_init__(self):
        method = "ngram" if self.method == "[ngram]" else self.method
        object.__setattr__(self, "method", method)
        if method not in METHODS:
            raise ValueError(
                f"speculative method {self.method!r} is not supported: use ngram, or draft_model with a model"
            )
        if method == "draft_model" and not self.model:
            raise ValueError('speculative method draft_model needs "model": the draft model to run')
        if method == "ngram" and self.model:
            raise ValueError('speculative "model" goes with method draft_model (or no method), not ngram')
        if not isinstance(self.num_speculative_tokens, int) or not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(
                f"num_speculative_tokens must be in [1, 16], got {self.num_speculative_tokens!r}"
            )
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(
                "speculative prompt_lookup_min / prompt_lookup_max need 1 <= min <= max, got "
                f"{self.prompt_lookup_min} / {self.prompt_lookup_max}"
            )
        if self.disable_by_batch_size is not None and (
            not isinstance(self.disable_by_batch_size, int) or self.disable_by_batch_size < 1
        ):
            raise ValueError(f"disable_by_batch_size must be at least 1, got {self.disable_by_batch_size!r}")
        if self.max_model_len is not None and (
            not isinstance(self.max_model_len, int) or self.max_model_len < 2
        ):
            raise ValueError(f"speculative max_model_len must be at least 2, got {self.max_model_len!r}")
        if self.quantization not in (None, "fp8"):
            raise ValueError(f"speculative quantization {self.quantization!r}: use fp8 or leave it out")

    @property
    def uses_draft_model(self) -> bool:
        return self.method == "draft_model"

    @classmethod
    def parse(cls, value: str | dict | SpeculativeConfig | None) -> SpeculativeConfig | None:
        """From --speculative-config's JSON text, or a dict (vLLM's keys)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"--speculative-config is not JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError("the speculative config must be a JSON object")
        known = {
            "method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "model",
            "quantization", "draft_tensor_parallel_size", "disable_by_batch_size", "max_model_len",
        }  # fmt: skip
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown speculative config keys {unknown}: known ones are {sorted(known)}")
        if "method" not in value:
            value = {**value, "method": "draft_model" if value.get("model") else "ngram"}
        if "prompt_lookup_max" in value and "prompt_lookup_min" not in value:
            value = {**value, "prompt_lookup_min": min(1, value["prompt_lookup_max"])}
        return cls(**value)


def propose_ngram(token_ids: list[int], k: int, n_max: int, n_min: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix of `token_ids`
    (n_max down to n_min tokens long); [] when no suffix occurred before. The search runs in C over the ids
    as int32 bytes (bytes.rfind; matches must start on a token boundary)."""
    size = len(token_ids)
    if size < 2:
        return []
    raw = np.asarray(token_ids, dtype=np.int32).tobytes()
    for n in range(min(n_max, size - 1), n_min - 1, -1):
        suffix = raw[(size - n) * 4 :]
        end = (size - 1) * 4  # an occurrence ending before the last token: not the suffix itself
        while (at := raw.rfind(suffix, 0, end)) >= 0:
            if at % 4 == 0:
                start = at // 4 + n
                return token_ids[start : start + k]
            end = at + len(suffix) - 1
    return []


def draft_engine_config(config, src=None):
    """(EngineConfig, ModelSource) of the draft model of `config` (an EngineConfig whose speculative config
    names one): the target's cache, scheduler, parallel and device settings with the draft's model and weights
    (`src`, the draft's ModelSource where it is resolved already). Raises ValueError where the pair cannot work
    together (vocabularies, tensor-parallel split)."""
    from hopperllm.config import ModelConfig, ParallelConfig
    from hopperllm.loader.model_loader import resolve_model

    spec = config.speculative_config
    if src is None:
        try:
            src = resolve_model(spec.model)
        except ValueError as e:
            raise ValueError(f"the speculative draft model: {e}") from None
    mc = ModelConfig.from_hf_dict(src.hf_config)
    target = config.model_config
    if mc.vocab_size != target.vocab_size:
        raise ValueError(
            f"the draft model {spec.model!r} has a vocabulary of {mc.vocab_size} tokens, the target "
            f"{target.vocab_size}: speculative decoding needs the same tokenizer"
        )
    tp = config.parallel_config.tensor_parallel_size
    if spec.draft_tensor_parallel_size not in (None, 1, tp):
        raise ValueError(
            f"draft_tensor_parallel_size {spec.draft_tensor_parallel_size}: use 1 (the draft on the first GPU) "
            f"or the target's tensor_parallel_size {tp}"
        )
    if spec.draft_tensor_parallel_size == 1:
        tp = 1
    if mc.num_attention_heads % tp or mc.num_key_value_heads % tp:
        raise ValueError(
            f"the draft model's {mc.num_attention_heads} attention / {mc.num_key_value_heads} KV heads do not "
            f"split over tensor_parallel_size {tp}"
        )
    max_len = config.scheduler_config.max_model_len
    if (
        max_len > mc.max_position_embeddings
        and not mc.rope_scaling
        and (spec.max_model_len is None or spec.max_model_len > mc.max_position_embeddings)
    ):
        logging.getLogger(__name__).info(
            "the draft model %s was trained on %d positions (max_model_len %d): no drafts past them",
            spec.model, mc.max_position_embeddings, max_len,
        )  # fmt: skip
    draft = config.replace(
        model=spec.model, model_config=mc, quantization=spec.quantization, speculative_config=None,
        parallel_config=ParallelConfig(tensor_parallel_size=tp),
    )  # fmt: skip
    return draft, src


class DraftView:
    """A drafting sequence as the draft model sees it, for a StepEncoder: the target's tokens (with the drafts'
    places at the end) and block table, the draft cache's progress as num_computed_tokens, greedy sampling."""

    __slots__ = ("seq",)
    num_placeholders = 0
    token_bitmask = None

    def __init__(self, seq):
        self.seq = seq

    @property
    def sampling_params(self):
        return GREEDY

    def __getattr__(self, name):  # seq_id, request_id, index, prompt_token_ids, token_ids, block_table, ...
        return getattr(self.seq, name)

    @property
    def num_computed_tokens(self) -> int:
        return self.seq.draft_computed


def _greedy():
    from hopperllm.sampling_params import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=1)


GREEDY = _greedy()


def draft_max_model_len(spec: SpeculativeConfig, draft_model_config) -> int | None:
    """How long a sequence may grow and still take drafts: the config's max_model_len, and for a draft model
    without rope scaling at most the positions it was trained on."""
    limits = [spec.max_model_len] if spec.max_model_len is not None else []
    if draft_model_config is not None and not draft_model_config.rope_scaling:
        limits.append(draft_model_config.max_position_embeddings)
    return min(limits) if limits else None
