"""The engine end to end on CPU: continuous batching, preemption, chunked prefill and prefix caching
must not change greedy outputs; every block comes back."""

from __future__ import annotations

import pytest
import torch

from hopperllm import LLM, SamplingParams
from hopperllm.engine.llm_engine import LLMEngine
from tests.helpers import make_hf_llama_dir

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_hf_llama_dir(str(tmp_path_factory.mktemp("engine_model")), seed=3)


def _prompts(n: int = 16, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = [1, 2, 5, 9, 15, 16, 17, 31, 33, 40, 47, 64, 70, 3, 25, 50][:n]
    return [torch.randint(3, 290, (n_,), generator=g).tolist() for n_ in lens]


def _llm(model_dir, async_scheduling: bool = False, **kw) -> LLM:
    kw.setdefault("num_kv_blocks", 128)
    llm = LLM(model=model_dir, dtype="float32", device="cpu", show_progress=False, **kw)
    llm.engine.async_scheduling = async_scheduling  # on CPU it is off by default; both modes must agree
    return llm


both_modes = pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])


def _run(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def alone(model_dir) -> list[list[int]]:
    """Reference: each prompt run by itself in a fresh engine state without prefix caching."""
    llm = _llm(model_dir, enable_prefix_caching=False)
    res = [_run(llm, [p])[0] for p in _prompts()]
    assert len({tuple(r) for r in res}) > 8, "random model too degenerate for a meaningful test"
    return res


def _assert_all_blocks_free(llm: LLM) -> None:
    bm = llm.engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks
    assert not llm.engine.has_unfinished_requests()


@both_modes
def test_batched_equals_alone(model_dir, alone, async_scheduling):
    llm = _llm(model_dir, async_scheduling)
    assert _run(llm, _prompts()) == alone
    _assert_all_blocks_free(llm)


@both_modes
def test_preemption_keeps_outputs(model_dir, alone, async_scheduling):
    llm = _llm(model_dir, async_scheduling, num_kv_blocks=12, enable_prefix_caching=False)
    assert _run(llm, _prompts()) == alone
    assert llm.engine.get_stats().num_preemptions > 0
    _assert_all_blocks_free(llm)


@both_modes
def test_priority_preemption_keeps_outputs(model_dir, alone, async_scheduling):
    """The priority policy preempts by priority, also sequences the step had already scheduled: the
    greedy tokens stay those each prompt gets alone."""
    llm = _llm(
        model_dir,
        async_scheduling,
        num_kv_blocks=12,
        enable_prefix_caching=False,
        scheduling_policy="priority",
    )
    prompts = _prompts()
    priorities = [(7 * i) % 5 - 2 for i in range(len(prompts))]
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False, priority=priorities
    )
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert llm.engine.get_stats().num_preemptions > 0
    _assert_all_blocks_free(llm)


@both_modes
def test_late_high_priority_requests_preempt_running_ones(model_dir, alone, async_scheduling, monkeypatch):
    """Low-priority requests run first; high-priority ones added later make the cache preempt the
    low-priority ones ahead of them in the running list (scheduled earlier in the same step). Tokens stay."""
    from hopperllm.engine.scheduler import Scheduler

    picked = []
    choose = Scheduler._preemption_victim

    def recording(self):
        victim = choose(self)
        picked.append((self.running.index(victim), len(self.running)))
        return victim

    monkeypatch.setattr(Scheduler, "_preemption_victim", recording)
    llm = _llm(
        model_dir,
        async_scheduling,
        num_kv_blocks=16,
        enable_prefix_caching=False,
        scheduling_policy="priority",
    )
    eng: LLMEngine = llm.engine
    prompts = _prompts()
    low, high = range(8, 12), range(8)  # 33-64 tokens, then 1-31
    for i in low:
        eng.add_request(f"r{i}", {"prompt_token_ids": prompts[i]}, GREEDY, priority=5)
    for _ in range(3):
        eng.step()
    for i in high:
        eng.add_request(f"r{i}", {"prompt_token_ids": prompts[i]}, GREEDY, priority=0)
    tokens = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
    assert {i: tokens[f"r{i}"] for i in [*low, *high]} == {i: alone[i] for i in [*low, *high]}
    assert any(j < n - 1 for j, n in picked), picked  # a victim ahead of others in the running list
    _assert_all_blocks_free(llm)


