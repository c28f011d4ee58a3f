"""Unit tests of the KV block manager: allocation, reference counts, prefix cache, LRU eviction."""

from __future__ import annotations

import pytest

from hopperllm.engine.block_manager import BlockManager
from hopperllm.engine.sequence import Sequence
from hopperllm.sampling_params import SamplingParams

BS = 4


def make_seq(seq_id: str, tokens: list[int]) -> Sequence:
    return Sequence(seq_id, tokens, SamplingParams())


def admit(bm: BlockManager, seq: Sequence) -> int:
    """What the scheduler does for a waiting seq: prefix lookup, allocate, run the whole prompt."""
    blocks, num_computed = bm.get_computed_blocks(seq)
    seq.num_computed_tokens = num_computed
    assert bm.allocate_slots(seq, seq.num_tokens - num_computed, blocks)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)
    return num_computed


def test_allocate_and_free_restore_the_free_pool():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a, b = make_seq("a", list(range(10))), make_seq("b", list(range(100, 105)))
    admit(bm, a)
    admit(bm, b)
    assert len(a.block_table) == 3 and len(b.block_table) == 2
    assert bm.num_free_blocks == 3
    assert bm.usage == pytest.approx(5 / 8)
    bm.check_invariants([a, b])
    bm.free(a)
    bm.free(b)
    assert a.block_table == [] and a.block_hashes == []
    assert bm.num_free_blocks == bm.num_total_blocks == 8
    assert bm.usage == 0.0
    bm.check_invariants([])


def test_only_full_computed_blocks_are_hashed():
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = make_seq("a", list(range(10)))
    assert bm.allocate_slots(seq, 6)
    seq.num_computed_tokens = 6
    bm.cache_full_blocks(seq)
    assert len(seq.block_hashes) == 1  # tokens 4, 5 of block 1 are computed, 6, 7 are not
    assert bm.allocate_slots(seq, 4)
    seq.num_computed_tokens = 10
    bm.cache_full_blocks(seq)
    assert len(seq.block_hashes) == 2  # block 2 holds 2 of 4 tokens
    bm.check_invariants([seq])


def test_shared_prefix_hits_and_shares_blocks():
    bm = BlockManager(num_blocks=16, block_size=BS)
    prefix = list(range(8))
    a = make_seq("a", prefix + [50, 51, 52])
    b = make_seq("b", prefix + [60, 61, 62, 63, 64])
    admit(bm, a)
    assert admit(bm, b) == 8
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    for block_id in a.block_table[:2]:
        assert bm.blocks[block_id].ref_count == 2
    assert b.block_hashes[:2] == a.block_hashes[:2]
    bm.check_invariants([a, b])
    bm.free(a)
    assert all(bm.blocks[i].ref_count == 1 for i in b.block_table)
    bm.free(b)
    assert bm.num_free_blocks == 16
    bm.check_invariants([])


