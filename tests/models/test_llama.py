"""Our Llama equals HF transformers' LlamaForCausalLM on tiny random configs (float32)."""

from __future__ import annotations

import pytest
import torch

from hopperllm import LLM, SamplingParams
from tests.helpers import hf_logits, make_hf_llama_dir

CASES = {
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "mha_tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "llama3_rope": dict(
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=500000.0,
        max_position_embeddings=512,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "linear_rope_head_dim": dict(head_dim=32, rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(tmp_path, case):
    path = make_hf_llama_dir(str(tmp_path / case), **CASES[case])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (200,), generator=g).tolist()  # long enough for llama3 scaling to matter
    ref = hf_logits(path, ids)
    llm = LLM(model=path, dtype="float32", device="cpu", num_kv_blocks=64, show_progress=False)
    ours = llm.engine.executor.runner.logits_for_tokens(ids)
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) < 1e-4, rel_err(ours, ref)


def test_greedy_tokens_match_hf_generate(tmp_path):
    from transformers import LlamaForCausalLM

    path = make_hf_llama_dir(str(tmp_path / "m"))
    ids = [1, 50, 60, 70, 80, 90]
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(ids) :].tolist()
    llm = LLM(model=path, dtype="float32", device="cpu", num_kv_blocks=64, show_progress=False)
    out = llm.generate(
        {"prompt_token_ids": ids},
        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
        use_tqdm=False,
    )
    assert out[0].outputs[0].token_ids == ref
