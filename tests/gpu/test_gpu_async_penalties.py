"""Penalties and bad words under async scheduling on the GPU: the in-flight token is counted (or checked)
from the previous step's device tensor (no host sync); outputs equal the synchronous engine's, beside
CUDA-graph decode steps."""

from __future__ import annotations

from hopperllm import LLM, SamplingParams


def test_penalties_async_equal_sync():
    kw = dict(model="dummy:tiny", max_model_len=256, num_kv_blocks=256, show_progress=False)
    prompts = ["abc abc abc", "Once upon a time", "xyz", "The quick brown fox"]
    params = [
        SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, repetition_penalty=1.4),
        SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, frequency_penalty=1.0),
        SamplingParams(temperature=1.0, seed=5, max_tokens=32, ignore_eos=True, presence_penalty=1.5),
        SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, bad_words=["abc", "on", "e t"]),
    ]
    outs = []
    for async_scheduling in (True, False):
        llm = LLM(**kw)
        llm.engine.async_scheduling = async_scheduling
        outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
    assert outs[0] == outs[1]
