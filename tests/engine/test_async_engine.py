"""AsyncLLMEngine's loop over a scripted engine: every stream gets its outputs in order; with `overlap` the
next engine step starts before a step's outputs reach the streams (the handlers run while the engine steps);
a failing step reaches every stream; shutdown does not tear the engine down under a running step."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest

from hopperllm.engine.async_engine import AsyncLLMEngine, EngineDeadError
from hopperllm.outputs import CompletionOutput, RequestOutput


class ScriptedEngine:
    """LLMEngine's surface the async loop uses: each step gives every live request its next token."""

    def __init__(self, step_hook=None):
        self.requests: dict[str, list[int]] = {}  # id -> [tokens so far, tokens wanted]
        self.scheduler = SimpleNamespace(num_waiting=0)
        self.steps_started = 0
        self.step_hook = step_hook
        self.events: list[str] = []
        self.fail_at: int | None = None

    def prepare_request(self, request_id, prompt, params, arrival_time=None, priority=0):
        return SimpleNamespace(request_id=request_id, want=params.max_tokens)

    def commit_request(self, req):
        self.requests[req.request_id] = [0, req.want]

    def abort_request(self, ids):
        for i in ids:
            self.requests.pop(i, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        self.steps_started += 1
        k = self.steps_started
        self.events.append(f"step {k} start")
        if self.step_hook is not None:
            self.step_hook(k)
        if self.fail_at == k:
            raise RuntimeError("the model failed")
        outs = []
        for rid, st in list(self.requests.items()):
            st[0] += 1
            done = st[0] >= st[1]
            c = CompletionOutput(0, f"t{st[0]}", [st[0]], delta_text=f"t{st[0]}", delta_token_ids=[st[0]],
                                 finish_reason="length" if done else None)  # fmt: skip
            outs.append(RequestOutput(rid, None, [1], [c], done))
            if done:
                del self.requests[rid]
        self.events.append(f"step {k} end")
        return outs

    def shutdown(self):
        self.events.append("shutdown")


def _params(n: int):
    return SimpleNamespace(max_tokens=n, structured_outputs=None)


async def _collect(engine: AsyncLLMEngine, rid: str, n: int, on_output=None) -> list[str]:
    got = []
    async for out in engine.generate("p", _params(n), rid):
        got.append(out.outputs[0].delta_text)
        if on_output is not None:
            on_output(out)
    return got


@pytest.mark.parametrize("overlap", [False, True])
def test_streams_get_every_output_in_order(overlap):
    async def main():
        eng = AsyncLLMEngine(ScriptedEngine(), log_stats=False, overlap=overlap)
        got = await asyncio.gather(*(_collect(eng, f"r{i}", 3 + i) for i in range(4)))
        await eng.shutdown(drain_timeout_s=1)
        return got

    got = asyncio.run(main())
    assert got == [[f"t{j}" for j in range(1, 4 + i)] for i in range(4)]


def test_overlap_starts_the_next_step_before_outputs_reach_the_streams():
    """With `overlap` (HOPPERLLM_SERVE_OVERLAP=1), a consumer that blocks the event loop on receiving step
    k's output still sees step k + 1 begin: the loop submitted it before handing the outputs over (without,
    it starts once the handlers have run)."""
    started = {k: threading.Event() for k in range(1, 8)}
    scripted = ScriptedEngine(step_hook=lambda k: started[k].set())

    def on_output(out):
        k = out.outputs[0].token_ids[0]
        if not out.finished:
            assert started[k + 1].wait(timeout=5), (
                f"step {k + 1} had not started when step {k}'s output arrived"
            )

    async def main():
        eng = AsyncLLMEngine(scripted, log_stats=False, overlap=True)
        got = await _collect(eng, "r", 5, on_output)
        await eng.shutdown(drain_timeout_s=1)
        return got

    assert asyncio.run(main()) == ["t1", "t2", "t3", "t4", "t5"]


@pytest.mark.parametrize("overlap", [False, True])
def test_a_failing_step_reaches_every_stream(overlap):
    scripted = ScriptedEngine()
    scripted.fail_at = 3

    async def main():
        eng = AsyncLLMEngine(scripted, log_stats=False, overlap=overlap)
        res = await asyncio.gather(*(_collect(eng, f"r{i}", 10) for i in range(3)), return_exceptions=True)
        assert not eng.is_running
        return res

    res = asyncio.run(main())
    assert all(isinstance(r, EngineDeadError) and "the model failed" in str(r) for r in res)


@pytest.mark.parametrize("overlap", [False, True])
def test_shutdown_waits_for_the_running_step(overlap):
    release = threading.Event()

    def hook(k):
        if k == 2:
            release.wait(timeout=5)

    scripted = ScriptedEngine(step_hook=hook)

    async def main():
        eng = AsyncLLMEngine(scripted, log_stats=False, overlap=overlap)
        task = asyncio.ensure_future(_collect(eng, "r", 100))
        while scripted.steps_started < 2:
            await asyncio.sleep(0.01)
        threading.Timer(0.2, release.set).start()
        await eng.shutdown(drain_timeout_s=0)
        task.cancel()

    asyncio.run(main())
    # the engine is shut down only after the step it was running when the loop was cancelled has ended
    assert scripted.events.index("shutdown") > scripted.events.index("step 2 end")


@pytest.mark.parametrize("read", [1, 2])
def test_a_consumer_that_stops_aborts_its_request(read):
    scripted = ScriptedEngine()

    async def main():
        eng = AsyncLLMEngine(scripted, log_stats=False)
        stream = eng.generate("p", _params(1000), "r")
        for _ in range(read):
            await anext(stream)
        await stream.aclose()
        other = await _collect(eng, "s", 3)  # the loop keeps serving
        await eng.shutdown(drain_timeout_s=1)
        return other

    assert asyncio.run(main()) == ["t1", "t2", "t3"]
    assert "r" not in scripted.requests
