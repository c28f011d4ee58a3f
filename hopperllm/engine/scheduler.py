"""Continuous-batching scheduler, vLLM v1 style: one token budget per step, no prefill/decode phases.

Each step gives every running sequence (oldest first) `min(uncomputed tokens, budget left)` new tokens
-- a decode is 1, a prompt is split into chunks -- then admits waiting sequences first come, first
served. When the KV cache runs out, the newest running sequence is preempted: its blocks are freed and
it is recomputed later (its prefix may still hit the cache). Pure Python: no tensors.

With the "priority" policy (vLLM's `--scheduling-policy priority`), waiting sequences are admitted by
(priority, arrival time), lower first, preempted ones included, and a full cache preempts the running
sequence that comes last in that order, even one the step has already scheduled (its tokens go back
to the budget).
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hopperllm.engine.block_manager import BlockManager
from hopperllm.engine.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from hopperllm.config import CacheConfig, SchedulerConfig


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # computes token_ids[num_computed_tokens : num_computed_tokens + num_new_tokens]
    sample: bool = False  # the step reaches the end of token_ids: sample the next token from its logits
    # speculative decoding: the last num_drafts scheduled tokens are drafts; the step samples at each of
    # the num_drafts + 1 last positions (hopperllm.engine.speculative)
    num_drafts: int = 0


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)  # batch order
    num_batched_tokens: int = 0
    preempted: list[Sequence] = field(default_factory=list)  # moved back to waiting this step
    finished: list[Sequence] = field(default_factory=list)  # finished by the scheduler (cannot fit)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def sampled_seqs(self) -> list[Sequence]:
        return [s.seq for s in self.scheduled if s.sample]


class WaitingQueue:
    """Sequences waiting to be admitted. fcfs: arrival order, a preempted sequence back at the front;
    priority: sorted by (priority, arrival time), a preempted one back in its place, equals in the order added."""

    def __init__(self, policy: str = "fcfs"):
        self.by_priority = policy == "priority"
        self._fifo: deque[Sequence] = deque()
        self._sorted: list[Sequence] = []

    @staticmethod
    def _key(seq: Sequence) -> tuple[int, float]:
        return (seq.priority, seq.arrival_time)

    def append(self, seq: Sequence) -> None:
        if self.by_priority:
            bisect.insort_right(self._sorted, seq, key=self._key)
        else:
            self._fifo.append(seq)

    def prepend(self, seq: Sequence) -> None:
        """A preempted sequence."""
        if self.by_priority:
            self.append(seq)
        else:
            self._fifo.appendleft(seq)

    def peek(self) -> Sequence:
        return self._sorted[0] if self.by_priority else self._fifo[0]

    def popleft(self) -> Sequence:
        return self._sorted.pop(0) if self.by_priority else self._fifo.popleft()

    def remove(self, seq: Sequence) -> None:
        if not self.by_priority:
            self._fifo.remove(seq)
            return
        key = self._key(seq)
        lo = bisect.bisect_left(self._sorted, key, key=self._key)
        hi = bisect.bisect_right(self._sorted, key, key=self._key)
        i = next((i for i in range(lo, hi) if self._sorted[i] is seq), None)
        if i is None:
            raise ValueError(f"sequence {seq.seq_id!r} is not waiting")
        del self._sorted[i]

    def __len__(self) -> int:
        return len(self._sorted) if self.by_priority else len(self._fifo)

    def __iter__(self) -> Iterator[Sequence]:
        return iter(self._sorted) if self.by_priority else iter(self._fifo)


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig, num_kv_blocks: int):
        self.config = scheduler_config
        self.max_num_seqs = scheduler_config.max_num_seqs
        self.max_num_batched_tokens = scheduler_config.max_num_batched_tokens
        self.enable_chunked_prefill = scheduler_config.enable_chunked_prefill
        self.block_manager = BlockManager(
            num_kv_blocks, cache_config.block_size, cache_config.enable_prefix_caching
        )
        self.by_priority = scheduler_config.policy == "priority"
        self.waiting = WaitingQueue(scheduler_config.policy)
        self.running: list[Sequence] = []  # oldest admission first
        self.num_preemptions = 0
        self._unfinished: dict[str, Sequence] = {}

    # -- queue management ---------------------------------------------------------------------
    def add_seq(self, seq: Sequence) -> None:
        if seq.seq_id in self._unfinished:
            raise ValueError(f"sequence id {seq.seq_id!r} is already scheduled: ids must be unique")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self._unfinished[seq.seq_id] = seq

    def abort_seqs(self, seq_ids: Iterable[str]) -> list[Sequence]:
        """Finish the given unfinished sequences as aborted; unknown or finished ids are ignored."""
        aborted = []
        for seq_id in seq_ids:
            seq = self._unfinished.get(seq_id)
            if seq is not None:
                self.finish_seq(seq, SequenceStatus.FINISHED_ABORTED)
                aborted.append(seq)
        return aborted

    def finish_seq(self, seq: Sequence, status: SequenceStatus) -> None:
        assert status.is_finished, status
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = status
        self.block_manager.free(seq)
        self._unfinished.pop(seq.seq_id, None)

    def has_unfinished_seqs(self) -> bool:
        return bool(self._unfinished)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # -- the step -----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        # 1. Running sequences, oldest first; preempt the newest (fcfs) or the last by priority when the cache
        # is full.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_uncomputed_tokens, budget)
            if (
                num_new == 0
                or seq.hold
                or (not self.enable_chunked_prefill and num_new < seq.num_uncomputed_tokens)
            ):
                i += 1
                continue
            while not bm.allocate_slots(seq, num_new):
                if len(self.running) == 1:
                    # Alone, it has every block it could ever get: it needs more than the cache holds.
                    self._finish_unfittable(out, seq)
                    break
                victim = self._preemption_victim()
                j = self.running.index(victim)
                if j < i:  # passed earlier in this step: take back the tokens it was given, if any
                    k = next((k for k, s in enumerate(out.scheduled) if s.seq is victim), None)
                    if k is not None:
                        budget += out.scheduled[k].num_new_tokens
                        out.num_batched_tokens -= out.scheduled[k].num_new_tokens
                        del out.scheduled[k]
                    i -= 1
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                self._add_scheduled(out, seq, num_new)
                budget -= num_new
                i += 1

        # 2. Waiting sequences, first come first served, unless this step had to preempt.
        while not out.preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.peek()
            if bm.num_blocks_for(seq.num_tokens) > bm.num_total_blocks:
                self._finish_unfittable(out, seq)
                continue
            computed_blocks, num_computed = bm.get_computed_blocks(seq)
            num_uncomputed = seq.num_tokens - num_computed
            num_new = min(num_uncomputed, budget)
            if not self.enable_chunked_prefill and num_new < num_uncomputed:
                if num_uncomputed > self.max_num_batched_tokens:
                    self._finish_unfittable(out, seq)
                    continue
                break
            seq.num_computed_tokens = num_computed
            if not bm.allocate_slots(seq, num_new, computed_blocks):
                seq.num_computed_tokens = 0
                if not self.running:  # every block is free and still too few
                    self._finish_unfittable(out, seq)
                    continue
                break
            self.waiting.popleft()
            bm.record_prefix_lookup(seq.num_tokens, num_computed)
            seq.num_cached_tokens = num_computed
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            self._add_scheduled(out, seq, num_new)
            budget -= num_new
        return out

    def _add_scheduled(self, out: SchedulerOutput, seq: Sequence, num_new: int) -> None:
        sample = seq.num_computed_tokens + num_new == seq.num_tokens
        out.scheduled.append(ScheduledSeq(seq, num_new, sample))
        out.num_batched_tokens += num_new

    def _preemption_victim(self) -> Sequence:
        if self.by_priority:  # the last in (priority, arrival) order; the newest admitted among equals
            return max(reversed(self.running), key=lambda s: (s.priority, s.arrival_time))
        return self.running[-1]

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.draft_computed = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.prepend(seq)

    def _finish_unfittable(self, out: SchedulerOutput, seq: Sequence) -> None:
        self.finish_seq(seq, SequenceStatus.FINISHED_LENGTH)
        out.finished.append(seq)

    def update_after_step(self, out: SchedulerOutput) -> list[Sequence]:
        """Record that the model computed the scheduled tokens; returns the sequences to sample for.

        Sequences finished while the step ran (aborted) are skipped.
        """
        sampled = []
        for s in out.scheduled:
            seq = s.seq
            if seq.is_finished:
                continue
            seq.num_computed_tokens += s.num_new_tokens
            self.block_manager.cache_full_blocks(seq)
            if s.sample:
                sampled.append(seq)
        return sampled

    def get_stats(self) -> dict[str, Any]:
        return {
            "num_running": self.num_running,
            "num_waiting": self.num_waiting,
            "kv_cache_usage": self.block_manager.usage,
            "prefix_cache_hit_rate": self.block_manager.prefix_cache_hit_rate,
            "num_preemptions": self.num_preemptions,
        }
