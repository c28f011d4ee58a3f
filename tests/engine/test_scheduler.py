"""Scheduler tests: unit tests of the policy, and a hypothesis state machine driving scheduler + block
manager with a fake model whose "KV cache" stores token ids, so a wrong block table or a corrupted
prefix-cache block shows up as a wrong token read back."""

from __future__ import annotations

from collections.abc import Callable

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hopperllm.config import CacheConfig, SchedulerConfig
from hopperllm.engine.scheduler import Scheduler, SchedulerOutput
from hopperllm.engine.sequence import Sequence, SequenceStatus
from hopperllm.sampling_params import SamplingParams


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 64,
    enable_chunked_prefill: bool = True,
    enable_prefix_caching: bool = True,
    policy: str = "fcfs",
) -> Scheduler:
    sc = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        enable_chunked_prefill=enable_chunked_prefill,
        policy=policy,
    )
    cc = CacheConfig(block_size=block_size, enable_prefix_caching=enable_prefix_caching)
    return Scheduler(sc, cc, num_blocks)


def make_seq(seq_id: str, tokens: list[int], max_tokens: int = 4, priority: int = 0) -> Sequence:
    return Sequence(seq_id, tokens, SamplingParams(max_tokens=max_tokens), priority=priority)


def order_key(seq: Sequence) -> tuple[int, float]:
    return (seq.priority, seq.arrival_time)


