"""Structured outputs on the GPU: the bitmask reaches the sampler on the device, beside the CUDA-graph decode
steps, and constrained rows leave the free rows of their batch as they were."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from hopperllm import LLM, SamplingParams, StructuredOutputsParams
from hopperllm.layers.sampler import apply_token_bitmask

pytest.importorskip("llguidance")

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}


def test_token_bitmask_on_the_device_equals_the_cpu(cuda_device):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(9, 32000, generator=g)
    words = torch.randint(-(2**31), 2**31 - 1, (4, 1000), generator=g, dtype=torch.int64).to(torch.int32)
    rows = torch.tensor([0, 3, 4, 8])
    cpu = apply_token_bitmask(logits, rows, words)
    gpu = apply_token_bitmask(logits.to(cuda_device), rows.to(cuda_device), words.to(cuda_device))
    assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_constrained_and_free_rows_in_cuda_graph_steps(quantization):
    llm = LLM(
        model="dummy:tiny",
        quantization=quantization,
        max_model_len=128,
        max_num_seqs=8,
        num_kv_blocks=256,  # the other case's engine may still hold its cache
        show_progress=False,
    )
    free = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    prompts = ["abc", "Once upon a time", "xyz"]
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, free, use_tqdm=False)]
    so_json = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    so_regex = StructuredOutputsParams(regex=r"[a-c]{2,5}x")
    mixed = [
        free,
        SamplingParams(temperature=1.0, seed=3, max_tokens=40, structured_outputs=so_json),
        free,
        SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=so_regex, n=2),
        free,
    ]
    outs = llm.generate([prompts[0], "json?", prompts[1], "regex?", prompts[2]], mixed, use_tqdm=False)
    assert [outs[i].outputs[0].token_ids for i in (0, 2, 4)] == alone
    obj = json.loads(outs[1].outputs[0].text)
    assert set(obj) == {"ok", "n"} and isinstance(obj["ok"], bool) and 0 <= obj["n"] <= 9
    assert all(re.fullmatch(r"[a-c]{2,5}x", c.text) for c in outs[3].outputs), [
        c.text for c in outs[3].outputs
    ]
    assert np.all([c.finish_reason == "stop" for i in (1, 3) for c in outs[i].outputs])
