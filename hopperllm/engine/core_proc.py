"""The engine core in a process of its own (vLLM V1's split of the server into a front end and an engine core).

In one process the server's HTTP handlers (every stream's chunk, its JSON, the socket write) and the engine's
step (scheduling, the flat batch, reading back tokens, stop checks, detokenizing) share one GIL: at ~190
streams both are milliseconds a step and take turns. Here the core process owns the LLMEngine and loops on
its own: it applies queued adds and aborts, steps, and sends each step's outputs; the front end
(core_client.MPAsyncLLMEngine) keeps the tokenizer, the streams and the HTTP server.

The core has three threads: the main one steps the engine; an input thread reads the front end's messages and
prepares each added request (tokenizing, validating, compiling a grammar: a ValueError goes back to its
stream, the step loop never waits on it); an output thread pickles and sends what the main one queues, while
the next step runs. Outputs cross as deltas (`OutputEncoder` / `OutputDecoder`): a request's prompt once, then
per step what its texts, token ids and logprobs gained, so that a 1024-token prompt is not pickled 128 times.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import signal
import threading
import time
import traceback
from multiprocessing.connection import Connection

from hopperllm.engine.async_engine import StatsLogger, call_engine
from hopperllm.engine.llm_engine import QueueFullError
from hopperllm.engine.structured_output import StructuredOutputError
from hopperllm.outputs import CompletionOutput, RequestMetrics, RequestOutput

logger = logging.getLogger(__name__)

# front end -> core
ADD, ABORT, CALL, SHUTDOWN = "add", "abort", "call", "shutdown"
# core -> front end
READY, OUTPUTS, ERROR, REPLY, STATS, DEAD = "ready", "outputs", "error", "reply", "stats", "dead"
# the errors a request's add may raise in the core, rebuilt by name in the front end (anything else: ValueError)
REQUEST_ERRORS = ("ValueError", "StructuredOutputError", "QueueFullError")
_SAME = "same"  # a request's prompt logprobs as last sent


def error_kind(e: BaseException) -> str:
    """The name the front end rebuilds a request's error from: one of REQUEST_ERRORS for the caller's errors
    (subclasses too: a JSON or Unicode error is a ValueError), else the type's own name (a bug: HTTP 500)."""
    for cls in (StructuredOutputError, QueueFullError, ValueError):
        if isinstance(e, cls):
            return cls.__name__
    return type(e).__name__


def _dumps(msg) -> bytes:
    return pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)


class OutputEncoder:
    """Turns a step's RequestOutputs into small tuples: per request its prompt once, then per completion what
    its text, token ids and logprobs gained since the request's last output (a prefix kept, a tail added),
    and whatever else changed whole. `OutputDecoder` rebuilds equal RequestOutputs on the other side."""

    def __init__(self):
        # request id -> [per completion index: (text, token_ids, logprobs) last sent], prompt logprobs last sent
        self._sent: dict[str, list] = {}

    def forget(self, request_id: str) -> None:
        self._sent.pop(request_id, None)

    def encode(self, outs: list[RequestOutput]) -> list[tuple]:
        wire = []
        for o in outs:
            state = self._sent.get(o.request_id)
            head = None
            if state is None:
                state = self._sent[o.request_id] = [{}, None]
                head = (o.prompt, o.prompt_token_ids)
            comps = []
            sent = state[0]
            for c in o.outputs:
                prev = sent.get(c.index)
                text, ids, lps = c.text, c.token_ids, c.logprobs
                if prev is None:
                    t_keep = i_keep = l_keep = 0
                else:
                    ptext, pids, plps = prev
                    t_keep = len(ptext) if ptext and text.startswith(ptext) else 0
                    k = len(pids)
                    i_keep = k if k and len(ids) >= k and ids[k - 1] == pids[k - 1] and ids[:k] == pids else 0
                    # logprob entries are the engine's own dicts, shared by a request's successive outputs
                    k = len(plps) if plps else 0
                    kept = (
                        k
                        and lps is not None
                        and len(lps) >= k
                        and lps[0] is plps[0]
                        and lps[k - 1] is plps[k - 1]
                    )
                    l_keep = k if kept else 0
                sent[c.index] = (text, ids, lps)
                comps.append(
                    (
                        c.index,
                        t_keep,
                        text[t_keep:] if t_keep else text,
                        i_keep,
                        ids[i_keep:] if i_keep else ids,
                        l_keep,
                        (lps[l_keep:] if l_keep else lps) if lps is not None else None,
                        c.cumulative_logprob,
                        c.finish_reason,
                        c.stop_reason,
                        c.delta_text,
                        c.delta_token_ids,
                    )
                )
            plp = o.prompt_logprobs
            if plp is not None:
                last = state[1]
                if (
                    last is not None
                    and len(last) == len(plp)
                    and (not plp or (plp[-1] is last[-1] and plp[0] is last[0]))
                ):
                    plp = _SAME
                else:
                    state[1] = plp
            m = o.metrics
            metrics = (
                None
                if m is None
                else (
                    m.arrival_time,
                    m.first_scheduled_time,
                    m.first_token_time,
                    m.last_token_time,
                    m.finished_time,
                    m.num_cached_tokens,
                )
            )
            wire.append((o.request_id, head, comps, o.finished, metrics, plp))
            if o.finished:
                del self._sent[o.request_id]
        return wire