class FakeEngine:
    """Drives a Scheduler as LLMEngine does. The fake model writes each computed token's id into its
    cache slot and checks that every sequence reads its whole context back from its block table."""

    def __init__(self, scheduler: Scheduler, max_model_len: int):
        self.scheduler = scheduler
        self.max_model_len = max_model_len
        bm = scheduler.block_manager
        self.kv: list[list[int | None]] = [[None] * bm.block_size for _ in range(bm.num_total_blocks)]
        self.outputs: list[SchedulerOutput] = []

    def run_model(self, out: SchedulerOutput) -> None:
        bm = self.scheduler.block_manager
        bs = bm.block_size
        for s in out.scheduled:  # K/V of the new tokens are written before attention reads
            seq, start = s.seq, s.seq.num_computed_tokens
            for pos in range(start, start + s.num_new_tokens):
                block_id = seq.block_table[pos // bs]
                assert bm.blocks[block_id].ref_count == 1, f"{seq} writes into shared block {block_id}"
                assert bm.blocks[block_id].hash is None, f"{seq} overwrites cached block {block_id}"
                self.kv[block_id][pos % bs] = seq.token_ids[pos]
        for s in out.scheduled:
            seq = s.seq
            context = [
                self.kv[seq.block_table[p // bs]][p % bs]
                for p in range(seq.num_computed_tokens + s.num_new_tokens)
            ]
            assert context == seq.token_ids[: len(context)], f"{seq} reads a wrong context"

    def step(
        self,
        next_token: Callable[[Sequence], int] = lambda seq: seq.num_tokens % 5,
        should_stop: Callable[[Sequence], bool] = lambda seq: False,
        abort_during_step: Callable[[SchedulerOutput], list[str]] = lambda out: [],
    ) -> SchedulerOutput:
        sched = self.scheduler
        had_work = sched.has_unfinished_seqs()
        running_before = list(sched.running)
        out = sched.schedule()
        check_output(sched, out, running_before)
        if had_work:
            assert out.scheduled or out.finished, "a step with unfinished sequences made no progress"
        self.run_model(out)
        sched.abort_seqs(abort_during_step(out))
        for seq in sched.update_after_step(out):
            assert seq.num_computed_tokens == seq.num_tokens
            seq.append_token(next_token(seq))
            max_tokens = seq.sampling_params.max_tokens
            if seq.num_output_tokens >= max_tokens or seq.num_tokens >= self.max_model_len:
                sched.finish_seq(seq, SequenceStatus.FINISHED_LENGTH)
            elif should_stop(seq):
                sched.finish_seq(seq, SequenceStatus.FINISHED_STOPPED)
        self.outputs.append(out)
        return out

    def run_to_completion(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished_seqs():
                return
            self.step()
        raise AssertionError(f"still unfinished after {max_steps} steps: {self.scheduler.get_stats()}")


def check_output(
    sched: Scheduler, out: SchedulerOutput, running_before: list[Sequence] | None = None
) -> None:
    bs = sched.block_manager.block_size
    assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled)
    assert out.num_batched_tokens <= sched.max_num_batched_tokens
    assert len(sched.running) <= sched.max_num_seqs
    assert len({id(s.seq) for s in out.scheduled}) == len(out.scheduled)
    for s in out.scheduled:
        seq = s.seq
        assert s.num_new_tokens >= 1
        assert seq.status == SequenceStatus.RUNNING and seq in sched.running
        assert seq.num_computed_tokens + s.num_new_tokens <= seq.num_tokens
        assert len(seq.block_table) * bs >= seq.num_computed_tokens + s.num_new_tokens
        assert s.sample == (seq.num_computed_tokens + s.num_new_tokens == seq.num_tokens)
    for seq in out.preempted:
        assert seq.status == SequenceStatus.WAITING and seq in sched.waiting and not seq.block_table
    if out.preempted:
        assert not [s for s in sched.running if s not in (running_before or sched.running)]  # none admitted
        if sched.by_priority:  # the victims came last by (priority, arrival) among the running ones
            assert all(order_key(r) <= order_key(v) for r in sched.running for v in out.preempted)
        elif running_before is not None:  # fcfs: the newest admitted went first
            kept = [s for s in running_before if s in sched.running]
            assert kept == running_before[: len(kept)]
    if sched.by_priority:
        keys = [order_key(s) for s in sched.waiting]
        assert keys == sorted(keys)
    for seq in out.finished:
        assert seq.status == SequenceStatus.FINISHED_LENGTH and not seq.block_table
        assert seq not in sched.running and seq not in sched.waiting


# -- unit tests -----------------------------------------------------------------------------------
def test_chunked_prefill_splits_a_long_prompt():
    sched = make_scheduler(max_num_batched_tokens=8)
    engine = FakeEngine(sched, 64)
    seq = make_seq("a", list(range(20)), max_tokens=2)
    sched.add_seq(seq)
    chunks = []
    for _ in range(3):
        out = engine.step()
        chunks.append([(s.num_new_tokens, s.sample) for s in out.scheduled])
    assert chunks == [[(8, False)], [(8, False)], [(4, True)]]
    assert seq.num_output_tokens == 1 and seq.first_scheduled_time is not None
    out = engine.step()
    assert [(s.num_new_tokens, s.sample) for s in out.scheduled] == [(1, True)]
    assert seq.status == SequenceStatus.FINISHED_LENGTH
    assert not sched.has_unfinished_seqs()
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_total_blocks


def test_decodes_go_first_and_prefill_takes_the_rest_of_the_budget():
    sched = make_scheduler(max_num_batched_tokens=10)
    engine = FakeEngine(sched, 64)
    a = make_seq("a", [1, 2, 3], max_tokens=10)
    sched.add_seq(a)
    engine.step()
    b = make_seq("b", list(range(30)), max_tokens=10)
    sched.add_seq(b)
    out = engine.step()
    assert [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 9)]
    out = engine.step()
    assert [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 9)]


def test_max_num_seqs_is_respected():
    sched = make_scheduler(max_num_seqs=2)
    engine = FakeEngine(sched, 64)
    seqs = [make_seq(f"s{i}", [i, i + 1, i + 2], max_tokens=3) for i in range(5)]
    for seq in seqs:
        sched.add_seq(seq)
    out = engine.step()
    assert [s.seq.seq_id for s in out.scheduled] == ["s0", "s1"]
    assert sched.num_running == 2 and sched.num_waiting == 3
    engine.run_to_completion()
    assert all(o.num_batched_tokens > 0 for o in engine.outputs)
    assert max(len(o.scheduled) for o in engine.outputs) == 2
    assert all(seq.num_output_tokens == 3 for seq in seqs)


def test_non_chunked_admission_waits_for_the_whole_prompt():
    sched = make_scheduler(max_num_batched_tokens=32, max_model_len=32, enable_chunked_prefill=False)
    engine = FakeEngine(sched, 32)
    sched.add_seq(make_seq("a", list(range(20))))
    sched.add_seq(make_seq("b", list(range(100, 120))))
    out = engine.step()  # 20 + 20 > 32 and b may not be split: it waits
    assert [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled] == [("a", 20)]
    out = engine.step()
    assert [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 20)]
    engine.run_to_completion()


