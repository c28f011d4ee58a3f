"""Speculative decoding with a draft model (vLLM's --speculative-config '{"model": ..., "num_speculative_tokens":
K}'): greedy outputs are the tokens the engine gives without drafts, whatever the draft (the target itself: every
draft accepted; the target's first layer alone: some; an unrelated model: almost none) and whatever the batching,
chunking, preemption, prefix hits and stops; sampled outputs follow the same distribution; a draft that cannot
serve the target is a clear error before anything loads."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from hopperllm import LLM, SamplingParams
from hopperllm.engine.speculative import DraftView, SpeculativeConfig
from tests.helpers import make_hf_llama_dir, sampled_output_counts, total_variation

GREEDY = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)


def first_layer_draft(target: str, path: str) -> str:
    """The target cut to its first decoder layer (embeddings, final norm and LM head shared): a draft that
    agrees with the target on some tokens, as a real draft model does."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(target, "config.json")) as f:
        cfg = json.load(f)
    cfg["num_hidden_layers"] = 1
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    weights = load_file(os.path.join(target, "model.safetensors"))
    save_file({k: v for k, v in weights.items() if ".layers." not in k or ".layers.0." in k},
              os.path.join(path, "model.safetensors"))  # fmt: skip
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(target, name)) as src, open(os.path.join(path, name), "w") as dst:
            dst.write(src.read())
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    target = make_hf_llama_dir(str(tmp_path_factory.mktemp("draft_target")), seed=4)
    return {
        "self": target,
        "first-layer": first_layer_draft(target, str(tmp_path_factory.mktemp("draft_l0"))),
        "unrelated": make_hf_llama_dir(str(tmp_path_factory.mktemp("draft_other")), seed=9),
    }


def _llm(target: str, draft: str | None, k: int = 4, **kw) -> LLM:
    kw.setdefault("num_kv_blocks", 128)
    spec = {"model": draft, "num_speculative_tokens": k} if draft else None
    return LLM(
        model=target, dtype="float32", device="cpu", show_progress=False, speculative_config=spec, **kw
    )


def _prompts() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [
        {"prompt_token_ids": torch.randint(3, 290, (n,), generator=g).tolist()} for n in (5, 17, 40, 3, 60)
    ]


def _tokens(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_config():
    c = SpeculativeConfig.parse('{"model": "dummy:tiny", "num_speculative_tokens": 5}')
    assert c.method == "draft_model" and c.uses_draft_model and c.num_speculative_tokens == 5
    assert not SpeculativeConfig.parse('{"num_speculative_tokens": 2}').uses_draft_model  # ngram
    assert SpeculativeConfig.parse(
        {"method": "draft_model", "model": "m", "quantization": "fp8"}
    ).quantization
    for bad in (
        '{"method": "draft_model"}',  # no model
        '{"method": "ngram", "model": "dummy:tiny"}',
        '{"model": "dummy:tiny", "quantization": "int4"}',
        '{"model": "dummy:tiny", "num_speculative_tokens": 17}',
        '{"model": "dummy:tiny", "max_model_len": 1}',
    ):
        with pytest.raises(ValueError):
            SpeculativeConfig.parse(bad)


def test_drafts_that_cannot_serve_the_target_are_clear_errors(dirs):
    with pytest.raises(ValueError, match="vocabulary of 512 tokens, the target 300"):
        _llm(dirs["self"], "dummy:tiny")
    with pytest.raises(ValueError, match="draft_tensor_parallel_size 2: use 1"):
        LLM(model=dirs["self"], device="cpu", show_progress=False,
            speculative_config={"model": dirs["self"], "draft_tensor_parallel_size": 2})  # fmt: skip
    with pytest.raises(
        ValueError, match="the speculative draft model: model path '/no/such/draft' does not exist"
    ):
        _llm(dirs["self"], "/no/such/draft")


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"max_num_batched_tokens": 24},  # prefills chunked (the draft catches up in chunks)
        {"num_kv_blocks": 14},  # preemption: the draft's cache starts again with the sequence's new blocks
        {"enable_prefix_caching": False},
    ],
    ids=["plain", "chunked", "preempting", "no-prefix-cache"],
)
@pytest.mark.parametrize("draft", ["self", "first-layer", "unrelated"])
def test_greedy_outputs_equal_decoding_without_drafts(dirs, draft, kw):
    prompts = _prompts()
    ref = _tokens(_llm(dirs["self"], None, **kw), prompts)
    spec = _llm(dirs["self"], dirs[draft], **kw)
    assert _tokens(spec, prompts) == ref
    e = spec.engine
    assert e.num_draft_tokens > 0
    if draft == "self":  # the target drafting for itself: every draft is the target's own greedy token
        assert e.num_accepted_tokens == e.num_draft_tokens
    elif draft == "first-layer":
        assert 0 < e.num_accepted_tokens < e.num_draft_tokens
    bm = e.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks and not e.has_unfinished_requests()
    assert _tokens(spec, prompts) == ref  # again: prefix hits, the draft recomputing its own cache


