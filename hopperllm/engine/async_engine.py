"""AsyncLLMEngine: an asyncio front for LLMEngine that streams per-request outputs.

One background task owns the engine: it applies queued adds and aborts between steps and runs each
`step()` in a worker thread, so the event loop (HTTP server) stays responsive while the model runs.
Requests are validated on the caller's side (ValueError -> HTTP 400) before they are queued.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator

from hopperllm.engine.llm_engine import LLMEngine, PromptType, QueueFullError
from hopperllm.outputs import RequestOutput
from hopperllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


_ABORTED = object()  # ends a stream that was aborted from the server side
STEP_DRAIN_TIMEOUT_S = 60.0
CALL_TIMEOUT_S = 60.0  # how long `call()` waits for the engine to run it between steps  # how long a cancelled engine loop waits for the step in its worker thread
# The engine's next step starts before a step's outputs reach their streams (HOPPERLLM_SERVE_OVERLAP=0 turns
# it off), so that the HTTP handlers (each stream's chunk, its JSON, the socket write) run while the step
# waits on the device with the GIL released instead of between steps. On the CPU with a zero model
# (benchmarks/serve_overhead.py) both sides are Python under one GIL and it gained nothing; on one H200
# (Llama-3-8B FP8, 200 x 1024/128 all at once, alternating 0 1 1 0) 39.6 / 39.4 -> 43.3 / 42.4 req/s and TPOT
# 24.5 / 24.4 -> 21.6 / 22.6 ms; at 8 req/s no change (perf-notes v32).
SERVE_OVERLAP = os.environ.get("HOPPERLLM_SERVE_OVERLAP", "1") != "0"


def call_engine(engine, name: str, args: tuple = ()):
    """`engine.<name>(*args)` for a dotted name (or the attribute's value where it is not callable)."""
    fn = engine
    for part in name.split("."):
        fn = getattr(fn, part)
    return fn(*args) if callable(fn) else fn


class EngineDeadError(RuntimeError):
    """The engine loop failed; no request can complete."""


class StatsLogger:
    """vLLM's periodic engine log line (off with --disable-log-stats): every `interval_s` seconds in which
    something ran, the prompt and generation throughput since the last line, the running and waiting
    requests, KV-cache usage, the prefix-cache hit rate and, when drafting, the draft acceptance."""

    def __init__(self, engine: LLMEngine, interval_s: float = 10.0):
        self.engine = engine
        self.interval_s = interval_s
        self._last = time.monotonic()
        s = engine.get_stats()
        self._prompt, self._gen = s.num_prompt_tokens, s.num_generation_tokens

    def maybe_log(self, now: float | None = None) -> str | None:
        now = time.monotonic() if now is None else now
        dt = now - self._last
        if dt < self.interval_s:
            return None
        s = self.engine.get_stats()
        prompt, gen = s.num_prompt_tokens - self._prompt, s.num_generation_tokens - self._gen
        self._last, self._prompt, self._gen = now, s.num_prompt_tokens, s.num_generation_tokens
        if not (prompt or gen or s.num_running or s.num_waiting):
            return None
        line = (
            f"Avg prompt throughput: {prompt / dt:.1f} tokens/s, Avg generation throughput: {gen / dt:.1f} "
            f"tokens/s, Running: {s.num_running} reqs, Waiting: {s.num_waiting} reqs, GPU KV cache usage: "
            f"{100 * s.kv_cache_usage:.1f}%, Prefix cache hit rate: {100 * s.prefix_cache_hit_rate:.1f}%"
        )
        if s.num_draft_tokens:
            line += f", Draft acceptance rate: {100 * s.num_accepted_tokens / s.num_draft_tokens:.1f}%"
        logger.info(line)
        return line


class EngineFront:
    """What AsyncLLMEngine (the engine in this process) and core_client.MPAsyncLLMEngine (in a process of its
    own) share: the engine's tokenizer, config and sampling defaults through `self.engine`, the checks a new
    request passes before it is queued, and shutdown's drain. Subclasses keep `_dead`, `_stopping`, `_streams`
    and `max_waiting_requests`, and give `num_pending()`, `is_running` and `abort()`."""

    engine: object
    max_waiting_requests: int | None
    _expedite: bool = False  # shutdown stops waiting for the requests in flight (a second Ctrl+C)
    _dead: BaseException | None
    _stopping: bool
    _streams: dict

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def default_sampling(self) -> dict:
        """SamplingParams defaults from the model's generation config (LLMEngine.default_sampling)."""
        return self.engine.default_sampling

    @property
    def config(self):
        return self.engine.config

    def num_pending(self) -> int:
        raise NotImplementedError

    @property
    def is_running(self) -> bool:
        raise NotImplementedError

    async def abort(self, request_id: str) -> None:
        raise NotImplementedError

    async def _drain(self, drain_timeout_s: float) -> None:
        """Stop accepting; let in-flight requests finish for up to drain_timeout_s (or until abort_all_soon),
        then abort the rest."""
        self._stopping = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout_s
        while self._streams and loop.time() < deadline and self.is_running and not self._expedite:
            await asyncio.sleep(0.05)
        for rid in list(self._streams):
            await self.abort(rid)

    def abort_all_soon(self) -> None:
        """A shutdown under way (or the next) aborts the requests in flight instead of waiting for them."""
        self._expedite = True

    def _check_new_request(self, request_id: str) -> None:
        """Raise what the server maps to HTTP 500 / 503 / 429 / 400 for a request it cannot take now."""
        if self._dead is not None:
            raise EngineDeadError(f"the engine failed: {self._dead}")
        if self._stopping:
            raise QueueFullError("the server is shutting down")
        if self.max_waiting_requests is not None and self.num_pending() >= self.max_waiting_requests:
            raise QueueFullError(f"the waiting queue is full ({self.max_waiting_requests} requests)")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")


class AsyncLLMEngine(EngineFront):
    def __init__(
        self,
        engine: LLMEngine,
        max_waiting_requests: int | None = None,
        log_stats: bool = True,
        log_stats_interval_s: float = 10.0,
        overlap: bool | None = None,
    ):
        self.engine = engine
        self.overlap = SERVE_OVERLAP if overlap is None else overlap
        self.stats_logger = StatsLogger(engine, log_stats_interval_s) if log_stats else None
        self.max_waiting_requests = max_waiting_requests
        self._streams: dict[str, asyncio.Queue] = {}
        self._pending_adds: list = []
        self._pending_aborts: list[str] = []
        self._pending_calls: list[tuple[str, tuple, asyncio.Future]] = []
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._dead: BaseException | None = None
        self._stopping = False
        self.step_count = 0

    @classmethod
    def from_engine_args(
        cls, args, max_waiting_requests: int | None = None, show_progress: bool = True, log_stats: bool = True
    ):
        return cls(
            LLMEngine.from_engine_args(args, show_progress=show_progress), max_waiting_requests, log_stats
        )

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        if self._loop_task is None:
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run_loop())

    @property
    def is_running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done() and self._dead is None

    async def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Stop accepting; let in-flight requests finish for up to drain_timeout_s, then abort them."""
        await self._drain(drain_timeout_s)
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except (asyncio.CancelledError, Exception):
                pass
            self._loop_task = None
        self.engine.shutdown()

    # -- requests ---------------------------------------------------------------------------
    def num_pending(self) -> int:
        return len(self._pending_adds) + self.engine.scheduler.num_waiting

    async def generate(
        self, prompt: PromptType, params: SamplingParams, request_id: str, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        """Yield RequestOutputs (cumulative text plus delta fields) until the request finishes.
        If the consumer stops iterating (client disconnect), the request is aborted."""
        self._check_new_request(request_id)
        if params.structured_outputs is not None:
            # compiling a grammar (and, the first time, llguidance's view of the vocabulary) can take a
            # while: off the event loop, which keeps serving the other requests meanwhile
            req = await asyncio.to_thread(
                self.engine.prepare_request, request_id, prompt, params, priority=priority
            )
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
        else:
            req = self.engine.prepare_request(
                request_id, prompt, params, priority=priority
            )  # ValueError on bad input
        self.start()
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        self._pending_adds.append(req)
        self._wakeup.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if item is _ABORTED:
                    return
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"the engine failed: {item}") from item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._abort_nowait(request_id)

    def _abort_nowait(self, request_id: str) -> None:
        self._pending_aborts.append(request_id)
        if self._wakeup is not None:
            self._wakeup.set()

    async def abort(self, request_id: str) -> None:
        q = self._streams.pop(request_id, None)
        self._abort_nowait(request_id)
        if q is not None:
            q.put_nowait(_ABORTED)

    async def call(self, name: str, *args, timeout_s: float = CALL_TIMEOUT_S):
        """Call an LLMEngine method between steps (a dotted name reaches further: "reset_prefix_cache",
        "executor.worker_pids"), or read an attribute; its value. A failure is a RuntimeError naming it."""
        if self._dead is not None:
            raise EngineDeadError(f"the engine failed: {self._dead}")
        self.start()
        fut = asyncio.get_running_loop().create_future()
        self._pending_calls.append((name, args, fut))
        self._wakeup.set()
        return await asyncio.wait_for(fut, timeout_s)

    # -- the loop ---------------------------------------------------------------------------
    def _start_step(self) -> asyncio.Future:
        return asyncio.ensure_future(asyncio.to_thread(self.engine.step))

    def _apply_pending(self) -> None:
        calls, self._pending_calls = self._pending_calls, []
        for name, args, fut in calls:  # between steps, as the core process runs them
            if fut.done():
                continue
            try:
                fut.set_result(call_engine(self.engine, name, args))
            except Exception as e:
                fut.set_exception(RuntimeError(f"{type(e).__name__}: {e}"))
        adds, self._pending_adds = self._pending_adds, []
        aborts, self._pending_aborts = set(self._pending_aborts), []
        for req in adds:
            if req.request_id in aborts:
                continue
            try:
                self.engine.commit_request(req)
            except Exception as e:  # e.g. duplicate id racing another add
                q = self._streams.get(req.request_id)
                if q is not None:
                    q.put_nowait(e)
        if aborts:
            self.engine.abort_request(list(aborts))

    async def _run_loop(self) -> None:
        step: asyncio.Future | None = None  # the engine step running in the worker thread
        try:
            while True:
                if step is None:
                    self._apply_pending()
                    if not self.engine.has_unfinished_requests():
                        self._wakeup.clear()
                        if not self._pending_adds and not self._pending_aborts and not self._pending_calls:
                            await self._wakeup.wait()
                        continue
                    step = self._start_step()
                outputs = await asyncio.shield(step)  # a cancelled loop still waits for the thread below
                step = None
                self.step_count += 1
                if self.stats_logger is not None:
                    self.stats_logger.maybe_log()
                # (SERVE_OVERLAP, the default) the outputs are snapshots the next step does not touch
                if self.overlap:
                    self._apply_pending()
                    if self.engine.has_unfinished_requests():
                        step = self._start_step()
                for out in outputs:
                    q = self._streams.get(out.request_id)
                    if q is not None:
                        q.put_nowait(out)
                await asyncio.sleep(0)  # let handlers run
        except asyncio.CancelledError:
            if step is not None:  # shutdown: the engine is not torn down under a running step
                await asyncio.wait({step}, timeout=STEP_DRAIN_TIMEOUT_S)
            raise
        except BaseException as e:  # a model failure: every waiting client gets an error, not a hang
            logger.exception("engine loop failed")
            self._dead = e
            for q in self._streams.values():
                q.put_nowait(e)
            for _, _, fut in self._pending_calls:
                if not fut.done():
                    fut.set_exception(EngineDeadError(f"the engine failed: {e}"))