def test_preemption_with_few_blocks_and_later_completion():
    # 6 blocks of 4 tokens: three 8-token prompts fit (2 blocks each) but cannot all grow.
    sched = make_scheduler(num_blocks=6, block_size=4)
    engine = FakeEngine(sched, 64)
    seqs = [make_seq(f"s{i}", [10 * i + j for j in range(8)], max_tokens=6) for i in range(3)]
    for seq in seqs:
        sched.add_seq(seq)
    out = engine.step()
    assert len(out.scheduled) == 3
    out = engine.step()  # every seq now needs a third block: the newest is preempted
    assert [s.seq_id for s in out.preempted] == ["s2"]
    assert seqs[2].num_preemptions == 1 and seqs[2].num_computed_tokens == 0
    assert sched.waiting.peek() is seqs[2]
    assert sched.num_preemptions >= 1
    engine.run_to_completion()
    for seq in seqs:
        assert seq.status == SequenceStatus.FINISHED_LENGTH and seq.num_output_tokens == 6
    assert sched.block_manager.num_free_blocks == 6
    assert sched.get_stats()["num_preemptions"] == sched.num_preemptions


def test_preempted_seq_recomputes_its_output_tokens_and_hits_its_cached_prefix():
    sched = make_scheduler(num_blocks=5, block_size=4)
    engine = FakeEngine(sched, 64)
    a = make_seq("a", list(range(8)), max_tokens=3)  # a ends with 3 blocks: b's 2 cached ones survive
    b = make_seq("b", list(range(100, 108)), max_tokens=10)
    sched.add_seq(a)
    sched.add_seq(b)
    engine.step()
    out = engine.step()  # both need a third block, one is free: b, the newest, preempts itself
    assert [s.seq.seq_id for s in out.scheduled] == ["a"] and out.preempted == [b]
    assert b.num_output_tokens == 1
    engine.run_to_completion()
    assert b.num_output_tokens == 10
    assert b.num_cached_tokens > 0  # re-admission found its own blocks still cached
    assert sched.get_stats()["prefix_cache_hit_rate"] > 0


def test_newest_is_preempted_for_the_oldest():
    sched = make_scheduler(num_blocks=3, block_size=4)
    engine = FakeEngine(sched, 64)
    a = make_seq("a", list(range(8)), max_tokens=5)
    b = make_seq("b", [50, 51, 52], max_tokens=5)
    sched.add_seq(a)
    sched.add_seq(b)
    engine.step()  # a: 2 blocks, b: 1 block
    out = engine.step()  # a needs a 3rd block: preempts b
    assert [s.seq_id for s in out.preempted] == ["b"]
    assert [s.seq.seq_id for s in out.scheduled] == ["a"]
    engine.run_to_completion()
    assert a.num_output_tokens == 5 and b.num_output_tokens == 5


def test_seq_larger_than_the_cache_is_finished_not_looped():
    sched = make_scheduler(num_blocks=3, block_size=4)
    engine = FakeEngine(sched, 64)
    too_long = make_seq("long", list(range(20)))  # 5 blocks > 3
    grows = make_seq("grows", list(range(10)), max_tokens=20)  # fits, then outgrows the cache
    sched.add_seq(too_long)
    sched.add_seq(grows)
    out = engine.step()
    assert out.finished == [too_long] and too_long.status == SequenceStatus.FINISHED_LENGTH
    assert too_long.num_output_tokens == 0
    engine.run_to_completion()
    assert grows.status == SequenceStatus.FINISHED_LENGTH
    assert grows.num_tokens == 12 + 1  # 12 tokens of KV fill 3 blocks; the 13th cannot be computed
    assert any(grows in o.finished for o in engine.outputs)
    assert sched.block_manager.num_free_blocks == 3