def test_drafting_saves_steps(dirs):
    """The target drafting for itself, K = 4: each step emits five tokens, so 30 tokens take 6 decode steps
    (plus the prefill's), not 30."""
    llm = _llm(dirs["self"], dirs["self"], k=4)
    steps = 0
    llm.engine.add_request("r", _prompts()[1], GREEDY)
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
        steps += 1
    assert steps == 1 + 6


def test_the_draft_model_is_resolved_once(dirs, monkeypatch):
    """The engine's config check and the worker share the draft's ModelSource (a GGUF draft's file is opened
    once), and it travels to spawned ranks without open readers."""
    from hopperllm.loader import model_loader

    calls = []
    resolve = model_loader.resolve_model
    monkeypatch.setattr(model_loader, "resolve_model", lambda m: calls.append(m) or resolve(m))
    llm = _llm(dirs["self"], dirs["first-layer"], k=2)
    assert calls.count(dirs["first-layer"]) == 1 and calls.count(dirs["self"]) == 1
    assert _tokens(llm, _prompts()[:2]) == _tokens(_llm(dirs["self"], None), _prompts()[:2])
    src = model_loader.ModelSource("gguf", "t.gguf", {}, reader=object(), draft=model_loader.ModelSource(
        "gguf", "d.gguf", {}, reader=object()))  # fmt: skip
    bare = src.without_readers()
    assert bare.reader is None and bare.draft.reader is None and bare.draft.path == "d.gguf"
    assert src.reader is not None and src.draft.reader is not None


def test_draft_view_reads_the_draft_cache_progress(dirs):
    from hopperllm.engine.sequence import Sequence

    seq = Sequence("s", [5, 6, 7], SamplingParams(temperature=0.9, max_tokens=4))
    seq.draft_computed = 2
    v = DraftView(seq)
    assert v.num_computed_tokens == 2 and v.token_ids is seq.token_ids and v.seq_id == "s"
    assert v.sampling_params.temperature == 0.0 and v.num_placeholders == 0 and v.token_bitmask is None


def test_sampled_outputs_follow_the_same_distribution(dirs):
    """Drafts are the draft model's greedy tokens, accepted exactly when the target's sample equals them:
    the output distribution is the target's. 500 seeded requests each way, 3 tokens, top-k 3: total
    variation < 0.1."""
    prompt = _prompts()[1]
    counts = []
    for draft in (None, dirs["first-layer"]):
        llm = _llm(dirs["self"], draft, k=2, max_num_seqs=128, num_kv_blocks=1024)
        counts.append(sampled_output_counts(llm, prompt, 500))
        if draft:
            assert llm.engine.num_accepted_tokens > 50
    tv = total_variation(*counts, 500)
    assert tv < 0.1, (tv, counts)


def test_stops_inside_accepted_drafts_and_logprobs(dirs):
    """A stop token or max_tokens inside a run of accepted drafts ends the output there, as without drafts;
    logprobs of accepted drafts are their positions' own."""
    base, spec = _llm(dirs["self"], None), _llm(dirs["self"], dirs["self"], k=5)
    prompts = _prompts()
    ref = base.generate(prompts, SamplingParams(max_tokens=13, temperature=0.0, ignore_eos=True, logprobs=2),
                        use_tqdm=False)  # fmt: skip
    got = spec.generate(prompts, SamplingParams(max_tokens=13, temperature=0.0, ignore_eos=True, logprobs=2),
                        use_tqdm=False)  # fmt: skip
    for a, b in zip(ref, got, strict=True):
        ca, cb = a.outputs[0], b.outputs[0]
        assert ca.token_ids == cb.token_ids and len(cb.token_ids) == 13
        for x, y in zip(ca.logprobs, cb.logprobs, strict=True):
            assert x.keys() == y.keys() and all(abs(x[t] - y[t]) < 1e-4 for t in x)
    stop = ref[2].outputs[0].token_ids[7]
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop_token_ids=[stop])
    a, b = base.generate(prompts, params, use_tqdm=False), spec.generate(prompts, params, use_tqdm=False)
    assert [(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].stop_reason) for o in a] == [
        (o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].stop_reason) for o in b
    ]


