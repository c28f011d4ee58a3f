"""Tensor parallelism on one host: one worker process per rank, the engine's process only drives them.

Every rank (rank 0 included) runs in its own spawned process (worker.py), so the driver never sits in a
collective: it waits only on pipes and process sentinels, with a timeout on every wait, and a rank that
dies or fails turns into a RuntimeError naming it within about a second, not a hang.

Each step the driver sends every rank the same message: the sequences' deltas (StepEncoder), which every
rank applies to its mirror and runs through its ModelRunner. The all-reduces inside the row-parallel
layers and the embedding, and the LM head's all-gather, keep the ranks in lockstep; every rank samples
with the same seeded generators, and rank 0's tokens are the answer. The step is launched and read back
separately (launch / collect), so with async scheduling the engine prepares step N+1 while the ranks run
step N, as with one GPU.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import pickle
import signal
import time
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for
from typing import Any

import torch

from hopperllm.config import EngineConfig
from hopperllm.distributed.process_group import create_rendezvous_store
from hopperllm.engine.scheduler import SchedulerOutput
from hopperllm.loader.model_loader import ModelSource
from hopperllm.worker.executor import Executor
from hopperllm.worker.model_runner import ModelRunnerOutput
from hopperllm.worker.worker import StepEncoder, worker_main

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TPStepLaunch:
    """A step sent to the ranks; collect() waits for rank 0's tokens."""

    step_id: int