def test_prefix_hit_on_admission():
    sched = make_scheduler(num_blocks=32, block_size=4)
    engine = FakeEngine(sched, 64)
    prefix = list(range(12))
    a = make_seq("a", prefix + [1], max_tokens=3)
    sched.add_seq(a)
    engine.step()
    b = make_seq("b", prefix + [2, 3], max_tokens=3)
    sched.add_seq(b)
    out = engine.step()
    assert [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 2)]
    assert b.num_cached_tokens == 12 and b.block_table[:3] == a.block_table[:3]
    bm = sched.block_manager
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (13 + 14, 12)
    engine.run_to_completion()
    assert bm.num_free_blocks == 32


def test_abort_frees_blocks_and_ignores_unknown_ids():
    sched = make_scheduler(num_blocks=16, max_num_seqs=1)
    engine = FakeEngine(sched, 64)
    a = make_seq("a", list(range(9)), max_tokens=50)
    b = make_seq("b", list(range(5)), max_tokens=50)
    sched.add_seq(a)
    sched.add_seq(b)
    engine.step()
    assert sched.block_manager.num_free_blocks == 13
    aborted = sched.abort_seqs(["a", "b", "nope"])
    assert aborted == [a, b]
    assert a.status == b.status == SequenceStatus.FINISHED_ABORTED
    assert not sched.has_unfinished_seqs() and sched.num_running == sched.num_waiting == 0
    assert sched.block_manager.num_free_blocks == 16
    assert sched.abort_seqs(["a"]) == []
    sched.block_manager.check_invariants([])


def test_abort_while_the_step_runs():
    sched = make_scheduler()
    engine = FakeEngine(sched, 64)
    a = make_seq("a", list(range(9)), max_tokens=5)
    b = make_seq("b", list(range(5)), max_tokens=5)
    sched.add_seq(a)
    sched.add_seq(b)
    engine.step(abort_during_step=lambda out: ["a"])
    assert a.status == SequenceStatus.FINISHED_ABORTED and a.num_output_tokens == 0
    assert b.num_output_tokens == 1
    engine.run_to_completion()
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_total_blocks


def test_priority_policy_admits_by_priority_then_arrival():
    sched = make_scheduler(max_num_seqs=1, policy="priority")
    engine = FakeEngine(sched, 64)
    seqs = [make_seq(name, [i + 1] * 3, max_tokens=1, priority=p) for i, (name, p) in enumerate(
        [("low", 5), ("high-a", 0), ("mid", 2), ("high-b", 0), ("urgent", -1)])]  # fmt: skip
    for seq in seqs:
        sched.add_seq(seq)
    order = []
    while sched.has_unfinished_seqs():
        out = engine.step()
        order += [s.seq.seq_id for s in out.scheduled if s.seq.seq_id not in order]
    assert order == ["urgent", "high-a", "high-b", "mid", "low"]

    fcfs = make_scheduler(max_num_seqs=1)
    engine = FakeEngine(fcfs, 64)
    for i, name in enumerate(["x", "y", "z"]):
        fcfs.add_seq(make_seq(name, [i + 1] * 3, max_tokens=1))
    order = []
    while fcfs.has_unfinished_seqs():
        order += [s.seq.seq_id for s in engine.step().scheduled if s.seq.seq_id not in order]
    assert order == ["x", "y", "z"]