@both_modes
def test_chunked_prefill_keeps_outputs(model_dir, alone, async_scheduling):
    llm = _llm(model_dir, async_scheduling, max_num_batched_tokens=7, max_num_seqs=4)
    assert _run(llm, _prompts()) == alone
    _assert_all_blocks_free(llm)


@both_modes
def test_prefix_cache_hits_keep_outputs(model_dir, async_scheduling):
    system = list(range(10, 58))  # 48 tokens: three full blocks shared by every prompt
    prompts = [system + p for p in _prompts(8, seed=5)]
    ref_llm = _llm(model_dir, enable_prefix_caching=False)
    ref = [_run(ref_llm, [p])[0] for p in prompts]
    llm = _llm(model_dir, async_scheduling, enable_prefix_caching=True)
    _run(llm, prompts[:1])  # warm the cache with the shared prefix
    assert _run(llm, prompts) == ref
    stats = llm.engine.get_stats()
    assert stats.prefix_cache_hit_rate > 0
    assert llm.engine.scheduler.block_manager.prefix_cache_hits > 0
    _assert_all_blocks_free(llm)


@both_modes
def test_abort_mid_generation_returns_blocks(model_dir, async_scheduling):
    llm = _llm(model_dir, async_scheduling)
    eng: LLMEngine = llm.engine
    total = eng.scheduler.block_manager.num_free_blocks
    for i, p in enumerate(_prompts(6)):
        eng.add_request(f"r{i}", {"prompt_token_ids": p}, SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(4):
        eng.step()
    assert eng.scheduler.block_manager.num_free_blocks < total
    eng.abort_request(["r0", "r2", "r4"])
    eng.abort_request("unknown-id")  # ignored
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.scheduler.block_manager.num_free_blocks == total


def test_request_that_can_never_fit_is_rejected(model_dir):
    llm = _llm(model_dir, num_kv_blocks=4, max_model_len=512)
    with pytest.raises(ValueError, match="KV-cache blocks"):
        llm.generate({"prompt_token_ids": list(range(3, 100))}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):
        _llm(model_dir, max_model_len=32).generate(
            {"prompt_token_ids": list(range(3, 40))}, GREEDY, use_tqdm=False
        )
    _assert_all_blocks_free(llm)


@both_modes
def test_generation_stops_at_cache_capacity_instead_of_hanging(model_dir, async_scheduling):
    # 2 blocks = 32 tokens of cache: a 20-token prompt asking for 100 tokens must end, not wait forever
    llm = _llm(model_dir, async_scheduling, num_kv_blocks=2, max_model_len=512)
    out = llm.generate(
        {"prompt_token_ids": list(range(3, 23))},
        SamplingParams(max_tokens=100, ignore_eos=True),
        use_tqdm=False,
    )
    assert out[0].outputs[0].finish_reason == "length"
    assert 0 < len(out[0].outputs[0].token_ids) <= 13
    _assert_all_blocks_free(llm)


@both_modes
def test_seeded_sampling_is_batch_independent(model_dir, async_scheduling):
    llm = _llm(model_dir, async_scheduling)
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=1234)
    prompt = _prompts(1)[0]
    alone_ = _run(llm, [prompt], params)[0]
    batched = _run(llm, [prompt] + _prompts(5, seed=9), params)[0]
    assert alone_ == batched


