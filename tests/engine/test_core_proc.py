"""The engine core in a process of its own (core_proc.py, core_client.py).

The wire format against the engine's own outputs: every step's RequestOutputs, encoded in the core, pickled
and decoded in the front end, equal the originals (cumulative and delta outputs, n > 1, logprobs, prompt
logprobs, stop strings, no detokenizing); a request's prompt crosses once. Then MPAsyncLLMEngine over a
spawned core on the tiny model: the same greedy tokens as LLM in this process, bad input raised at the first
item (the server's HTTP 400), aborts reaching the core, calls, a dead core failing every stream, a start-up
error raised as in one process, and the process gone after shutdown."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hopperllm import LLM, RequestOutputKind, SamplingParams
from hopperllm.engine.arg_utils import EngineArgs
from hopperllm.engine.async_engine import EngineDeadError
from hopperllm.engine.core_client import MPAsyncLLMEngine
from hopperllm.engine.core_proc import OutputDecoder, OutputEncoder
from hopperllm.outputs import CompletionOutput, RequestMetrics, RequestOutput

PROMPTS = [[5, 17, 99, 3, 250, 41, 7, 8, 9, 10, 11], [1, 2, 3], [200, 201, 202, 203, 204, 205, 206]]
ARGS = dict(model="dummy:tiny", device="cpu", dtype="float32", max_model_len=64, num_kv_blocks=64)


@pytest.fixture(scope="module")
def llm():
    return LLM(**ARGS, show_progress=False)


PARAMS = {
    "greedy": SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True),
    "n2-logprobs": SamplingParams(max_tokens=7, temperature=1.0, seed=3, n=2, logprobs=2, ignore_eos=True),
    "prompt-logprobs": SamplingParams(max_tokens=5, temperature=0.0, prompt_logprobs=2, ignore_eos=True),
    "delta": SamplingParams(
        max_tokens=8,
        temperature=1.0,
        seed=1,
        logprobs=1,
        prompt_logprobs=1,
        output_kind=RequestOutputKind.DELTA,
    ),
    "stop-string": SamplingParams(
        max_tokens=20, temperature=1.0, seed=7, stop=["<t4", "\x03"], ignore_eos=True
    ),
    "stop-kept": SamplingParams(
        max_tokens=20, temperature=1.0, seed=7, stop=["<t4"], include_stop_str_in_output=True, ignore_eos=True
    ),
    "no-detokenize": SamplingParams(max_tokens=6, temperature=1.0, seed=2, detokenize=False, ignore_eos=True),
}


@pytest.mark.parametrize("name", list(PARAMS))
def test_outputs_cross_the_wire_unchanged(llm, name):
    engine = llm.engine
    enc, dec = OutputEncoder(), OutputDecoder()
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"{name}-{i}", {"prompt_token_ids": prompt}, PARAMS[name].clone())
    heads = {}
    steps = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        wire = pickle.loads(pickle.dumps(enc.encode(outs)))
        for item in wire:
            if item[1] is not None:
                heads[item[0]] = heads.get(item[0], 0) + 1
        assert [dec.decode(item) for item in wire] == outs
        steps += 1
    assert steps > 3
    assert heads == {f"{name}-{i}": 1 for i in range(len(PROMPTS))}  # the prompt crosses once
    assert not enc._sent and not dec._state  # finished requests leave nothing behind


# a step of one completion: how its text, token ids and logprobs change (grow as the engine's do, or not)
_STEP = st.tuples(
    st.sampled_from(["grow", "replace", "shrink"]),
    st.text(max_size=4),
    st.lists(st.integers(0, 9), max_size=3),
    st.sampled_from(["grow", "fresh", "copied", "none"]),
)


@settings(max_examples=200, deadline=None)
@given(
    histories=st.lists(st.lists(_STEP, min_size=1, max_size=6), min_size=1, max_size=3),
    prompt_lp=st.sampled_from(["none", "shared", "fresh"]),
)
def test_any_output_history_crosses_the_wire_unchanged(histories, prompt_lp):
    """Whatever a request's outputs do from one to the next (texts that grow, shrink or change, token ids
    replaced, logprob lists of shared, fresh or copied-equal dicts, prompt logprobs again or anew), the front
    end rebuilds them equal; the prefix kept is never taken from a value that is not the earlier one's."""
    enc, dec = OutputEncoder(), OutputDecoder()
    state = {}  # index -> (text, ids, logprobs)
    plp = [None, {1: -0.5}, {2: -0.25}]
    for step in range(max(len(h) for h in histories)):
        comps = []
        for index, history in enumerate(histories):
            text, ids, lps = state.get(index, ("", [], []))
            how, t, new_ids, lp_how = history[min(step, len(history) - 1)]
            if how == "grow":
                text, ids = text + t, ids + new_ids
            elif how == "replace":
                text, ids = t, list(new_ids)
            else:
                text, ids = text[: len(text) // 2], ids[: len(ids) // 2]
            entries = [{i: -float(i)} for i in new_ids]
            if lp_how == "grow":
                lps = (lps or []) + entries
            elif lp_how == "fresh":
                lps = entries
            elif lp_how == "copied":  # equal content, other objects: must not be taken as the same entries
                lps = [dict(e) for e in (lps or [])] + entries
            else:
                lps = None
            state[index] = (text, ids, lps)
            comps.append(
                CompletionOutput(
                    index,
                    text,
                    list(ids),
                    -1.0 * step,
                    None if lps is None else list(lps),
                    delta_text=t,
                    delta_token_ids=list(new_ids),
                )  # fmt: skip
            )
        last = step == max(len(h) for h in histories) - 1
        if prompt_lp == "fresh":
            plp = [None] + [dict(e) for e in plp[1:]]
        out = RequestOutput(
            "req", "prompt", [1, 2, 3], comps, last, RequestMetrics(0.5, 0.6, 0.7, 0.8 + step, None, 2),
            prompt_logprobs=None if prompt_lp == "none" else list(plp),
        )  # fmt: skip
        wire = pickle.loads(pickle.dumps(enc.encode([out])))
        assert dec.decode(wire[0]) == out
    assert not enc._sent and not dec._state


def test_an_aborted_request_is_forgotten_on_both_sides(llm):
    engine = llm.engine
    enc, dec = OutputEncoder(), OutputDecoder()
    engine.add_request("gone", {"prompt_token_ids": PROMPTS[0]}, PARAMS["greedy"].clone())
    for item in enc.encode(engine.step()):
        dec.decode(item)
    engine.abort_request("gone")
    enc.forget("gone")
    dec.forget("gone")
    assert not enc._sent and not dec._state
    while engine.has_unfinished_requests():
        engine.step()


# -- the engine in its own process -----------------------------------------------------------------------
def _run(coro):
    return asyncio.run(coro)


async def _collect(eng, prompt, params, rid):
    outs = []
    async for out in eng.generate({"prompt_token_ids": prompt}, params, rid):
        outs.append(out)
    return outs


def give_the_engine_a_lock(engine) -> None:
    """(the core's hook) an attribute whose value does not pickle."""
    import threading

    engine.a_lock = threading.Lock()


def test_engine_process_end_to_end(llm):
    greedy = PARAMS["greedy"]
    want = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], greedy)]

    async def main():
        eng = MPAsyncLLMEngine.from_engine_args(
            EngineArgs(**ARGS), log_stats=False, hook="tests.engine.test_core_proc:give_the_engine_a_lock"
        )
        try:
            assert eng.config.scheduler_config.max_model_len == 64
            assert eng.tokenizer.encode("hi") == llm.engine.tokenizer.encode("hi")
            # greedy tokens as in this process, and the outputs stream step by step
            runs = await asyncio.gather(
                *(_collect(eng, p, greedy.clone(), f"r{i}") for i, p in enumerate(PROMPTS))
            )
            assert [r[-1].outputs[0].token_ids for r in runs] == want
            assert all(len(r) > 1 and r[-1].finished and not any(o.finished for o in r[:-1]) for r in runs)
            assert runs[0][-1].prompt_token_ids == PROMPTS[0]
            assert runs[0][-1].metrics.ttft_s > 0
            # bad input: raised at the first item, the engine goes on
            with pytest.raises(ValueError, match="out of range"):
                await _collect(eng, [10**6], greedy.clone(), "bad")
            with pytest.raises(ValueError, match="max_tokens"):
                await _collect(eng, PROMPTS[1], SamplingParams(max_tokens=0), "bad2")
            # a consumer that leaves aborts its request in the core
            long = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
            gen = eng.generate({"prompt_token_ids": PROMPTS[1]}, long, "leaver")
            await gen.__anext__()
            await gen.aclose()
            for _ in range(200):
                if eng.engine.get_stats().num_running == 0:
                    break
                await asyncio.sleep(0.02)
            assert eng.engine.get_stats().num_running == 0
            assert eng.num_pending() == 0
            assert await eng.call("reset_prefix_cache") is True
            assert await eng.call("num_kv_blocks") == 64  # an attribute's value
            with pytest.raises(RuntimeError, match="does not pickle"):
                await eng.call("a_lock")  # (the hook's) the engine goes on
            assert await eng.call("num_kv_blocks") == 64
            with pytest.raises(RuntimeError, match="AttributeError"):
                await eng.call("no_such_method")
            stats = eng.engine.get_stats()
            assert stats.num_generation_tokens >= sum(len(t) for t in want)
        finally:
            await eng.shutdown(drain_timeout_s=5)
        assert eng.proc.exitcode == 0
        assert not eng.is_running

    _run(main())


