"""Speculative decoding with n-gram drafts (vLLM's --speculative-config method "ngram"): greedy outputs are
the tokens the engine gives without drafts, whatever the batching, chunking, preemption and stops; sampled
outputs follow the same distribution; requests that cannot take drafts decode as before."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hopperllm import LLM, SamplingParams
from hopperllm.engine.speculative import SpeculativeConfig, propose_ngram
from tests.helpers import make_hf_llama_dir, sampled_output_counts, total_variation

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


def test_propose_ngram():
    assert propose_ngram([1, 2, 3, 4, 1, 2], 3, 3, 1) == [3, 4, 1]  # the longest suffix that occurred: [1, 2]
    assert propose_ngram([1, 2, 3, 1, 2, 3], 2, 3, 1) == [1, 2]
    assert propose_ngram([9, 1, 7, 1, 8, 1], 2, 1, 1) == [8, 1]  # the latest earlier occurrence
    assert propose_ngram([5, 6, 7], 2, 3, 1) == [] and propose_ngram([7], 2, 2, 1) == []
    assert propose_ngram([256, 1, 256], 2, 2, 1) == [1, 256]  # token boundaries in the byte search
    assert propose_ngram([1, 2, 3, 1, 2], 2, 3, 2) == [3, 1] and propose_ngram([1, 2, 3, 4, 2], 2, 3, 2) == []


def test_config():
    assert (
        SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 2}').num_speculative_tokens
        == 2
    )
    assert SpeculativeConfig.parse(None) is None
    for bad in (
        '{"method": "eagle"}',
        '{"method": "ngram", "num_speculative_tokens": 0}',
        '{"method": "ngram", "prompt_lookup_min": 3, "prompt_lookup_max": 2}',
        '{"method": "ngram", "draft_model": "x"}',
        "{not json",
    ):
        with pytest.raises(ValueError):
            SpeculativeConfig.parse(bad)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_hf_llama_dir(str(tmp_path_factory.mktemp("spec_model")), seed=4)


def _llm(model_dir, spec: bool, **kw) -> LLM:
    kw.setdefault("num_kv_blocks", 128)
    return LLM(
        model=model_dir, dtype="float32", device="cpu", show_progress=False,
        speculative_config=SPEC if spec else None, **kw,
    )  # fmt: skip


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    loops = [torch.randint(3, 290, (k,), generator=g).tolist() for k in (3, 5, 8)]
    # repeating prompts give the n-gram lookup something to find; random ones rarely do
    return [
        loops[0] * 6,
        loops[1] * 4,
        loops[2] * 3 + [7, 8],
        torch.randint(3, 290, (30,), generator=g).tolist(),
    ]


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"max_num_batched_tokens": 24},  # prefills chunked, drafts cut by the token budget
        {"num_kv_blocks": 14},  # preemption
        {"enable_prefix_caching": False},
    ],
    ids=["plain", "chunked", "preempting", "no-prefix-cache"],
)
def test_greedy_outputs_equal_decoding_without_drafts(model_dir, kw):
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in _prompts()]
    ref = [
        o.outputs[0].token_ids for o in _llm(model_dir, False, **kw).generate(prompts, params, use_tqdm=False)
    ]
    spec = _llm(model_dir, True, **kw)
    out = [o.outputs[0].token_ids for o in spec.generate(prompts, params, use_tqdm=False)]
    assert out == ref
    assert spec.engine.num_accepted_tokens > 0  # the drafts did work
    bm = spec.engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks and not spec.engine.has_unfinished_requests()
    again = [o.outputs[0].token_ids for o in spec.generate(prompts, params, use_tqdm=False)]  # prefix hits
    assert again == ref


def test_stops_and_limits_inside_accepted_drafts(model_dir):
    base, spec = _llm(model_dir, False), _llm(model_dir, True)
    prompts = [{"prompt_token_ids": p} for p in _prompts()]
    free = base.generate(
        prompts, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True), use_tqdm=False
    )
    for i, o in enumerate(free):
        ids = o.outputs[0].token_ids
        for params in (
            SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True),  # a limit mid-way through drafts
            SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop_token_ids=[ids[11]]),
            SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, n=2),
        ):
            a = base.generate(prompts[i], params, use_tqdm=False)[0].outputs
            b = spec.generate(prompts[i], params, use_tqdm=False)[0].outputs
            assert [(c.token_ids, c.finish_reason, c.stop_reason) for c in a] == [
                (c.token_ids, c.finish_reason, c.stop_reason) for c in b
            ]


def test_penalties_bad_words_and_min_tokens_see_each_positions_history(model_dir):
    """A row sampling at a draft's position counts the drafts before it and not those after: penalties,
    bad words and min_tokens give the tokens decoding without drafts gives."""
    spec, base = _llm(model_dir, True), _llm(model_dir, False)
    prompts = [{"prompt_token_ids": p} for p in _prompts()]
    free = base.generate(
        prompts, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True), use_tqdm=False
    )
    tok = base.get_tokenizer()
    pair = next(  # two output tokens whose text tokenizes back to them: a bad word that bites
        w
        for o in free
        for i in range(4, 18)
        if (w := tok.decode(o.outputs[0].token_ids[i : i + 2])).strip()
        and tok.encode(w.lstrip(), add_special_tokens=False) == o.outputs[0].token_ids[i : i + 2]
    )
    eos = sorted(spec.engine.eos_token_ids)
    for params in (
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, repetition_penalty=1.3),
        SamplingParams(
            max_tokens=20, temperature=0.0, ignore_eos=True, frequency_penalty=2.0, presence_penalty=0.2
        ),
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, bad_words=[pair]),
        SamplingParams(max_tokens=20, temperature=0.0, min_tokens=15, stop_token_ids=eos),
    ):
        drafted = spec.engine.num_draft_tokens
        a = [
            (o.outputs[0].token_ids, o.outputs[0].finish_reason)
            for o in base.generate(prompts, params, use_tqdm=False)
        ]
        b = [
            (o.outputs[0].token_ids, o.outputs[0].finish_reason)
            for o in spec.generate(prompts, params, use_tqdm=False)
        ]
        assert b == a, params
        assert spec.engine.num_draft_tokens > drafted


def test_logprobs_of_accepted_drafts(model_dir):
    """Each position's logprobs come from that position's logits: with drafts, the same entries as without."""
    spec, base = _llm(model_dir, True), _llm(model_dir, False)
    prompts = [{"prompt_token_ids": p} for p in _prompts()]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=3)
    a = base.generate(prompts, params, use_tqdm=False)
    b = spec.generate(prompts, params, use_tqdm=False)
    assert spec.engine.num_accepted_tokens > 0
    for x, y in zip(a, b, strict=True):
        cx, cy = x.outputs[0], y.outputs[0]
        assert cx.token_ids == cy.token_ids and len(cy.logprobs) == 16
        for ex, ey in zip(cx.logprobs, cy.logprobs, strict=True):
            assert ex.keys() == ey.keys() and all(abs(ex[t] - ey[t]) < 1e-4 for t in ex)
        assert abs(cx.cumulative_logprob - cy.cumulative_logprob) < 1e-3


def test_sampled_outputs_follow_the_same_distribution(model_dir):
    """Accepting a draft exactly when the token sampled at its position equals it is speculative
    sampling's rule for a draft that is one token for sure: the joint distribution of the output is the
    one without drafts. 600 seeded requests each way, 3 tokens, top-k 3: total variation < 0.1."""
    # a prompt that ends the way the model goes on (its own greedy continuation): drafts get proposed and
    # sampled tokens often agree with them
    base = _llm(model_dir, False)
    free = base.generate(
        {"prompt_token_ids": _prompts()[3]},
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
        use_tqdm=False,
    )
    prompt = {"prompt_token_ids": _prompts()[3] + free[0].outputs[0].token_ids}
    counts = []
    for spec in (False, True):
        llm = _llm(model_dir, spec, max_num_seqs=128, num_kv_blocks=2048)  # room for drafts
        counts.append(sampled_output_counts(llm, prompt, 600))
        if spec:
            assert llm.engine.num_accepted_tokens > 100
    tv = total_variation(*counts, 600)
    assert tv < 0.1, (tv, counts)


def test_prompt_logprobs_beside_drafting_sequences(model_dir):
    """A step with drafts also carries other requests' prefills: their prompt logprobs come back as
    without drafts."""
    spec, base = (
        _llm(model_dir, True, max_num_batched_tokens=32),
        _llm(model_dir, False, max_num_batched_tokens=32),
    )
    loops = [{"prompt_token_ids": p} for p in _prompts()[:3]]
    probe = {"prompt_token_ids": _prompts()[3]}
    greedy = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    lp = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=2)
    outs = {}
    for name, llm in (("spec", spec), ("base", base)):
        for i, p in enumerate(loops):  # drafting sequences first, the probe's prefill joins their steps
            llm.engine.add_request(f"loop-{i}", p, greedy)
        for _ in range(3):
            llm.engine.step()
        llm.engine.add_request("probe", probe, lp)
        done = {}
        while llm.engine.has_unfinished_requests():
            for o in llm.engine.step():
                if o.finished:
                    done[o.request_id] = o
        outs[name] = done
    assert spec.engine.num_draft_tokens > 0
    a, b = outs["spec"]["probe"], outs["base"]["probe"]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    for x, y in zip(a.prompt_logprobs, b.prompt_logprobs, strict=True):
        assert (x is None and y is None) or (x.keys() == y.keys() and all(abs(x[k] - y[k]) < 1e-5 for k in x))
    for i in range(3):
        assert (
            outs["spec"][f"loop-{i}"].outputs[0].token_ids == outs["base"][f"loop-{i}"].outputs[0].token_ids
        )


@pytest.fixture(scope="module")
def pair(model_dir):
    return _llm(model_dir, False, max_num_batched_tokens=48), _llm(model_dir, True, max_num_batched_tokens=48)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    loops=st.lists(
        st.tuples(st.lists(st.integers(3, 40), min_size=1, max_size=6), st.integers(1, 5)),
        min_size=1,
        max_size=4,
    ),
    max_tokens=st.integers(1, 24),
    stop_at=st.one_of(st.none(), st.integers(0, 23)),
)
def test_property_greedy_equal(pair, loops, max_tokens, stop_at):
    """Any batch of (partly repeating) prompts, lengths and stop tokens: drafts never change greedy tokens,
    finish reasons or stop reasons, and every block comes back."""
    base, spec = pair
    prompts = [{"prompt_token_ids": unit * reps} for unit, reps in loops]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ref = base.generate(prompts, params, use_tqdm=False)
    if stop_at is not None:  # stop at a token the plain run emits
        ids = ref[0].outputs[0].token_ids
        params = SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, stop_token_ids=[ids[stop_at % len(ids)]]
        )
        ref = base.generate(prompts, params, use_tqdm=False)
    got = spec.generate(prompts, params, use_tqdm=False)
    key = [(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].stop_reason) for o in ref]
    assert [
        (o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].stop_reason) for o in got
    ] == key
    bm = spec.engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks


def test_each_draft_row_sees_its_own_history(model_dir, monkeypatch):
    """White-box: the rows of a drafted sequence get histories that end at their own positions (row j: the
    sequence's outputs before its drafts plus the first j drafts), so penalties, bad words and min_tokens
    at a draft's position count what precedes it and nothing after."""
    from hopperllm.layers.sampler import SamplingMetadata

    seen = []
    build = SamplingMetadata.build.__func__

    def spy(cls, params, prompt_ids, output_ids, *args, **kwargs):
        seen.append([list(o) for o in output_ids])
        return build(cls, params, prompt_ids, output_ids, *args, **kwargs)

    monkeypatch.setattr(SamplingMetadata, "build", classmethod(spy))
    spec = _llm(model_dir, True)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, frequency_penalty=0.1)
    spec.generate({"prompt_token_ids": _prompts()[0]}, params, use_tqdm=False)
    drafted = [rows for rows in seen if len(rows) > 1]
    assert drafted and spec.engine.num_draft_tokens > 0
    for rows in drafted:  # one sequence: rows 0..d, each one token longer, each a prefix of the next
        assert [len(r) for r in rows] == list(range(len(rows[0]), len(rows[0]) + len(rows)))
        assert all(rows[j + 1][:-1] == rows[j] for j in range(len(rows) - 1))