@both_modes
def test_n_completions_differ_and_stream_deltas_add_up(model_dir, async_scheduling):
    llm = _llm(model_dir, async_scheduling)
    eng = llm.engine
    eng.add_request("a", "hello there", SamplingParams(n=2, max_tokens=16, temperature=1.0, seed=7))
    deltas = {0: [], 1: []}
    final = None
    while eng.has_unfinished_requests():
        for ro in eng.step():
            for c in ro.outputs:
                deltas[c.index] += c.delta_token_ids
            final = ro
    assert final.finished
    assert [deltas[0], deltas[1]] == [c.token_ids for c in final.outputs]
    assert final.outputs[0].token_ids != final.outputs[1].token_ids


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_stops_and_limits_in_both_modes(model_dir, async_scheduling):
    """EOS / stop ids / max_tokens / max_model_len end a sequence at the same token in both modes."""
    llm = _llm(model_dir, async_scheduling, max_model_len=40)
    prompts = _prompts(6)
    free = _run(_llm(model_dir), prompts, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    stop_ids = [f[3] for f in free]  # the 4th generated token of each prompt ends it
    for p, f, sid in zip(prompts, free, stop_ids, strict=True):
        out = llm.generate(
            {"prompt_token_ids": p},
            SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=[sid], ignore_eos=True),
            use_tqdm=False,
        )[0].outputs[0]
        assert out.token_ids == f[: f.index(sid) + 1]
        assert out.finish_reason == "stop" and out.stop_reason == sid
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True),
        use_tqdm=False,
    )
    for p, o in zip(prompts, outs, strict=True):
        assert len(p) + len(o.outputs[0].token_ids) == min(40, len(p) + 30)
        assert o.outputs[0].finish_reason == "length"
        assert -1 not in o.outputs[0].token_ids
    _assert_all_blocks_free(llm)


@both_modes
def test_logit_bias_and_allowed_token_ids_in_batches(model_dir, async_scheduling):
    """A request's logit_bias / allowed_token_ids steer only its own rows, in a batch with plain requests
    and through async scheduling; ids past the vocabulary are a ValueError before anything is queued."""
    llm = _llm(model_dir, async_scheduling)
    prompts = _prompts(4)
    plain = _run(llm, prompts)
    biased = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logit_bias={42: 100.0})
    allowed = SamplingParams(max_tokens=6, temperature=1.0, seed=3, ignore_eos=True, allowed_token_ids=[7, 9])
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts], [GREEDY, biased, allowed, GREEDY], use_tqdm=False
    )
    ids = [o.outputs[0].token_ids for o in outs]
    assert ids[0] == plain[0] and ids[3] == plain[3]
    assert ids[1] == [42] * 6
    assert set(ids[2]) <= {7, 9}
    vocab = llm.engine.config.model_config.vocab_size
    for bad in (SamplingParams(logit_bias={vocab: 1.0}), SamplingParams(allowed_token_ids=[1, vocab])):
        with pytest.raises(ValueError, match="out of range"):
            llm.generate({"prompt_token_ids": prompts[0]}, bad, use_tqdm=False)
    _assert_all_blocks_free(llm)