def test_shutdown_under_load_is_prompt():
    """Streams running with a busy core: shutdown without a drain aborts them and the core is gone in
    seconds (its last outputs, sent while it stops, are read and dropped, not left on a full pipe)."""

    async def main():
        eng = MPAsyncLLMEngine.from_engine_args(EngineArgs(**ARGS), log_stats=False)
        params = SamplingParams(max_tokens=60, temperature=1.0, logprobs=5, ignore_eos=True)
        gens = [eng.generate({"prompt_token_ids": [3 + i, 4, 5]}, params.clone(), f"s{i}") for i in range(16)]
        for g in gens:
            await g.__anext__()
        t0 = time.monotonic()
        await eng.shutdown(drain_timeout_s=0)
        elapsed = time.monotonic() - t0
        for g in gens:  # each ends (aborted at shutdown) instead of waiting forever
            async for _ in g:
                pass
        return elapsed, eng.proc.exitcode

    elapsed, code = _run(main())
    assert (
        code == 0 and elapsed < 20
    )  # a hang check (a stuck output thread costs 30 s, then a kill), not a speed one


def test_a_dead_engine_core_fails_every_stream():
    async def main():
        eng = MPAsyncLLMEngine.from_engine_args(EngineArgs(**ARGS), log_stats=False)
        try:
            params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
            gens = [
                eng.generate({"prompt_token_ids": p}, params.clone(), f"k{i}") for i, p in enumerate(PROMPTS)
            ]
            for g in gens:
                await g.__anext__()
            os.kill(eng.proc.pid, signal.SIGKILL)
            for g in gens:
                with pytest.raises(EngineDeadError):
                    async for _ in g:
                        pass
            assert not eng.is_running
            with pytest.raises(EngineDeadError):
                await _collect(eng, PROMPTS[0], params.clone(), "after")
        finally:
            await eng.shutdown(drain_timeout_s=1)

    _run(main())


