"""n-gram speculative decoding on the GPU: steps with drafts run eagerly beside the CUDA-graph decode steps;
greedy tokens equal decoding without drafts (bf16 and FP8)."""

from __future__ import annotations

import pytest

from hopperllm import LLM, SamplingParams


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_greedy_speculative_equals_plain_decoding(quantization):
    kw = dict(
        model="dummy:tiny",
        quantization=quantization,
        max_model_len=256,
        num_kv_blocks=256,
        show_progress=False,
    )
    prompts = ["abc abc abc abc abc", "Once upon a time, once upon a time, once upon", "xyz"]
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in LLM(**kw).generate(prompts, params, use_tqdm=False)]
    spec = LLM(
        **kw, speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}
    )
    out = [o.outputs[0].token_ids for o in spec.generate(prompts, params, use_tqdm=False)]
    assert out == ref
    assert spec.engine.num_accepted_tokens > 0