@both_modes
def test_prompt_logprobs_equal_full_sequence_logits(model_dir, async_scheduling):
    """SamplingParams.prompt_logprobs through chunked prefill (16-token chunks), for a repeated prompt whose
    blocks the prefix cache holds (the request must still compute them all) and for n = 2: each prompt token's
    logprob is the log-softmax of the full-sequence logits at the position before it, with the top k."""
    llm = _llm(model_dir, async_scheduling, max_num_batched_tokens=16)
    prompt = _prompts(16)[11]  # 64 tokens
    exact = llm.engine.executor.runner.logits_for_tokens(prompt).log_softmax(-1)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, prompt_logprobs=3)
    for rep in range(2):
        out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
        assert rep == 0 or out.num_cached_tokens == 0
        pl = out.prompt_logprobs
        assert len(pl) == len(prompt) and pl[0] is None
        for i in range(1, len(prompt)):
            assert pl[i][prompt[i]] == pytest.approx(float(exact[i - 1, prompt[i]]), abs=1e-5)
            top = exact[i - 1].topk(3)
            for t, v in zip(top.indices.tolist(), top.values.tolist(), strict=True):
                assert pl[i][t] == pytest.approx(v, abs=1e-5)
    two = llm.generate(
        {"prompt_token_ids": prompt}, SamplingParams(n=2, max_tokens=2, prompt_logprobs=0), use_tqdm=False
    )[0]
    assert [list(e) for e in two.prompt_logprobs[1:]] == [[t] for t in prompt[1:]]  # k = 0: the token alone
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)
    # the upper bound is the engine's max_logprobs (vLLM's --max-logprobs, 20 by default)
    for name in ("logprobs", "prompt_logprobs"):
        with pytest.raises(ValueError, match=f"{name}: requested 21, more than max_logprobs 20"):
            llm.generate(
                {"prompt_token_ids": prompt}, SamplingParams(max_tokens=2, **{name: 21}), use_tqdm=False
            )
    with pytest.raises(ValueError, match="vocabulary"):
        _llm(model_dir, max_logprobs=-1).generate(
            {"prompt_token_ids": prompt}, SamplingParams(max_tokens=2, logprobs=10_000), use_tqdm=False
        )
    wide = _llm(model_dir, max_logprobs=40).generate(
        {"prompt_token_ids": prompt},
        SamplingParams(max_tokens=2, logprobs=30, prompt_logprobs=25),
        use_tqdm=False,
    )[0]
    assert len(wide.outputs[0].logprobs[0]) >= 30 and len(wide.prompt_logprobs[1]) >= 25
    _assert_all_blocks_free(llm)


def test_engine_freezes_the_gc_heap_and_frees_itself(model_dir):
    """Start-up moves the live heap (model, caches) out of the collector's reach, as vLLM does, so no
    full collection walks it inside a request's steps; the engine is still freed by reference counts
    alone, and shutdown hands the frozen objects back to the collector."""
    import gc
    import weakref

    gc.unfreeze()
    llm = _llm(model_dir)
    assert gc.get_freeze_count() > 1000
    assert _run(llm, _prompts(2)) == _run(llm, _prompts(2))
    gc.disable()  # the engine must go with its last reference, not in a later collection
    try:
        ref = weakref.ref(llm.engine.executor)
        del llm
        assert ref() is None
    finally:
        gc.enable()
    llm = _llm(model_dir)
    llm.engine.shutdown()
    assert gc.get_freeze_count() == 0


def test_bad_words_never_complete(model_dir):
    """vLLM's bad_words: a word's token sequence may start but never complete; other outputs unchanged."""
    llm = _llm(model_dir)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    prompt = {"prompt_token_ids": _prompts()[7]}
    free = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    tok = llm.get_tokenizer()
    word = next(  # two of the output's tokens whose text tokenizes back to them
        w
        for i in range(2, len(free.token_ids) - 1)
        if (w := tok.decode(free.token_ids[i : i + 2])).strip()
        and tok.encode(w.lstrip(), add_special_tokens=False) == free.token_ids[i : i + 2]
    )
    ids = llm.engine.bad_words_token_ids([word])
    assert ids and all(len(i) >= 1 for i in ids)
    banned = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, bad_words=[word])
    out = llm.generate(prompt, banned, use_tqdm=False)[0].outputs[0]
    toks = out.token_ids
    for seq in ids:
        assert not any(toks[i : i + len(seq)] == seq for i in range(len(toks))), (seq, toks)
    n = len(ids[0])
    first = next(i for i in range(len(free.token_ids)) if free.token_ids[i : i + n] == ids[0])
    assert toks[: first + n - 1] == free.token_ids[: first + n - 1]  # the same until the ban bites
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words=["  "])