def test_a_start_up_error_is_raised_as_in_one_process():
    with pytest.raises(ValueError, match="max_position_embeddings"):
        MPAsyncLLMEngine.from_engine_args(EngineArgs(**{**ARGS, "max_model_len": 1 << 20}), log_stats=False)


def _hf_model_and_greedy_tokens(tmp_path) -> tuple[dict, list[list[int]]]:
    """An HF checkpoint's engine arguments (dummy weights are drawn per rank) and its greedy tokens for
    PROMPTS, in this process."""
    from tests.helpers import make_hf_llama_dir

    model = make_hf_llama_dir(str(tmp_path / "model"), seed=5)
    args = dict(model=model, device="cpu", dtype="float32", max_model_len=64, num_kv_blocks=64)
    ref = LLM(**args, show_progress=False)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    want = [o.outputs[0].token_ids for o in ref.generate(prompts, PARAMS["greedy"])]
    ref.engine.shutdown()
    return args, want


def test_engine_process_with_tensor_parallel_workers(tmp_path):
    """The core spawns the tensor-parallel ranks of its own (it is not a daemon); their tokens are TP=1's
    (an HF checkpoint: dummy weights are drawn per rank), and stopping the core stops them."""
    args, want = _hf_model_and_greedy_tokens(tmp_path)
    greedy = PARAMS["greedy"]

    async def main():
        eng = MPAsyncLLMEngine.from_engine_args(EngineArgs(**args, tensor_parallel_size=2), log_stats=False)
        try:
            assert eng.config.parallel_config.tensor_parallel_size == 2
            runs = await asyncio.gather(
                *(_collect(eng, p, greedy.clone(), f"tp{i}") for i, p in enumerate(PROMPTS))
            )
            ranks = await eng.call("executor.worker_pids")
        finally:
            await eng.shutdown(drain_timeout_s=5)
        return [r[-1].outputs[0].token_ids for r in runs], ranks

    got, ranks = _run(main())
    assert got == want
    assert len(ranks) == 2
    for pid in ranks:  # gone (or a zombie of the core's, reaped with it)
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"tensor-parallel rank {pid} outlived the engine core")


