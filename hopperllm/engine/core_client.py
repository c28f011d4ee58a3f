"""MPAsyncLLMEngine: AsyncLLMEngine's interface over an engine core in a process of its own (core_proc.py).

The front end keeps what the server needs between steps: the tokenizer (chat templates, tokenizing), the
config, the streams. Each request goes to the core as (id, prompt, params, arrival time); the core prepares
it there (a ValueError, a grammar that does not compile: the stream's first item raises it, which the server
turns into HTTP 400 before the response starts, as in one process). Each step's outputs come back as deltas
on the event loop (a reader on the pipe), are rebuilt into RequestOutputs and go to their streams.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import os
import pickle
import select
import struct
import time
import weakref
from collections.abc import AsyncIterator

from hopperllm.engine.async_engine import _ABORTED, CALL_TIMEOUT_S, EngineDeadError, EngineFront
from hopperllm.engine.core_proc import (
    ABORT,
    ADD,
    CALL,
    DEAD,
    ERROR,
    OUTPUTS,
    READY,
    REPLY,
    SHUTDOWN,
    STATS,
    OutputDecoder,
    _dumps,
    run_engine_core,
)
from hopperllm.engine.llm_engine import EngineStats, PromptType, QueueFullError, truncate_prompt
from hopperllm.outputs import RequestOutput
from hopperllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

START_TIMEOUT_S = float(os.environ.get("HOPPERLLM_ENGINE_START_TIMEOUT", "1800"))
STOP_TIMEOUT_S = 30.0
READ_CHUNK = 1 << 20
_I32, _U64 = struct.Struct("!i"), struct.Struct("!Q")


def _request_error(name: str, message: str) -> Exception:
    """A request's error from the core (core_proc.error_kind), as the type the server maps: 400, 429, or for
    anything else (a bug) a RuntimeError naming it, 500."""
    if name == "QueueFullError":
        return QueueFullError(message)
    if name == "StructuredOutputError":
        from hopperllm.engine.structured_output import StructuredOutputError

        return StructuredOutputError(message)
    if name == "ValueError":
        return ValueError(message)
    return RuntimeError(f"{name}: {message}")


def _stop_process(proc, conn, reader, timeout_s: float) -> None:
    """Finalizer: ask the core to stop, then make sure it has. What the core still sends meanwhile is read
    and dropped: a core whose output thread sits on a full pipe would not finish."""
    try:
        conn.send_bytes(_dumps((SHUTDOWN,)))
    except (OSError, ValueError):
        pass
    deadline = time.monotonic() + timeout_s
    try:
        fd = reader.fileno()
    except (OSError, ValueError):
        fd = None
    while fd is not None and proc.is_alive() and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.1)[0]:
            try:
                if not os.read(fd, READ_CHUNK):
                    break  # the core closed its end
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                break
    proc.join(max(0.0, deadline - time.monotonic()))
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    for c in (conn, reader):
        try:
            c.close()
        except OSError:
            pass


class EngineCoreClient:
    """What the server asks of "the engine" beyond requests (`AsyncLLMEngine.engine` in one process): the
    core's config and EOS ids, prompt truncation, and the core's latest stats (sent with each step)."""

    def __init__(self, info: dict):
        self.config = info["config"]
        self.tokenizer = info["tokenizer"]
        self.default_sampling = info["default_sampling"]
        self.eos_token_ids = info["eos_token_ids"]
        self.num_kv_blocks = info["num_kv_blocks"]
        self.stats = EngineStats(num_total_blocks=self.num_kv_blocks, num_free_blocks=self.num_kv_blocks)

    @property
    def max_model_len(self) -> int:
        return self.config.scheduler_config.max_model_len

    def truncate_prompt(self, token_ids: list[int], k: int | None) -> list[int]:
        return truncate_prompt(token_ids, k, self.max_model_len)

    def get_stats(self) -> EngineStats:
        return self.stats


class MPAsyncLLMEngine(EngineFront):
    """AsyncLLMEngine's interface (generate, abort, start, shutdown, is_running, num_pending, tokenizer,
    config, default_sampling, engine) with the LLMEngine in a spawned process."""

    def __init__(self, proc, conn, reader, info: dict, max_waiting_requests: int | None = None):
        self.proc = proc
        self.conn = conn  # to the core (blocking writes: the core's input thread always reads)
        self.reader = reader  # from the core, read on the event loop as bytes arrive (_on_readable)
        self._buf = bytearray()
        self.engine = EngineCoreClient(info)
        self.max_waiting_requests = max_waiting_requests
        self._decoder = OutputDecoder()
        self._streams: dict[str, asyncio.Queue] = {}
        self._unstarted: set[str] = set()  # requests sent that have had no output yet (waiting or prefilling)
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dead: BaseException | None = None
        self._stopping = False
        self._stopped = False
        self.step_count = 0
        self._finalizer = weakref.finalize(self, _stop_process, proc, conn, reader, STOP_TIMEOUT_S)

    @classmethod
    def from_engine_args(
        cls,
        args,
        max_waiting_requests: int | None = None,
        show_progress: bool = True,
        log_stats: bool = True,
        hook: str | None = None,
    ) -> MPAsyncLLMEngine:
        """Spawn the core, wait for it to load the model; a ValueError there (a bad flag, a model that does
        not fit) is raised here as it would be in one process."""
        ctx = mp.get_context("spawn")
        # one pipe each way: the event loop may make its reading end non-blocking (uvloop does), and the
        # front end's writes must stay blocking
        child_in, conn = ctx.Pipe(duplex=False)
        reader, child_out = ctx.Pipe(duplex=False)
        level = logging.getLogger().getEffectiveLevel() if logging.getLogger().handlers else None
        proc = ctx.Process(
            target=run_engine_core,
            name="hopperllm-engine-core",
            args=(child_in, child_out, args, log_stats, level, hook, show_progress),
            daemon=False,  # it spawns tensor-parallel workers of its own
        )
        proc.start()
        child_in.close()  # the core holds the only other ends: its death reads as EOF here
        child_out.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while not reader.poll(1.0):
                if not proc.is_alive():
                    raise RuntimeError(f"the engine core exited with {proc.exitcode} while starting")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the engine core did not start within {START_TIMEOUT_S:.0f} s")
            msg = pickle.loads(reader.recv_bytes())
        except EOFError:
            proc.join(5)
            raise RuntimeError(f"the engine core exited with {proc.exitcode} while starting") from None
        except BaseException:
            _stop_process(proc, conn, reader, 5)
            raise
        if msg[0] == ERROR:
            _, _, name, message, tb = msg
            _stop_process(proc, conn, reader, STOP_TIMEOUT_S)
            error = _request_error(
                name, message
            )  # a ValueError (a flag, a model that does not fit): CLI exit 2
            if isinstance(error, ValueError):
                raise error
            raise RuntimeError(f"the engine core failed to start: {name}: {message}\n{tb}")
        if msg[0] != READY:
            _stop_process(proc, conn, reader, STOP_TIMEOUT_S)
            raise RuntimeError(f"the engine core sent {msg[0]!r} before it was ready")
        logger.info("engine core in process %d", msg[1]["pid"])
        return cls(proc, conn, reader, msg[1], max_waiting_requests)

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        if self._loop is None and not self._stopped:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self.reader.fileno(), self._on_readable)

    @property
    def is_running(self) -> bool:
        return self._loop is not None and self._dead is None and not self._stopped

    async def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Stop accepting; let in-flight requests finish for up to drain_timeout_s, then abort them and stop
        the core."""
        await self._drain(drain_timeout_s)
        self._close()
        await asyncio.to_thread(self._finalizer)

    def _close(self) -> None:
        if self._loop is not None and not self._stopped:
            try:
                self._loop.remove_reader(self.reader.fileno())
            except (OSError, ValueError):
                pass
        self._stopped = self._stopping = True

    # -- requests ---------------------------------------------------------------------------
    def num_pending(self) -> int:
        """Requests sent that have had no output yet: the core's waiting queue and the prompts it prefills."""
        return len(self._unstarted)

    def _send(self, msg) -> None:
        try:
            self.conn.send_bytes(_dumps(msg))
        except (OSError, ValueError) as e:
            self._fail(EngineDeadError(f"the engine core is gone ({e})"))
            raise self._dead from None

    async def generate(
        self, prompt: PromptType, params: SamplingParams, request_id: str, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        """Yield RequestOutputs until the request finishes; the core's error for it (bad input) is raised at
        the first item. If the consumer stops iterating (client disconnect), the request is aborted."""
        self._check_new_request(request_id)
        self.start()
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = q
        self._unstarted.add(request_id)
        finished = False
        try:
            self._send((ADD, request_id, prompt, params, time.monotonic(), priority))
            while True:
                item = await q.get()
                if item is _ABORTED:
                    return
                if isinstance(item, BaseException):
                    finished = True  # the core never took it (bad input), or the core is gone
                    if isinstance(item, EngineDeadError):
                        raise EngineDeadError(str(item))
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            self._unstarted.discard(request_id)
            self._decoder.forget(request_id)
            if not finished and self._dead is None and not self._stopped:
                self._send_abort(request_id)

    def _send_abort(self, request_id: str) -> None:
        try:
            self.conn.send_bytes(_dumps((ABORT, [request_id])))
        except (OSError, ValueError):
            pass  # the core is gone; its end of the pipe reports it

    async def abort(self, request_id: str) -> None:
        q = self._streams.pop(request_id, None)
        self._unstarted.discard(request_id)
        if self._dead is None and not self._stopped:
            self._send_abort(request_id)
        if q is not None:
            q.put_nowait(_ABORTED)

    async def call(self, name: str, *args, timeout_s: float = CALL_TIMEOUT_S):
        """Call an LLMEngine method in the core between steps (a dotted name reaches further:
        "reset_prefix_cache", "executor.worker_pids"), or read an attribute; its value."""
        self.start()
        call_id = next(self._call_ids)
        fut = asyncio.get_running_loop().create_future()
        self._calls[call_id] = fut
        try:
            self._send((CALL, call_id, name, args))
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            self._calls.pop(call_id, None)

    # -- the core's messages ----------------------------------------------------------------
    def _on_readable(self) -> None:
        """Whatever bytes the core has sent; each whole message (Connection.send_bytes' framing: a 4-byte
        big-endian length, or -1 and an 8-byte one) is dispatched, a partial one waits for the rest."""
        try:
            chunk = os.read(self.reader.fileno(), READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""  # read as the core's end
        if not chunk:
            self.proc.join(1)
            code = self.proc.exitcode
            self._fail(EngineDeadError(f"the engine core exited ({code if code is not None else 'EOF'})"))
            return
        buf = self._buf
        buf += chunk
        start = 0
        with memoryview(buf) as view:
            while len(buf) - start >= 4:
                (n,) = _I32.unpack_from(buf, start)
                head = 4
                if n == -1:
                    if len(buf) - start < 12:
                        break
                    (n,) = _U64.unpack_from(buf, start + 4)
                    head = 12
                end = start + head + n
                if end > len(buf):
                    break
                try:
                    self._dispatch(pickle.loads(view[start + head : end]))
                except Exception as e:  # a message this side cannot take: fail loudly, not hang the streams
                    logger.exception("the engine core's message could not be read")
                    self._fail(EngineDeadError(f"the engine core's output could not be read: {e}"))
                    return
                start = end
        del buf[:start]

    def _dispatch(self, msg) -> None:
        kind = msg[0]
        if kind == OUTPUTS:
            _, items, stats = msg
            self.engine.stats = stats
            self.step_count += 1
            streams, decode, unstarted = self._streams, self._decoder.decode, self._unstarted
            for item in items:
                rid = item[0]
                q = streams.get(rid)
                if q is None:
                    continue  # aborted here after the core stepped it
                unstarted.discard(rid)
                q.put_nowait(decode(item))
        elif kind == STATS:
            self.engine.stats = msg[1]
        elif kind == ERROR:
            _, rid, name, message = msg[:4]
            q = self._streams.get(rid)
            if q is not None:
                q.put_nowait(_request_error(name, message))
        elif kind == REPLY:
            _, call_id, ok, value = msg
            fut = self._calls.get(call_id)
            if fut is not None and not fut.done():
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(RuntimeError(value))
        elif kind == DEAD:
            _, message, tb = msg
            logger.error("the engine core failed: %s\n%s", message, tb)
            self._fail(EngineDeadError(f"the engine failed: {message}"))

    def _fail(self, error: EngineDeadError) -> None:
        if self._dead is not None:
            return
        self._dead = error
        if self._loop is not None:
            try:
                self._loop.remove_reader(self.reader.fileno())
            except (OSError, ValueError):
                pass
        for q in self._streams.values():
            q.put_nowait(error)
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(error)