def test_priority_preemption_takes_the_last_by_priority_even_if_scheduled_this_step():
    # 6 blocks of 4 tokens. The lowest-priority sequence runs first (admitted alone), then two others fill
    # the cache. Its next token fits its last block, so the step schedules it first; the next one needs a
    # block, and the victim is the low-priority one: its scheduled token goes back to the budget.
    sched = make_scheduler(num_blocks=6, block_size=4, policy="priority")
    engine = FakeEngine(sched, 64)
    low = make_seq("low", list(range(6)), max_tokens=8, priority=3)
    sched.add_seq(low)
    engine.step()  # 6 prompt tokens in 2 blocks, a 7th sampled
    a = make_seq("a", list(range(10, 18)), max_tokens=8, priority=0)
    b = make_seq("b", list(range(20, 28)), max_tokens=8, priority=1)
    sched.add_seq(a)
    sched.add_seq(b)
    engine.step()  # low's 7th token fits; a and b take 2 blocks each: all 6 used
    assert sched.block_manager.num_free_blocks == 0 and sched.running == [low, a, b]
    out = engine.step()
    assert out.preempted == [low] and low.status == SequenceStatus.WAITING
    assert [s.seq for s in out.scheduled] == [a, b] and out.num_batched_tokens == 2
    engine.run_to_completion()
    assert low.num_preemptions >= 1 and a.num_preemptions == 0  # the highest priority is never the victim


def test_preempted_sequence_waits_in_priority_order():
    sched = make_scheduler(policy="priority")
    seqs = [make_seq(f"s{p}", [1, 2], priority=p) for p in (4, 1, 3)]
    for seq in seqs:
        sched.add_seq(seq)
    assert [s.seq_id for s in sched.waiting] == ["s1", "s3", "s4"]
    sched.schedule()
    sched._preempt(seqs[1])  # back in its place by priority, not at the front of the queue
    assert [s.seq_id for s in sched.waiting] == ["s1"]
    sched.waiting.remove(seqs[1])
    assert len(sched.waiting) == 0


def test_duplicate_seq_id_is_rejected():
    sched = make_scheduler()
    sched.add_seq(make_seq("a", [1]))
    with pytest.raises(ValueError, match="unique"):
        sched.add_seq(make_seq("a", [2]))


def test_stats():
    sched = make_scheduler(num_blocks=10)
    sched.add_seq(make_seq("a", list(range(8))))
    sched.add_seq(make_seq("b", list(range(8))))
    FakeEngine(sched, 64).step()
    stats = sched.get_stats()
    assert stats["num_running"] == 2 and stats["num_waiting"] == 0
    assert stats["kv_cache_usage"] == pytest.approx(0.4)
    assert stats["prefix_cache_hit_rate"] == 0.0 and stats["num_preemptions"] == 0


# -- state machine --------------------------------------------------------------------------------
MAX_MODEL_LEN = 48
PREFIXES = [[], [1, 2, 3, 0, 1, 2, 3, 0, 1, 2], [1, 2, 3, 0, 3, 3, 3, 3], [2] * 12]