def test_a_request_error_keeps_its_kind_across_the_wire():
    """What the server answers 400 / 429 for stays such (subclasses too); anything else is a bug: 500."""
    import json

    from hopperllm.engine.core_client import _request_error
    from hopperllm.engine.core_proc import error_kind
    from hopperllm.engine.llm_engine import QueueFullError
    from hopperllm.engine.structured_output import StructuredOutputError

    try:
        json.loads("{")
    except ValueError as e:
        decode_error = e
    for error, kind in [
        (ValueError("bad"), ValueError),
        (decode_error, ValueError),
        (StructuredOutputError("grammar"), StructuredOutputError),
        (QueueFullError("full"), QueueFullError),
        (KeyError("bug"), RuntimeError),
    ]:
        rebuilt = _request_error(error_kind(error), str(error))
        assert type(rebuilt) is kind and str(error) in str(rebuilt)


def test_priority_crosses_to_the_engine_core():
    """The process engine under --scheduling-policy priority: one sequence at a time; the first request runs,
    then of the two that waited the higher priority (lower value) finishes first, though it came later."""

    async def main():
        eng = MPAsyncLLMEngine.from_engine_args(
            EngineArgs(**ARGS, max_num_seqs=1, scheduling_policy="priority"), log_stats=False
        )
        done = []
        try:

            async def run(gen, rid):
                async for out in gen:
                    if out.finished:
                        done.append(rid)

            def start(rid, prio, n):
                params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
                return eng.generate({"prompt_token_ids": [3, 4, 5]}, params, rid, priority=prio)

            first = start("first", 0, 60)
            await first.__anext__()  # admitted and running, with ~60 steps to go: the next two wait behind it
            await asyncio.gather(
                run(first, "first"), run(start("low", 7, 4), "low"), run(start("high", -7, 4), "high")
            )
        finally:
            await eng.shutdown()
        return done

    assert _run(main()) == ["first", "high", "low"]


def test_draft_model_speculation_in_the_engine_process(tmp_path):
    """A draft model runs beside the target in the engine core's process (the server's engine): streamed
    greedy tokens are those of decoding without drafts, and the drafts were accepted."""
    args, want = _hf_model_and_greedy_tokens(tmp_path)
    greedy = PARAMS["greedy"]
    spec = {"model": args["model"], "num_speculative_tokens": 3}

    async def main():
        eng = MPAsyncLLMEngine.from_engine_args(EngineArgs(**args, speculative_config=spec), log_stats=False)
        try:
            runs = await asyncio.gather(
                *(_collect(eng, p, greedy.clone(), f"s{i}") for i, p in enumerate(PROMPTS))
            )
            stats = eng.engine.get_stats()
        finally:
            await eng.shutdown(drain_timeout_s=5)
        return [r[-1].outputs[0].token_ids for r in runs], stats

    got, stats = _run(main())
    assert got == want
    assert stats.num_accepted_tokens == stats.num_draft_tokens > 0  # the target drafting for itself