def test_different_prefix_same_block_content_misses():
    # The hash chains the previous block, so an equal second block after a different first one misses.
    bm = BlockManager(num_blocks=16, block_size=BS)
    admit(bm, make_seq("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    blocks, n = bm.get_computed_blocks(make_seq("b", [0, 2, 3, 4, 5, 6, 7, 8, 9]))
    assert (blocks, n) == ([], 0)


def test_never_all_tokens_computed():
    bm = BlockManager(num_blocks=16, block_size=BS)
    tokens = list(range(12))  # exactly three full blocks
    admit(bm, make_seq("a", tokens))
    blocks, n = bm.get_computed_blocks(make_seq("b", tokens))
    assert len(blocks) == 2 and n == 8
    blocks, n = bm.get_computed_blocks(make_seq("c", tokens + [99]))
    assert len(blocks) == 3 and n == 12
    blocks, n = bm.get_computed_blocks(make_seq("d", tokens[:4]))
    assert (blocks, n) == ([], 0)


def test_get_computed_blocks_changes_nothing():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq("a", list(range(9)))
    admit(bm, a)
    bm.free(a)
    free_before = list(bm.free_block_ids)
    b = make_seq("b", list(range(9)))
    blocks, n = bm.get_computed_blocks(b)
    assert n == 8 and b.block_table == [] and b.num_computed_tokens == 0
    assert list(bm.free_block_ids) == free_before


def test_hit_on_freed_but_cached_block():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq("a", list(range(9)))
    admit(bm, a)
    table = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 4
    b = make_seq("b", list(range(8)) + [77, 78])
    assert admit(bm, b) == 8
    assert b.block_table[:2] == table[:2]
    assert all(bm.blocks[i].ref_count == 1 for i in b.block_table)
    assert bm.num_free_blocks == 1
    bm.check_invariants([b])


def test_lru_evicts_least_recently_freed_cached_block_first():
    bm = BlockManager(num_blocks=6, block_size=BS)
    a = make_seq("a", list(range(8)) + [8])
    b = make_seq("b", list(range(100, 108)) + [108])
    admit(bm, a)
    admit(bm, b)
    a_blocks, b_blocks = list(a.block_table), list(b.block_table)
    bm.free(a)
    bm.free(b)
    order = list(bm.free_block_ids)
    # Unhashed partial blocks first (most recently freed in front), then a's tail, a's head, b's tail, b's head.
    assert order == [b_blocks[2], a_blocks[2], a_blocks[1], a_blocks[0], b_blocks[1], b_blocks[0]]
    # A new 3-block sequence takes the two partial blocks and evicts a's tail block.
    c = make_seq("c", list(range(200, 210)))
    assert bm.allocate_slots(c, 10)
    assert c.block_table == [b_blocks[2], a_blocks[2], a_blocks[1]]
    bm.check_invariants([c])
    # a's first block still hits, its second does not (evicted); b's prefix is intact.
    assert bm.get_computed_blocks(make_seq("a2", list(range(8)) + [8])) == ([a_blocks[0]], 4)
    assert bm.get_computed_blocks(make_seq("b2", list(range(100, 108)) + [108])) == (b_blocks[:2], 8)


def test_allocate_failure_changes_nothing():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq("a", list(range(9)))
    admit(bm, a)
    bm.free(a)  # three cached-or-free blocks, hashes kept for the two full ones
    held = make_seq("held", [500])
    assert bm.allocate_slots(held, 1)
    state = (list(bm.free_block_ids), dict(bm.hash_to_block_id), [b.ref_count for b in bm.blocks])
    # Hitting two cached free blocks + needing two fresh ones = 4 > 3 free.
    b = make_seq("b", list(range(8)) + list(range(50, 58)))
    blocks, n = bm.get_computed_blocks(b)
    assert n == 8
    b.num_computed_tokens = n
    assert not bm.allocate_slots(b, b.num_tokens - n, blocks)
    assert b.block_table == [] and b.block_hashes == []
    assert state == (list(bm.free_block_ids), dict(bm.hash_to_block_id), [b.ref_count for b in bm.blocks])
    # Growing a running seq past the pool fails the same way.
    assert not bm.allocate_slots(held, 20)
    assert len(held.block_table) == 1
    bm.check_invariants([held])


def test_hit_on_used_block_does_not_consume_free_blocks():
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = make_seq("a", list(range(8)) + [8])
    admit(bm, a)
    assert bm.num_free_blocks == 0
    b = make_seq("b", list(range(8)) + [9])
    blocks, n = bm.get_computed_blocks(b)
    assert n == 8
    b.num_computed_tokens = n
    assert not bm.allocate_slots(b, 1, blocks)  # needs one fresh block, none free
    bm.free(a)
    # a's partial block went to the front; b takes it as its fresh block and revives the two cached ones.
    assert bm.allocate_slots(b, 1, blocks)
    assert bm.num_free_blocks == 0
    bm.check_invariants([b])


def test_duplicate_content_keeps_first_map_entry():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq("a", list(range(5)))
    b = make_seq("b", list(range(5)))
    # Both admitted in the same step: b cannot hit a's blocks, which are not computed yet.
    for seq in (a, b):
        assert bm.allocate_slots(seq, 5)
    for seq in (a, b):
        seq.num_computed_tokens = 5
        bm.cache_full_blocks(seq)
    h = a.block_hashes[0]
    assert b.block_hashes[0] == h
    assert bm.hash_to_block_id[h] == a.block_table[0]
    bm.check_invariants([a, b])
    b_first = b.block_table[0]
    bm.free(b)  # b's duplicate block cannot be found by hash: it is a plain free block again
    assert bm.blocks[b_first].hash is None
    assert list(bm.free_block_ids)[0] == b_first
    bm.check_invariants([a])
    bm.free(a)
    bm.check_invariants([])


def test_prefix_caching_disabled():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    a = make_seq("a", list(range(9)))
    admit(bm, a)
    assert a.block_hashes == [] and bm.hash_to_block_id == {}
    assert bm.get_computed_blocks(make_seq("b", list(range(9)))) == ([], 0)
    bm.free(a)
    assert bm.num_free_blocks == 8
    bm.check_invariants([])


def test_reset_prefix_cache():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq("a", list(range(9)))
    admit(bm, a)
    bm.record_prefix_lookup(9, 0)
    b = make_seq("b", list(range(100, 109)))
    admit(bm, b)
    bm.free(a)
    bm.reset_prefix_cache()
    assert bm.hash_to_block_id == {} and bm.prefix_cache_queries == 0
    assert bm.get_computed_blocks(make_seq("c", list(range(9)))) == ([], 0)
    bm.check_invariants([b])
    bm.free(b)  # b's blocks kept their hashes while in use but nobody can find them now
    assert all(blk.hash is None for blk in bm.blocks)
    bm.check_invariants([])


def test_check_invariants_detects_a_leak():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq("a", list(range(5)))
    admit(bm, a)
    with pytest.raises(AssertionError):
        bm.check_invariants([])  # a's blocks are referenced by nobody we know


def test_hash_collision_is_a_miss(monkeypatch):
    monkeypatch.setattr("hopperllm.engine.block_manager.compute_block_hash", lambda prev_hash, tokens: 7)
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq("a", list(range(9)))
    admit(bm, a)
    assert a.block_hashes == [7, 7] and bm.hash_to_block_id == {7: a.block_table[0]}
    assert bm.get_computed_blocks(make_seq("b", list(range(100, 109)))) == ([], 0)
    assert bm.get_computed_blocks(make_seq("c", list(range(4)) + [50] * 5)) == ([a.block_table[0]], 4)
    bm.check_invariants([a])