class MultiprocExecutor(Executor):
    supports_async = True
    start_timeout_s = 3600.0  # each rank loads its shard, profiles memory, captures graphs
    step_timeout_s = 900.0  # a step's first run may compile kernels
    shutdown_timeout_s = 5.0
    death_grace_s = 1.0  # after a rank's error: whether another rank's death caused it

    def __init__(self, config: EngineConfig, src: ModelSource, show_progress: bool = True):
        self.world_size = world = config.parallel_config.tensor_parallel_size
        self.block_size = config.cache_config.block_size
        _check_shardable(config, world)
        self._failure: str | None = None
        self._encoder = StepEncoder()
        self._draft_encoder = StepEncoder()  # the draft model's view of the drafting sequences
        spec = config.speculative_config
        # ids to release from the ranks' draft mirrors, sent with the next propose_drafts (None: no draft model)
        self._drafts_released: list[str] | None = [] if spec is not None and spec.uses_draft_model else None
        self._released: list[str] = []
        self._next_step = 0
        self._deferred: int | None = None  # the latest step sent without report_now, not flushed yet
        self._outputs: dict[int, ModelRunnerOutput] = {}
        self._replies: dict[int, tuple[str, Any]] = {}  # rank -> its latest ("ready"|"rpc", value)

        ctx = mp.get_context("spawn")
        self._store = create_rendezvous_store(self.start_timeout_s)
        src = src.without_readers()  # an open GGUF reader does not pickle: ranks reopen
        self._procs: list[mp.process.BaseProcess] = []
        self._tasks: list[Any] = []
        self._results: list[Connection] = []
        self._finalizer = weakref.finalize(
            self, _stop_workers, self._procs, self._tasks, self._results, self._store, self.shutdown_timeout_s
        )
        for rank in range(world):
            tasks = ctx.Queue()
            tasks.cancel_join_thread()  # never block interpreter exit on a rank that stopped reading
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=worker_main,
                name=f"hopperllm-tp-rank{rank}",
                args=(
                    rank,
                    world,
                    self._store.port,
                    config,
                    src,
                    tasks,
                    writer,
                    show_progress and rank == 0,
                    self.start_timeout_s,
                ),
                daemon=True,
            )
            proc.start()
            writer.close()  # the rank holds the only write end: its death reads as EOF here
            self._procs.append(proc)
            self._tasks.append(tasks)
            self._results.append(reader)
        self._sentinels = {p.sentinel: rank for rank, p in enumerate(self._procs)}
        self._conns = {id(c): rank for rank, c in enumerate(self._results)}
        self.num_kv_blocks = self._await_replies(
            "ready", "starting the tensor-parallel workers", self.start_timeout_s
        )[0]
        logger.info("tensor parallelism over %d processes: %d KV blocks per rank", world, self.num_kv_blocks)

    # -- the Executor interface -----------------------------------------------------------------------------
    def launch(self, sched: SchedulerOutput, eos_ids=(), prev=None, report_now: bool = False) -> TPStepLaunch:
        step_id = self._next_step
        self._next_step += 1
        released, self._released = self._released, []
        prev_step = prev.step_id if isinstance(prev, TPStepLaunch) else None
        deltas = self._encoder.encode(sched)
        self._send(("step", step_id, prev_step, report_now, eos_ids, released, deltas))
        # a rank reports a deferred step when the next message reaches it
        self._deferred = None if report_now else step_id
        return TPStepLaunch(step_id)

    def collect(self, launch: TPStepLaunch) -> ModelRunnerOutput:
        step_id = launch.step_id
        if step_id not in self._outputs and self._deferred == step_id:
            self._send(("flush",))
            self._deferred = None
        self._pump(lambda: step_id in self._outputs, f"running step {step_id}", self.step_timeout_s)
        return self._outputs.pop(step_id)

    def execute_model(self, sched: SchedulerOutput, eos_ids=()) -> ModelRunnerOutput:
        return self.collect(self.launch(sched, eos_ids, report_now=True))

    def release(self, seq_ids) -> None:
        # sent with the next step; never raises (the engine calls it while unwinding from errors too)
        seq_ids = list(seq_ids)
        self._encoder.forget(seq_ids)
        self._released.extend(seq_ids)
        if self._drafts_released is not None:
            self._draft_encoder.forget(seq_ids)
            self._drafts_released.extend(seq_ids)

    def propose_drafts(self, sched: SchedulerOutput) -> list[list[int]]:
        # every rank runs its shard of the draft model; rank 0's drafts (the same on every rank)
        released, self._drafts_released = self._drafts_released, []
        return self.collective_rpc("propose_drafts", self._draft_encoder.encode(sched), released)

    def logits_for_tokens(self, token_ids: list[int]) -> torch.Tensor:
        """Rank 0's full-sequence logits [T, V] (float32, on the CPU) for one prompt (tests, eval)."""
        nb = -(-len(token_ids) // self.block_size)
        if nb > self.num_kv_blocks:  # checked here: a rank's error would end the executor
            raise ValueError(
                f"{len(token_ids)} tokens need {nb} KV blocks; the cache has {self.num_kv_blocks}"
            )
        return self.collective_rpc("logits_for_tokens", list(token_ids))

    def collective_rpc(self, fn: str | Callable, *args, reply_all: bool = False, **kwargs) -> Any:
        """Call a Worker method (by name) or `fn(worker, *args, **kwargs)` on every rank; returns rank 0's
        value, or every rank's with reply_all. A failure on any rank is fatal to the executor."""
        self._replies.clear()
        self._send(("rpc", fn, args, kwargs, reply_all))
        values = self._await_replies(
            "rpc", f"calling {getattr(fn, '__name__', fn)} on the workers", self.step_timeout_s
        )
        return values if reply_all else values[0]

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def shutdown(self) -> None:
        if self._failure is None:
            self._failure = "the tensor-parallel executor is shut down"
        self._finalizer()

    # -- talking to the ranks -------------------------------------------------------------------------------
    def _send(self, msg: tuple) -> None:
        if self._failure is not None:
            raise RuntimeError(self._failure)
        payload = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)  # once, not once per rank
        for q in self._tasks:
            q.put(payload)

    def _await_replies(self, kind: str, what: str, timeout_s: float) -> list[Any]:
        self._pump(lambda: len(self._replies) == self.world_size, what, timeout_s)
        replies = [self._replies[r] for r in range(self.world_size)]
        self._replies.clear()
        if any(k != kind for k, _ in replies):
            self._fail(f"unexpected replies {[k for k, _ in replies]} from the workers while {what}")
        return [v for _, v in replies]

    def _pump(self, done: Callable[[], bool], what: str, timeout_s: float) -> None:
        """Read the ranks' messages until `done()`; raise on a rank's death, error or silence."""
        if self._failure is not None:
            raise RuntimeError(self._failure)
        deadline = time.monotonic() + timeout_s
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail(
                    f"the tensor-parallel workers sent nothing for {timeout_s:.0f} s while {what}: "
                    "a rank hangs (see its log)"
                )
            ready = wait_for(self._results + list(self._sentinels), timeout=min(remaining, 1.0))
            for conn in ready:
                if isinstance(conn, Connection):
                    self._drain(self._conns[id(conn)], what)
            dead = sorted(self._sentinels[s] for s in ready if s in self._sentinels)
            if dead:
                self._drain(dead[0], what)  # its last words (an error) say more than its exit code
                self._rank_died(dead[0], what)

    def _drain(self, rank: int, what: str) -> None:
        """Handle every message waiting from `rank` (up to its pipe's end, if it died)."""
        conn = self._results[rank]
        try:
            while conn.poll():
                self._handle(rank, conn.recv(), what)
        except (EOFError, OSError):
            pass

    def _handle(self, rank: int, msg: tuple, what: str) -> None:
        kind = msg[0]
        if kind == "result":
            self._outputs[msg[1]] = msg[2]
        elif kind in ("ready", "rpc"):
            self._replies[rank] = (kind, msg[1])
        elif kind == "error":
            self._worker_failed(rank, msg, what)
        else:
            self._fail(f"unexpected message {kind!r} from tensor-parallel worker rank {rank}")

    def _worker_failed(self, rank: int, error: tuple, what: str) -> None:
        """Raise for the root cause: a rank whose peer failed or died fails too, in its next collective,
        so wait death_grace_s for the others; a rank that died silently, else the earliest error, is it."""
        errors = {rank: error}
        waiting = {p.sentinel: r for r, p in enumerate(self._procs) if r != rank}
        deadline = time.monotonic() + self.death_grace_s
        while waiting and (remaining := deadline - time.monotonic()) > 0:
            for s in wait_for(list(waiting), timeout=remaining):
                peer = waiting.pop(s)
                said = [m for m in self._read_all(peer) if m[0] == "error"]
                if not said:
                    self._rank_died(peer, what)
                errors[peer] = said[0]
        for peer in waiting.values():  # alive (perhaps stuck in a collective): only what they said so far
            errors.update((peer, m) for m in self._read_all(peer) if m[0] == "error")
        first = min(errors, key=lambda r: errors[r][4])
        _, etype, message, tb, _ = errors[first]
        if etype == "ValueError":  # a user error (e.g. the model does not fit): keep its type
            self._fail(message, ValueError)
        self._fail(f"tensor-parallel worker rank {first} failed while {what}: {etype}: {message}\n{tb}")

    def _read_all(self, rank: int) -> list[tuple]:
        msgs = []
        conn = self._results[rank]
        try:
            while conn.poll():
                msgs.append(conn.recv())
        except (EOFError, OSError):
            pass
        return msgs

    def _rank_died(self, rank: int, what: str) -> None:
        proc = self._procs[rank]
        proc.join(0.5)
        code = proc.exitcode
        if code is None:
            how = "its pipe closed"
        elif code < 0:
            how = f"killed by {signal.Signals(-code).name}"
        else:
            how = f"exit code {code}"
        self._fail(f"tensor-parallel worker rank {rank} died ({how}) while {what}; restart the engine")

    def _fail(self, message: str, exc_type: type[Exception] = RuntimeError) -> None:
        self._failure = message
        for p in self._procs:  # the survivors may sit in a collective: no graceful stop
            if p.is_alive():
                p.kill()
        self._finalizer()
        raise exc_type(message)


def _check_shardable(config: EngineConfig, world: int) -> None:
    mc = config.model_config
    for what, n in (
        ("attention heads", mc.num_attention_heads),
        ("key/value heads", mc.num_key_value_heads),
        ("intermediate size", mc.intermediate_size),
    ):
        if n % world:
            raise ValueError(
                f"the model's {what} ({n}) is not divisible by tensor_parallel_size {world}: choose a divisor"
            )
    if config.device == "cuda" and torch.cuda.device_count() < world:
        raise ValueError(
            f"tensor_parallel_size {world} needs {world} GPUs; {torch.cuda.device_count()} are visible"
        )


def _stop_workers(procs, tasks, results, store, timeout_s: float) -> None:
    """Ask every rank to stop, then terminate (and kill) the ones that do not exit in time."""
    stop = pickle.dumps(("shutdown",))
    for q, p in zip(tasks, procs, strict=True):
        if p.is_alive():
            try:
                q.put(stop)
            except (OSError, ValueError):
                pass
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(1.0)
        if p.is_alive():
            p.kill()
            p.join(1.0)
    for q in tasks:
        q.close()
    for c in results:
        c.close()
    # `store`: the rendezvous store, kept alive by the finalizer's arguments until now
