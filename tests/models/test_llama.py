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


def test_kept_rows_equal_the_full_forwards_rows_and_cache():
    """LlamaModel's keep_rows (the rows a step samples): the last layer's o_proj and MLP run on those rows
    only; their hidden states equal the full forward's rows, every row's k / v still reach the cache, and
    keeping no row returns [0, H] after writing the cache."""
    from hopperllm.engine.scheduler import ScheduledSeq, SchedulerOutput
    from hopperllm.engine.sequence import Sequence

    llm = LLM(model="dummy:tiny", dtype="float32", device="cpu", num_kv_blocks=64, show_progress=False)
    runner = llm.engine.executor.runner
    g = torch.Generator().manual_seed(3)
    seqs, blocks = [], 0
    for i, n in enumerate((13, 1, 29)):
        seq = Sequence(
            f"s{i}", torch.randint(3, 500, (n,), generator=g).tolist(), SamplingParams(max_tokens=1)
        )
        nb = -(-n // runner.block_size)
        seq.block_table = list(range(blocks, blocks + nb))
        blocks += nb
        seqs.append(seq)
    sched = SchedulerOutput(scheduled=[ScheduledSeq(s, s.num_tokens) for s in seqs], num_batched_tokens=43)
    ids, pos, meta, sample_idx, _, _ = runner._prepare(sched)
    assert sample_idx.tolist() == [12, 13, 42]
    with torch.inference_mode():
        for c in runner.kv_caches:
            c.zero_()
        full = runner.model(ids, pos, runner.kv_caches, meta)
        cache = [c.clone() for c in runner.kv_caches]
        for c in runner.kv_caches:
            c.zero_()
        kept = runner.model(ids, pos, runner.kv_caches, meta, keep_rows=sample_idx)
        assert kept.shape == (3, full.shape[1])
        torch.testing.assert_close(kept, full[sample_idx], rtol=1e-5, atol=1e-5)
        assert all(torch.equal(a, b) for a, b in zip(cache, runner.kv_caches, strict=True))
        for c in runner.kv_caches:
            c.zero_()
        none = runner.model(ids, pos, runner.kv_caches, meta, keep_rows=sample_idx[:0])
        assert none.shape == (0, full.shape[1])
        assert all(torch.equal(a, b) for a, b in zip(cache, runner.kv_caches, strict=True))


@pytest.mark.parametrize("chunk", [None, 16], ids=["whole", "chunked"])
def test_generate_same_with_and_without_kept_rows(chunk, monkeypatch):
    """The engine with HOPPERLLM_KEEP_SAMPLED_ROWS (the default) and without: the same tokens and logprobs,
    with whole prompts, chunks that sample nothing, and prompt logprobs (which keep every row)."""
    from hopperllm.worker import model_runner

    g = torch.Generator().manual_seed(5)
    prompts = [
        {"prompt_token_ids": torch.randint(3, 500, (n,), generator=g).tolist()} for n in (5, 37, 21, 2)
    ]
    params = [SamplingParams(max_tokens=4, ignore_eos=True, logprobs=2)] * 3
    params.append(SamplingParams(max_tokens=3, ignore_eos=True, logprobs=1, prompt_logprobs=1))

    def run(keep: bool):
        monkeypatch.setattr(model_runner, "KEEP_SAMPLED_ROWS", keep)
        kw = {} if chunk is None else dict(max_num_batched_tokens=chunk)
        llm = LLM(
            model="dummy:tiny", dtype="float32", device="cpu", num_kv_blocks=64, show_progress=False, **kw
        )
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs, o.prompt_logprobs) for o in outs]

    on, off = run(True), run(False)
    for (t1, lp1, p1), (t2, lp2, p2) in zip(on, off, strict=True):
        assert t1 == t2
        for a, b in zip(lp1, lp2, strict=True):
            assert a.keys() == b.keys()
            for k in a:
                assert abs(_lp(a[k]) - _lp(b[k])) < 1e-4
        assert (p1 is None) == (p2 is None)


def _lp(x) -> float:
    return x.logprob if hasattr(x, "logprob") else float(x)
