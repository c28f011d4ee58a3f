"""Speculative decoding on the GPU, n-gram drafts and a draft model: verify steps replay the verify graphs
(each row a one-query sequence through flash-decoding) or, beside prompt chunks, run eagerly through the
prefill kernels; the draft's decode steps replay its own graphs. In float32 greedy tokens equal decoding
without drafts; in FP8, where the kernels round differently, every token is the argmax of the full-sequence
logits up to a rounding-sized gap."""

from __future__ import annotations

import pytest

from hopperllm import LLM, SamplingParams

# a draft model: the target's own weights (same preset and seed)
DRAFT = {"model": "dummy:tiny", "num_speculative_tokens": 4}
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
@pytest.mark.parametrize("spec", [SPEC, DRAFT], ids=["ngram", "draft-model"])
def test_speculative_tokens_are_greedy_choices(quantization, spec):
    """FP8 (or bf16) target, n-gram drafts or a bf16 draft model: every token is the argmax of the target's
    full-sequence logits up to a rounding-sized gap."""
    kw = dict(
        model="dummy:tiny",
        quantization=quantization,
        max_model_len=256,
        num_kv_blocks=256,
        show_progress=False,
    )
    spec = LLM(**kw, speculative_config=spec)
    outs = spec.generate(
        PROMPTS, SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True), use_tqdm=False
    )
    assert spec.engine.num_accepted_tokens > 0
    _assert_greedy_choices(spec, outs)


def _assert_greedy_choices(llm, outs):
    """Every output token is the argmax of the full-sequence logits, up to a rounding-sized gap."""
    for o in outs:
        ids = o.prompt_token_ids + o.outputs[0].token_ids
        logits = llm.engine.executor.logits_for_tokens(ids).float()
        n = len(o.prompt_token_ids)
        for j, t in enumerate(o.outputs[0].token_ids):
            row = logits[n - 1 + j]
            gap = float(row.max() - row[t])
            assert gap <= 0.02 * float(row.abs().max()) + 1e-3, (j, t, gap)


# -- a draft model ------------------------------------------------------------------------------------------


def test_draft_model_float32_greedy_equals_plain_decoding():
    """The draft model on the GPU: its decode steps of a round replay its own CUDA graph (DraftChain), its
    catch-up runs the prefill kernels over the target's block tables; drafting for itself, every draft is
    accepted."""
    kw = dict(model="dummy:tiny", dtype="float32", max_model_len=256, num_kv_blocks=256, show_progress=False)
    prompts = PROMPTS + ["a longer prompt " * 12]
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in LLM(**kw).generate(prompts, params, use_tqdm=False)]
    spec = LLM(**kw, speculative_config=DRAFT)
    assert spec.engine.executor.collective_rpc("startup_stats").get("draft_chain_graphs")
    out = [o.outputs[0].token_ids for o in spec.generate(prompts, params, use_tqdm=False)]
    assert out == ref
    e = spec.engine
    assert e.num_draft_tokens > 0 and e.num_accepted_tokens == e.num_draft_tokens


@pytest.mark.parametrize("spec", [DRAFT, SPEC], ids=["draft-model", "ngram"])
def test_verify_graphs_equal_plain_decoding(spec):
    """Verify steps (each sequence's token and drafts) replay the verify graphs, one sequence or several, and
    a draft model's first step of a round (its catch-up token and the last) its own; float32 greedy tokens
    equal decoding without drafts."""
    kw = dict(model="dummy:tiny", dtype="float32", max_model_len=256, num_kv_blocks=256, show_progress=False)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    plain, fast = LLM(**kw), LLM(**kw, speculative_config=spec)
    worker = fast.engine.executor.worker
    assert worker.runner.row_graphs is not None
    assert worker.draft is None or worker.draft.row_graphs is not None
    calls = []
    rg = worker.runner.row_graphs
    replay = rg.replay
    rg.replay = lambda *a: calls.append(a) or replay(*a)
    for p in PROMPTS:
        ref = plain.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids
        assert fast.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids == ref
    ref = [o.outputs[0].token_ids for o in plain.generate(PROMPTS, params, use_tqdm=False)]
    assert [o.outputs[0].token_ids for o in fast.generate(PROMPTS, params, use_tqdm=False)] == ref
    assert calls and any(c[1] > spec["num_speculative_tokens"] + 1 for c in calls)  # several sequences
    assert fast.engine.num_accepted_tokens > 0


def test_draft_chain_graphs_equal_the_eager_chain():
    """The draft's decode steps of a round replay one CUDA graph (DraftChain): from step 1 after a round that
    accepted every draft (its first step then a row-graph step: greedy requests, the target drafting for
    itself), from step 0 after one that rejected a draft (sampled requests). Every chain's drafts equal the
    same steps run eagerly; greedy tokens equal decoding without drafts."""
    kw = dict(model="dummy:tiny", dtype="float32", max_model_len=256, num_kv_blocks=256, show_progress=False)
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in LLM(**kw).generate(PROMPTS, greedy, use_tqdm=False)]
    spec = LLM(**kw, speculative_config=DRAFT)
    draft = spec.engine.executor.worker.draft
    chain = draft.draft_chain
    assert (1, 0) in chain.graphs and (1, 1) in chain.graphs
    launch = draft.launch_draft_chain
    starts = []

    def checked(seqs, counts, first=None):
        graphs = chain.graphs
        chain.graphs = {}  # the same steps eagerly
        try:
            eager = draft.collect(launch(seqs, counts, first)).token_ids
        finally:
            chain.graphs = graphs
        out = launch(seqs, counts, first)
        assert draft.collect(out).token_ids == eager, (first is None, counts)
        starts.append(first is None)
        return out

    draft.launch_draft_chain = checked
    assert [o.outputs[0].token_ids for o in spec.generate(PROMPTS, greedy, use_tqdm=False)] == ref
    assert not any(starts)
    sampled = SamplingParams(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True)
    spec.generate(PROMPTS, sampled, use_tqdm=False)
    assert any(starts)


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_verify_row_groups(monkeypatch, quantization):
    """HOPPERLLM_VERIFY_ROW_GROUPS=1: the verify graphs' attention reads each sequence's keys once for all its
    rows (one program a sequence, kv head and slice). Float32: the tokens of decoding without drafts; FP8:
    every token the argmax of the full-sequence logits up to a rounding-sized gap."""
    monkeypatch.setenv("HOPPERLLM_VERIFY_ROW_GROUPS", "1")
    kw = dict(model="dummy:tiny", max_model_len=256, num_kv_blocks=256, show_progress=False)
    kw.update(dtype="float32") if quantization is None else kw.update(quantization=quantization)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    spec = LLM(**kw, speculative_config=DRAFT)
    assert spec.engine.executor.worker.runner.row_graphs.grouped
    outs = spec.generate(PROMPTS, params, use_tqdm=False)
    assert spec.engine.num_accepted_tokens > 0
    if quantization is None:
        ref = [o.outputs[0].token_ids for o in LLM(**kw).generate(PROMPTS, params, use_tqdm=False)]
        assert [o.outputs[0].token_ids for o in outs] == ref
    else:
        _assert_greedy_choices(spec, outs)