@pytest.fixture(scope="module")
def pair(dirs):
    return _llm(dirs["self"], None, max_num_batched_tokens=48, num_kv_blocks=40), _llm(
        dirs["self"], dirs["first-layer"], k=3, max_num_batched_tokens=48, num_kv_blocks=40
    )


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lens=st.lists(st.integers(1, 70), min_size=1, max_size=5),
    max_tokens=st.integers(1, 24),
    seed=st.integers(0, 1000),
)
def test_property_greedy_equal(pair, lens, max_tokens, seed):
    """Any batch of prompts and lengths, a small cache (preemptions) and token budget (chunks): the draft model
    never changes greedy tokens or finish reasons, and every block comes back."""
    base, spec = pair
    g = torch.Generator().manual_seed(seed)
    prompts = [{"prompt_token_ids": torch.randint(3, 290, (n,), generator=g).tolist()} for n in lens]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ref = base.generate(prompts, params, use_tqdm=False)
    got = spec.generate(prompts, params, use_tqdm=False)
    assert [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in got] == [
        (o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in ref
    ]
    bm = spec.engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks


@pytest.mark.parametrize("kw", [{}, {"max_num_batched_tokens": 24}], ids=["plain", "chunked"])
def test_row_graph_layout_gives_the_eager_tokens(dirs, kw):
    """The verify graphs' layout (cuda_graphs.RowGraphRunner; run eagerly here, on the CPU): every row of a
    step of a few rows a sequence is a one-query sequence of its own causal length over its sequence's blocks.
    The target's verify steps and the draft's first steps of a round, several sequences at once, padding
    rows, prompt chunks in the same steps (sampling a subset of the rows): the tokens of decoding without
    drafts."""
    from hopperllm.worker.cuda_graphs import RowGraphRunner, row_graph_sizes

    prompts = _prompts()
    ref = _tokens(_llm(dirs["self"], None, **kw), prompts)
    spec = _llm(dirs["self"], dirs["first-layer"], k=3, **kw)
    worker = spec.engine.executor.worker
    calls = []

    def check_groups(rg, tokens):
        """The staged row groups (what HOPPERLLM_VERIFY_ROW_GROUPS=1 attends by): boundaries 0 .. tokens, each
        group at most max_q rows of one sequence's consecutive positions (the same block table), then empty."""
        g = rg.row_groups[: tokens + 1].tolist()
        lens, tables = rg.row_seq_lens[:tokens].tolist(), rg.block_tables[:tokens]
        assert g[0] == 0 and g[-1] == tokens and all(b <= c for b, c in zip(g, g[1:], strict=False))
        for a, b in zip(g, g[1:], strict=False):
            if a == b:
                continue
            assert b - a <= rg.max_q
            assert lens[a:b] == list(range(lens[a], lens[a] + b - a))
            assert all(torch.equal(tables[r], tables[a]) for r in range(a, b))

    for runner, max_q in ((worker.runner, 4), (worker.draft, 2)):
        sc = runner.config.scheduler_config
        rg = RowGraphRunner(runner, row_graph_sizes(max_q, sc.max_num_seqs), max_q, eager=True)
        replay = rg.replay

        def recorded(*a, _replay=replay, _q=max_q, _rg=rg):
            check_groups(_rg, a[0])
            calls.append((_q, *a))
            return _replay(*a)

        rg.replay = recorded
        runner.row_graphs = rg
    assert _tokens(spec, prompts) == ref
    assert 0 < spec.engine.num_accepted_tokens < spec.engine.num_draft_tokens
    target = [c for c in calls if c[0] == 4]
    assert any(c[2] > 4 for c in target)  # several sequences' rows in one step
    assert any(c[1] > c[2] for c in target)  # padding rows
    assert any(c[0] == 2 for c in calls)  # the draft's catch-up steps
    if kw:
        assert any(c[3] < c[2] for c in calls)  # a step sampling some of its rows


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_disable_by_batch_size(dirs, async_scheduling):
    """vLLM's disable_by_batch_size: no drafts while that many sequences run (the engine may then schedule
    asynchronously), drafts again once fewer do (the draft catching up on the tokens it missed); greedy
    tokens stay those of decoding without drafts."""
    prompts = _prompts()  # five requests, finishing at different lengths
    lengths = [8, 12, 30, 16, 24]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
    ref = _tokens(_llm(dirs["self"], None), prompts, params)
    for limit, drafts in ((1, False), (3, True)):
        llm = LLM(model=dirs["self"], dtype="float32", device="cpu", show_progress=False, num_kv_blocks=128,
                  speculative_config={"model": dirs["self"], "num_speculative_tokens": 3,
                                      "disable_by_batch_size": limit})  # fmt: skip
        llm.engine.async_scheduling = async_scheduling
        running_when_drafting = []
        propose = llm.engine._propose_drafts

        def spy(_propose=propose, _llm=llm, _seen=running_when_drafting):
            _seen.append(len(_llm.engine.scheduler.running))
            return _propose()

        llm.engine._propose_drafts = spy
        assert _tokens(llm, prompts, params) == ref
        assert (llm.engine.num_draft_tokens > 0) == drafts
        assert all(n < limit for n in running_when_drafting)
    with pytest.raises(ValueError, match="disable_by_batch_size"):
        SpeculativeConfig.parse({"model": "m", "disable_by_batch_size": 0})


def test_draft_counters_and_metrics(dirs):
    """The engine counts draft runs and accepted drafts by position (vLLM's spec_decode metrics, /metrics
    exposes them): position i is accepted only where every earlier one was."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, generate_latest

    from hopperllm.entrypoints.openai.metrics import _EngineStatsCollector

    llm = _llm(dirs["self"], dirs["first-layer"], k=3)
    _tokens(llm, _prompts())
    s = llm.engine.get_stats()
    per_pos = s.num_accepted_tokens_per_pos
    assert len(per_pos) == 3 and sum(per_pos) == s.num_accepted_tokens > 0
    assert list(per_pos) == sorted(per_pos, reverse=True) and s.num_drafts >= per_pos[0]
    assert s.num_draft_tokens <= 3 * s.num_drafts
    registry = CollectorRegistry()
    fake = SimpleNamespace(engine=llm.engine, num_pending=lambda: 0)
    registry.register(_EngineStatsCollector(fake, "m"))
    text = generate_latest(registry).decode()
    assert f'vllm:spec_decode_num_drafts_total{{model_name="m"}} {float(s.num_drafts)}' in text
    for i, n in enumerate(per_pos):
        assert (
            f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{model_name="m",position="{i}"}} {float(n)}'
            in text
        )


def test_finished_and_aborted_requests_leave_no_draft_state(dirs):
    """The draft's per-sequence state (the driver's encoder, the worker's mirror and block-table rows) goes
    with each request, finished or aborted mid-round."""
    llm = _llm(dirs["self"], dirs["first-layer"], k=3)
    e = llm.engine
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(_prompts()):
        e.add_request(f"r{i}", p, params)
    for _ in range(6):
        e.step()
    worker = e.executor.worker
    assert worker.draft_mirror.seqs and e.num_draft_tokens > 0
    e.abort_request(["r1", "r3"])
    while e.has_unfinished_requests():
        e.step()
    assert not e.executor._draft_encoder._sent
    assert not worker.draft_mirror.seqs and not worker.draft._bt_rows.entry


# -- a state machine: requests come, go and are aborted while the draft model drafts --------------------------
_REF_CACHE: dict[tuple, list[int]] = {}


@pytest.fixture(scope="module")
def machine_llms(dirs):
    kw = dict(max_num_batched_tokens=40, num_kv_blocks=24)  # chunks and preemptions
    return _llm(dirs["self"], None, **kw), _llm(dirs["self"], dirs["first-layer"], k=3, **kw)


def test_state_machine(machine_llms):
    from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

    base, spec = machine_llms

    def reference(prompt: list[int], max_tokens: int) -> list[int]:
        key = (tuple(prompt), max_tokens)
        if key not in _REF_CACHE:
            p = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            _REF_CACHE[key] = (
                base.generate({"prompt_token_ids": prompt}, p, use_tqdm=False)[0].outputs[0].token_ids
            )
        return _REF_CACHE[key]

    class DraftingEngine(RuleBasedStateMachine):
        """Invariants after every step: the blocks agree with the live sequences, no draft cache claims more
        than a sequence's tokens; finished requests carry the tokens decoding without drafts gives; once all
        are gone, every block is free and no draft state is left."""

        def __init__(self):
            super().__init__()
            self.e = spec.engine
            self.live: dict[str, tuple[list[int], int]] = {}
            self.n = 0

        @rule(length=st.integers(1, 50), max_tokens=st.integers(1, 20), seed=st.integers(0, 10**6))
        def add(self, length, max_tokens, seed):
            g = torch.Generator().manual_seed(seed)
            prompt = torch.randint(3, 290, (length,), generator=g).tolist()
            rid = f"m{self.n}"
            self.n += 1
            self.e.add_request(
                rid,
                {"prompt_token_ids": prompt},
                SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
            )
            self.live[rid] = (prompt, max_tokens)

        @rule(pick=st.integers(0, 10**6))
        def abort(self, pick):
            if self.live:
                rid = sorted(self.live)[pick % len(self.live)]
                self.e.abort_request(rid)
                del self.live[rid]

        @rule(steps=st.integers(1, 4))
        def step(self, steps):
            for _ in range(steps):
                for out in self.e.step():
                    if out.finished and out.request_id in self.live:
                        prompt, max_tokens = self.live.pop(out.request_id)
                        assert out.outputs[0].token_ids == reference(prompt, max_tokens)

        @invariant()
        def consistent(self):
            sched = self.e.scheduler
            live = list(sched.running) + list(sched.waiting)
            sched.block_manager.check_invariants(live)
            for seq in sched.running:
                assert seq.draft_computed <= seq.num_tokens

        def teardown(self):
            while self.e.has_unfinished_requests():
                self.step(1)
            bm = self.e.scheduler.block_manager
            assert bm.num_free_blocks == bm.num_total_blocks
            assert not self.e.executor._draft_encoder._sent and not self.e.executor.worker.draft_mirror.seqs

    DraftingEngine.TestCase.settings = settings(
        max_examples=15, stateful_step_count=20, deadline=None, suppress_health_check=list(HealthCheck)
    )
    run_state_machine_as_test(DraftingEngine, settings=DraftingEngine.TestCase.settings)


def test_no_drafts_past_the_drafts_positions(dirs, tmp_path):
    """A draft trained on fewer positions than max_model_len (or the config's max_model_len, vLLM's key)
    drafts only while a sequence is shorter: its drafts past them would be noise. Tokens stay the target's."""
    short = first_layer_draft(dirs["self"], str(tmp_path / "short"))
    cfg_path = tmp_path / "short" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["max_position_embeddings"] = 40
    cfg_path.write_text(json.dumps(cfg))
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    g = torch.Generator().manual_seed(3)
    long_prompt = {"prompt_token_ids": torch.randint(3, 290, (45,), generator=g).tolist()}
    short_prompt = {"prompt_token_ids": torch.randint(3, 290, (5,), generator=g).tolist()}
    for spec_kw, limit in (({"model": short}, 40), ({"model": dirs["first-layer"], "max_model_len": 30}, 30)):
        llm = LLM(model=dirs["self"], dtype="float32", device="cpu", show_progress=False, num_kv_blocks=128,
                  speculative_config={**spec_kw, "num_speculative_tokens": 3})  # fmt: skip
        assert llm.engine.config.speculative_config.max_model_len == limit
        assert _tokens(llm, [long_prompt], params) == _tokens(_llm(dirs["self"], None), [long_prompt], params)
        assert llm.engine.num_draft_tokens == 0
        lengths = []
        propose = llm.engine._propose_drafts

        def spy(_propose=propose, _seen=lengths):
            drafted = _propose()
            _seen += [s.num_tokens for s in drafted]  # with the drafts' places
            return drafted

        llm.engine._propose_drafts = spy
        assert _tokens(llm, [short_prompt], params) == _tokens(
            _llm(dirs["self"], None), [short_prompt], params
        )
        assert lengths and max(lengths) <= limit