class OutputDecoder:
    """The front end's side of OutputEncoder: the RequestOutputs the core's engine made."""

    def __init__(self):
        # request id -> [prompt, prompt token ids, {index: (text, token_ids, logprobs)}, prompt logprobs]
        self._state: dict[str, list] = {}

    def forget(self, request_id: str) -> None:
        self._state.pop(request_id, None)

    def decode(self, item: tuple) -> RequestOutput:
        rid, head, comps, finished, metrics, plp = item
        state = self._state.get(rid)
        if state is None:
            state = self._state[rid] = [head[0], head[1], {}, None] if head else [None, [], {}, None]
        sent = state[2]
        outs = []
        for index, t_keep, text, i_keep, ids, l_keep, lps, cum, reason, stop, dtext, dids in comps:
            prev = sent.get(index)
            if prev is not None:
                if t_keep:
                    text = prev[0] + text
                if i_keep:
                    ids = prev[1] + ids
                if l_keep:
                    lps = prev[2] + lps
            sent[index] = (text, ids, lps)
            outs.append(CompletionOutput(index, text, ids, cum, lps, reason, stop, dtext, dids))
        if plp == _SAME:
            plp = state[3]
        elif plp is not None:
            state[3] = plp
        if finished:
            del self._state[rid]
        return RequestOutput(
            rid,
            state[0],
            state[1],
            outs,
            finished,
            RequestMetrics(*metrics) if metrics is not None else None,
            prompt_logprobs=plp,
        )


