"""The default model (SmolLM2-135M-Instruct GGUF): greedy tokens equal transformers on the same file."""

from __future__ import annotations

import pytest
import torch

from hopperllm import LLM, SamplingParams

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a GPU is in two sentences.",
    "List three fruits.",
]


@pytest.fixture(scope="module")
def llm(smollm2_gguf_path):
    return LLM(model=None, dtype="float32", device="cpu", num_kv_blocks=64, show_progress=False)


@pytest.mark.slow
def test_greedy_matches_transformers(llm, hf_gguf_model, hf_gguf_tokenizer):
    tok = llm.get_tokenizer()
    params = SamplingParams(max_tokens=32, temperature=0.0)
    convs = [[{"role": "user", "content": p}] for p in PROMPTS]
    outs = llm.chat(convs, params, use_tqdm=False)
    for conv, out in zip(convs, outs, strict=True):
        ids = tok.encode_chat(conv)
        hf_ids = hf_gguf_tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
        if isinstance(hf_ids, dict) or hasattr(hf_ids, "input_ids"):
            hf_ids = hf_ids["input_ids"]
        assert ids == list(hf_ids)
        assert out.prompt_token_ids == ids
        with torch.no_grad():
            ref = hf_gguf_model.generate(
                torch.tensor([ids]),
                max_new_tokens=32,
                do_sample=False,
                pad_token_id=2,
            )[0, len(ids) :].tolist()
        assert out.outputs[0].token_ids == ref
        assert out.outputs[0].text == hf_gguf_tokenizer.decode(ref, skip_special_tokens=True)


def test_default_model_answers(llm):
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(max_tokens=16, temperature=0.0),
        use_tqdm=False,
    )
    assert "Paris" in out[0].outputs[0].text
    assert out[0].outputs[0].finish_reason == "stop"
