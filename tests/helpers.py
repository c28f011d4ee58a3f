"""Shared test helpers: tiny random HF Llama checkpoints on disk, greedy outputs compared up to near-ties."""

from __future__ import annotations

import json
import os

import torch


def make_hf_llama_dir(path: str, seed: int = 0, **overrides) -> str:
    """Save a tiny random transformers LlamaForCausalLM (safetensors) plus a byte-level tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hopperllm.loader.dummy_tokenizer import byte_tokenizer

    cfg = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    config = LlamaConfig(**cfg)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    # transformers initialises with small std; widen it so that logits differ meaningfully
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.08)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok = byte_tokenizer()
    tok._tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "add_bos_token": True,
                "chat_template": tok.chat_template,
            },
            f,
        )
    return path


def hf_logits(path: str, token_ids: list[int]) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()


def assert_same_until_near_tie(outputs, ref_outputs, max_gap: float) -> None:
    """Greedy CompletionOutputs (with logprobs >= 2) agree token for token; where a sequence first differs,
    the reference's top two logprobs were within `max_gap` (a valid change of summation order can flip
    a near-tie, nothing else); the rest of that sequence is not compared (its context differs)."""
    for a, b in zip(outputs, ref_outputs, strict=True):
        for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=True)):
            if x != y:
                top = sorted(b.logprobs[i].values(), reverse=True)
                assert top[0] - top[1] < max_gap, (i, x, y, top[:2], max_gap)
                break


def sampled_output_counts(llm, prompt, n: int):
    """How often each 3-token output comes out of `n` seeded requests (temperature 0.7, top-k 3) of
    `prompt` (speculative decoding's distribution tests)."""
    from collections import Counter

    from hopperllm import SamplingParams

    params = [
        SamplingParams(max_tokens=3, temperature=0.7, top_k=3, seed=s, ignore_eos=True) for s in range(n)
    ]
    outs = llm.generate([prompt] * n, params, use_tqdm=False)
    return Counter(tuple(o.outputs[0].token_ids) for o in outs)


def total_variation(a, b, n: int) -> float:
    """Total variation distance of two Counters of n samples each."""
    return 0.5 * sum(abs(a[k] - b[k]) for k in set(a) | set(b)) / n