def test_truncate_prompt_tokens_keeps_the_last_tokens(model_dir):
    llm = _llm(model_dir)
    prompt = _prompts()[9]  # 40 tokens
    params = dict(max_tokens=6, temperature=0.0, ignore_eos=True)
    cut = llm.generate(
        {"prompt_token_ids": prompt}, SamplingParams(truncate_prompt_tokens=7, **params), use_tqdm=False
    )
    ref = llm.generate({"prompt_token_ids": prompt[-7:]}, SamplingParams(**params), use_tqdm=False)
    assert (
        cut[0].prompt_token_ids == prompt[-7:] and cut[0].outputs[0].token_ids == ref[0].outputs[0].token_ids
    )
    whole = llm.generate(
        {"prompt_token_ids": prompt}, SamplingParams(truncate_prompt_tokens=-1, **params), use_tqdm=False
    )
    assert whole[0].prompt_token_ids == prompt  # -1: everything that leaves room to generate
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="truncate_prompt_tokens"):
            SamplingParams(truncate_prompt_tokens=bad)


def test_penalties_run_async_and_equal_sync(model_dir):
    """Penalties no longer stop async scheduling: the in-flight token is counted on the device, so the
    outputs equal the synchronous engine's, for greedy and seeded rows, batched with free ones."""
    kinds = [
        SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True, repetition_penalty=1.5),
        SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True, frequency_penalty=1.2),
        SamplingParams(max_tokens=14, temperature=1.0, seed=3, ignore_eos=True, presence_penalty=1.5),
        GREEDY,
    ]
    prompts = [{"prompt_token_ids": p} for p in _prompts(8)]
    params = [kinds[i % len(kinds)] for i in range(len(prompts))]
    outs = {}
    for mode in (False, True):
        llm = _llm(model_dir, async_scheduling=mode)
        launch, overlapped = llm.engine.executor.launch, []

        def spy(sched, eos, prev=None, _launch=launch, overlapped=overlapped):
            overlapped.append(prev is not None)  # launched before the previous step was read back
            return _launch(sched, eos, prev)

        llm.engine.executor.launch = spy
        outs[mode] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert any(overlapped) == mode  # penalty requests do not switch async scheduling off
        _assert_all_blocks_free(llm)
    assert outs[True] == outs[False]
    free = _llm(model_dir).generate(
        prompts[:1], SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True), use_tqdm=False
    )
    assert outs[True][0] != free[0].outputs[0].token_ids  # the penalty changed something


def test_reset_prefix_cache_and_llm_engine_alias(model_dir):
    llm = _llm(model_dir)
    assert llm.llm_engine is llm.engine
    prompt = {"prompt_token_ids": _prompts()[10]}  # 47 tokens: two full blocks
    llm.generate(prompt, GREEDY, use_tqdm=False)
    hit = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
    assert hit.num_cached_tokens >= 32
    assert llm.reset_prefix_cache()
    cold = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
    assert cold.num_cached_tokens == 0 and cold.outputs[0].token_ids == hit.outputs[0].token_ids
    llm.engine.add_request("busy", prompt, GREEDY)
    assert not llm.reset_prefix_cache()  # not while a request runs
    llm.engine.abort_request("busy")


def test_stats_logger_line(model_dir):
    """The server's periodic log line (vLLM's; --disable-log-stats turns it off)."""
    from hopperllm.engine.async_engine import StatsLogger

    llm = _llm(model_dir)
    stats = StatsLogger(llm.engine, interval_s=5.0)
    t0 = stats._last
    llm.generate([{"prompt_token_ids": p} for p in _prompts(4)], GREEDY, use_tqdm=False)
    assert stats.maybe_log(now=t0 + 1.0) is None  # within the interval
    line = stats.maybe_log(now=t0 + 10.0)
    prompt_tokens = sum(len(p) for p in _prompts(4))
    assert f"Avg prompt throughput: {prompt_tokens / 10.0:.1f} tokens/s" in line
    assert f"Avg generation throughput: {4 * 12 / 10.0:.1f} tokens/s" in line and "Running: 0 reqs" in line
    assert stats.maybe_log(now=t0 + 30.0) is None  # nothing ran since