class EngineCore:
    """The core process's loop over an LLMEngine (see the module's docstring)."""

    def __init__(
        self,
        engine,
        conn_in: Connection,
        conn_out: Connection,
        log_stats: bool = True,
        log_stats_interval_s: float = 10.0,
    ):
        self.engine = engine
        self.conn_in = conn_in
        self.conn_out = conn_out
        self.encoder = OutputEncoder()
        self.stats_logger = StatsLogger(engine, log_stats_interval_s) if log_stats else None
        self.inputs: queue.SimpleQueue = queue.SimpleQueue()
        self.outputs: queue.SimpleQueue = queue.SimpleQueue()

    # -- threads ---------------------------------------------------------------------------------------
    def _read_inputs(self) -> None:
        """Input thread: every message in order; an add is prepared here (off the step loop)."""
        while True:
            try:
                msg = pickle.loads(self.conn_in.recv_bytes())
            except (EOFError, OSError):  # the front end is gone
                self.inputs.put((SHUTDOWN,))
                return
            if msg[0] == ADD:
                _, rid, prompt, params, arrival, priority = msg
                try:
                    req = self.engine.prepare_request(rid, prompt, params, arrival, priority)
                except Exception as e:  # the caller's error: its stream gets it, nothing else stops
                    self.outputs.put((ERROR, rid, error_kind(e), str(e)))
                    continue
                self.inputs.put((ADD, req))
            else:
                self.inputs.put(msg)
                if msg[0] == SHUTDOWN:
                    return

    def _write_outputs(self) -> None:
        """Output thread: pickles and sends while the main thread runs the next step."""
        while True:
            msg = self.outputs.get()
            if msg is None:
                return
            try:
                data = _dumps(msg)
            except Exception as e:  # a call's value that does not pickle: its caller gets the error
                if msg[0] != REPLY:
                    logger.exception("the engine core's %s message does not pickle", msg[0])
                    msg = (DEAD, f"the engine core's output does not pickle: {e}", traceback.format_exc())
                else:
                    msg = (REPLY, msg[1], False, f"the value does not pickle: {type(e).__name__}: {e}")
                data = _dumps(msg)
            try:
                self.conn_out.send_bytes(data)
            except (OSError, ValueError):  # the front end is gone: the input thread sees it too
                return

    # -- the loop --------------------------------------------------------------------------------------
    def _handle(self, msg) -> bool:
        """Apply one input; False to stop."""
        kind = msg[0]
        if kind == ADD:
            req = msg[1]
            try:
                self.engine.commit_request(req)
            except Exception as e:
                self.outputs.put((ERROR, req.request_id, error_kind(e), str(e)))
        elif kind == ABORT:
            ids = msg[1]
            self.engine.abort_request(ids)
            for rid in ids:
                self.encoder.forget(rid)
        elif kind == CALL:
            _, call_id, name, args = msg
            try:
                value = call_engine(self.engine, name, args)
                self.outputs.put((REPLY, call_id, True, value))
            except Exception as e:
                self.outputs.put((REPLY, call_id, False, f"{type(e).__name__}: {e}"))
        elif kind == SHUTDOWN:
            return False
        return True

    def run(self) -> None:
        reader = threading.Thread(target=self._read_inputs, name="hopperllm-core-input", daemon=True)
        writer = threading.Thread(target=self._write_outputs, name="hopperllm-core-output", daemon=True)
        reader.start()
        writer.start()
        engine = self.engine
        try:
            while True:
                busy = engine.has_unfinished_requests()
                try:
                    msg = self.inputs.get() if not busy else self.inputs.get_nowait()
                except queue.Empty:
                    msg = None
                handled = False
                stop = False
                while msg is not None:
                    handled = True
                    if not self._handle(msg):
                        stop = True
                        break
                    try:
                        msg = self.inputs.get_nowait()
                    except queue.Empty:
                        msg = None
                if stop:
                    break
                if engine.has_unfinished_requests():
                    outs = engine.step()
                    self.outputs.put((OUTPUTS, self.encoder.encode(outs), engine.get_stats()))
                    if self.stats_logger is not None:
                        self.stats_logger.maybe_log()
                elif handled:  # e.g. the last request aborted: the front end's stats catch up
                    self.outputs.put((STATS, engine.get_stats()))
        except BaseException as e:  # a model failure: the front end fails every stream, the server stays up
            logger.exception("engine core failed")
            self.outputs.put((DEAD, f"{type(e).__name__}: {e}", traceback.format_exc()))
        finally:
            self.outputs.put(None)
            writer.join(timeout=30)
            engine.shutdown()


def run_engine_core(
    conn_in: Connection,
    conn_out: Connection,
    engine_args,
    log_stats: bool,
    log_level: int | None,
    hook: str | None = None,
    show_progress: bool = False,
) -> None:
    """The core process's entry (spawned): build the engine, report READY with what the front end needs
    (the config, the tokenizer, sampling defaults, EOS ids, the KV blocks), then loop until SHUTDOWN or the
    front end's end of the pipe closes. `hook` ("module:function") is called with the engine first (the
    benchmarks' zero model)."""
    signal.signal(
        signal.SIGINT, signal.SIG_IGN
    )  # Ctrl-C reaches the whole group: the front end drains, then stops us
    if log_level is not None and not logging.getLogger().handlers:
        logging.basicConfig(level=log_level, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    from hopperllm.worker.worker import _exit_with_parent

    _exit_with_parent()
    try:
        import torch

        from hopperllm.engine.llm_engine import LLMEngine

        torch.manual_seed(engine_args.seed)
        engine = LLMEngine.from_engine_args(engine_args, show_progress=show_progress)
        if hook is not None:
            import importlib

            mod, _, fn = hook.partition(":")
            getattr(importlib.import_module(mod), fn)(engine)
    except BaseException as e:
        try:
            conn_out.send_bytes(_dumps((ERROR, None, error_kind(e), str(e), traceback.format_exc())))
        except (OSError, ValueError):
            pass
        return
    conn_out.send_bytes(
        _dumps(
            (
                READY,
                dict(
                    config=engine.config,
                    tokenizer=engine.tokenizer,
                    default_sampling=engine.default_sampling,
                    eos_token_ids=engine.eos_token_ids,
                    num_kv_blocks=engine.num_kv_blocks,
                    pid=os.getpid(),
                ),
            )
        )
    )
    core = EngineCore(engine, conn_in, conn_out, log_stats)
    started = time.monotonic()
    core.run()
    logger.debug("engine core stopped after %.1f s", time.monotonic() - started)
