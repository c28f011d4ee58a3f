"""n-gram speculative decoding on the GPU: steps with drafts run eagerly (their positions through the prefill
kernels) beside the CUDA-graph decode steps. In float32 greedy tokens equal decoding without drafts; in FP8,
where the two kernels round differently, every token is the argmax of the full-sequence logits up to a
rounding-sized gap."""

from __future__ import annotations

import pytest

from hopperllm import LLM, SamplingParams

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}
PROMPTS = ["abc abc abc abc abc", "Once upon a time, once upon a time, once upon", "xyz"]


def test_float32_greedy_speculative_equals_plain_decoding():
    kw = dict(model="dummy:tiny", dtype="float32", max_model_len=256, num_kv_blocks=256, show_progress=False)
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in LLM(**kw).generate(PROMPTS, params, use_tqdm=False)]
    spec = LLM(**kw, speculative_config=SPEC)
    out = [o.outputs[0].token_ids for o in spec.generate(PROMPTS, params, use_tqdm=False)]
    assert out == ref
    assert spec.engine.num_accepted_tokens > 0


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_speculative_tokens_are_greedy_choices(quantization):
    kw = dict(
        model="dummy:tiny",
        quantization=quantization,
        max_model_len=256,
        num_kv_blocks=256,
        show_progress=False,
    )
    spec = LLM(**kw, speculative_config=SPEC)
    outs = spec.generate(
        PROMPTS, SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True), use_tqdm=False
    )
    assert spec.engine.num_accepted_tokens > 0
    for o in outs:
        ids = o.prompt_token_ids + o.outputs[0].token_ids
        logits = spec.engine.executor.logits_for_tokens(ids).float()
        n = len(o.prompt_token_ids)
        for j, t in enumerate(o.outputs[0].token_ids):
            row = logits[n - 1 + j]
            gap = float(row.max() - row[t])
            assert gap <= 0.02 * float(row.abs().max()) + 1e-3, (j, t, gap)