def test_bad_words_run_async_and_equal_sync(model_dir):
    """Bad words keep async scheduling: a word whose last-but-one token is still in flight is checked on
    the device. Words of one, two and three tokens, taken from the free run's output so they bite."""
    prompts = [{"prompt_token_ids": p} for p in _prompts(6)]
    free = _llm(model_dir).generate(prompts, GREEDY, use_tqdm=False)
    tok = _llm(model_dir).get_tokenizer()
    words, lengths = [], set()
    for o in free:  # output pieces of 1-3 tokens whose text tokenizes back to them
        ids = o.outputs[0].token_ids
        for n in (3, 2, 1):
            for at in range(1, len(ids) - n):
                w = tok.decode(ids[at : at + n])
                if (
                    n not in lengths
                    and w.strip()
                    and tok.encode(w.lstrip(), add_special_tokens=False) == ids[at : at + n]
                ):
                    words.append(w)
                    lengths.add(n)
    assert lengths >= {1, 2}, lengths
    outs = {}
    for mode in (False, True):
        llm = _llm(model_dir, async_scheduling=mode)
        launch, overlapped = llm.engine.executor.launch, []

        def spy(sched, eos, prev=None, _launch=launch, overlapped=overlapped):
            overlapped.append(prev is not None)
            return _launch(sched, eos, prev)

        llm.engine.executor.launch = spy
        for w in words:  # one word at a time: each bites where the free run wrote it
            params = [
                SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, bad_words=[w]),
                SamplingParams(max_tokens=12, temperature=1.0, seed=9, ignore_eos=True, bad_words=[w]),
            ]
            got = llm.generate(prompts, [params[i % 2] for i in range(len(prompts))], use_tqdm=False)
            outs[mode, w] = [o.outputs[0].token_ids for o in got]
        assert any(overlapped) == mode
    for w in words:
        assert outs[True, w] == outs[False, w]
        b = llm.engine.bad_words_token_ids([w])[0]
        for toks in outs[True, w]:
            assert not any(toks[i : i + len(b)] == b for i in range(len(toks)))


def test_priority_scheduling_orders_requests(model_dir):
    """--scheduling-policy priority: of the waiting requests the lowest priority value runs first (then
    arrival); the tokens are those fcfs gives. Under fcfs a priority is refused, as vLLM does."""
    prompts = _prompts(4)
    fcfs = _llm(model_dir, max_num_seqs=1)
    want = _run(fcfs, prompts)
    with pytest.raises(ValueError, match="priority scheduling is not enabled"):
        fcfs.generate({"prompt_token_ids": prompts[0]}, GREEDY, use_tqdm=False, priority=[1])
    _assert_all_blocks_free(fcfs)

    llm = _llm(model_dir, max_num_seqs=1, scheduling_policy="priority")
    eng: LLMEngine = llm.engine
    for i, (p, prio) in enumerate(zip(prompts, [3, 0, 3, -1], strict=True)):
        eng.add_request(f"r{i}", {"prompt_token_ids": p}, GREEDY, priority=prio)
    finished, tokens = [], {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                finished.append(out.request_id)
                tokens[out.request_id] = out.outputs[0].token_ids
    assert finished == ["r3", "r1", "r0", "r2"]  # -1, 0, then the two 3s by arrival
    assert [tokens[f"r{i}"] for i in range(4)] == want
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False, priority=[2, 1, 0, 5]
    )
    assert [o.outputs[0].token_ids for o in outs] == want  # outputs in prompt order, whatever ran first
    with pytest.raises(ValueError, match="4 prompts but 2 priorities"):
        llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False, priority=[0, 1])
    with pytest.raises(ValueError, match="priority must be an integer"):
        eng.add_request("bad", {"prompt_token_ids": prompts[0]}, GREEDY, priority=1.5)
    _assert_all_blocks_free(llm)