class SchedulerMachine(RuleBasedStateMachine):
    """Random requests, steps and aborts; the block state must stay consistent after every rule."""

    def __init__(self):
        super().__init__()
        self.sched: Scheduler | None = None
        self.engine: FakeEngine | None = None
        self.prompts: list[list[int]] = []

    @initialize(
        cache_tokens=st.integers(8, 64),
        block_size=st.sampled_from([1, 2, 4, 8]),
        max_num_seqs=st.integers(1, 8),
        chunked=st.booleans(),
        budget=st.integers(1, 40),
        prefix_caching=st.booleans(),
        priority_policy=st.booleans(),
    )
    def setup(self, cache_tokens, block_size, max_num_seqs, chunked, budget, prefix_caching, priority_policy):
        num_blocks = max(2, cache_tokens // block_size)  # from "too small for one request" to plenty
        if not chunked:
            budget += MAX_MODEL_LEN
        self.sched = make_scheduler(
            num_blocks=num_blocks,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget,
            max_model_len=MAX_MODEL_LEN,
            enable_chunked_prefill=chunked,
            enable_prefix_caching=prefix_caching,
            policy="priority" if priority_policy else "fcfs",
        )
        self.engine = FakeEngine(self.sched, MAX_MODEL_LEN)

    @rule(
        prefix=st.sampled_from(PREFIXES),
        cut=st.one_of(st.just(12), st.integers(0, 12)),
        suffix=st.lists(st.integers(0, 3), max_size=12),
        max_tokens=st.integers(1, 24),
        priority=st.integers(-2, 2),
    )
    def add_request(self, prefix, cut, suffix, max_tokens, priority):
        self._add((prefix[:cut] + suffix)[: MAX_MODEL_LEN - 1] or [0], max_tokens, priority)

    @precondition(lambda self: self.prompts)
    @rule(
        data=st.data(),
        suffix=st.lists(st.integers(0, 3), max_size=4),
        max_tokens=st.integers(1, 24),
        priority=st.integers(-2, 2),
    )
    def repeat_request(self, data, suffix, max_tokens, priority):
        """An earlier prompt again (its blocks may be cached, used or evicted), maybe extended."""
        prompt = data.draw(st.sampled_from(self.prompts)) + suffix
        self._add(prompt[: MAX_MODEL_LEN - 1], max_tokens, priority)

    def _add(self, prompt: list[int], max_tokens: int, priority: int) -> None:
        priority = priority if self.sched.by_priority else 0
        self.sched.add_seq(make_seq(f"r{len(self.prompts)}", prompt, max_tokens, priority))
        self.prompts.append(prompt)

    @rule(data=st.data())
    def step(self, data):
        def abort_during_step(out: SchedulerOutput) -> list[str]:
            if out.scheduled and data.draw(st.integers(0, 7)) == 0:
                return [data.draw(st.sampled_from(out.scheduled)).seq.seq_id]
            return []

        self.engine.step(
            next_token=lambda seq: data.draw(st.integers(0, 3)),
            should_stop=lambda seq: data.draw(st.integers(0, 19)) == 0,
            abort_during_step=abort_during_step,
        )

    @rule(data=st.data(), num_steps=st.integers(2, 8))
    def steps(self, data, num_steps):
        for _ in range(num_steps):
            self.engine.step(next_token=lambda seq: data.draw(st.integers(0, 3)))

    @precondition(lambda self: self.sched is not None and self.sched.has_unfinished_seqs())
    @rule(data=st.data())
    def abort(self, data):
        live = sorted(s.seq_id for s in [*self.sched.running, *self.sched.waiting])
        seq_id = data.draw(st.sampled_from(live))
        [seq] = self.sched.abort_seqs([seq_id])
        assert seq.status == SequenceStatus.FINISHED_ABORTED and not seq.block_table

    @invariant()
    def consistent(self):
        if self.sched is None:
            return
        sched, bm = self.sched, self.sched.block_manager
        running, waiting = sched.running, list(sched.waiting)
        assert not {id(s) for s in running} & {id(s) for s in waiting}
        assert len({id(s) for s in running}) == len(running) and len({id(s) for s in waiting}) == len(waiting)
        assert sched.has_unfinished_seqs() == bool(running or waiting)
        assert len(running) <= sched.max_num_seqs
        bm.check_invariants(running + waiting)
        num_used = sum(1 for b in bm.blocks if b.ref_count > 0)
        assert bm.num_free_blocks + num_used == bm.num_total_blocks
        for seq in running:
            assert seq.status == SequenceStatus.RUNNING
            assert seq.num_computed_tokens <= seq.num_tokens
            assert len(seq.block_table) * bm.block_size >= seq.num_computed_tokens
        for seq in waiting:
            assert seq.status == SequenceStatus.WAITING
            assert not seq.block_table and seq.num_computed_tokens == 0
        for block in bm.blocks:  # a cached block really holds the tokens its hash stands for
            if block.hash is not None:
                assert tuple(self.engine.kv[block.block_id]) == block.token_ids

    def teardown(self):
        if self.sched is None:
            return
        self.engine.run_to_completion(max_steps=5_000)
        bm = self.sched.block_manager
        assert bm.num_free_blocks == bm.num_total_blocks
        bm.check_invariants([])


SchedulerMachine.TestCase.settings = settings(
    max_examples=50,
    stateful_step_count=40,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSchedulerMachine = SchedulerMachine.TestCase
