"""KV-cache block manager: block ids, reference counts and the prefix-cache hash table. No tensors.

A sequence's `block_table` lists the physical blocks holding its K/V, `block_size` tokens each.
Prefix caching: a block full of computed tokens gets a hash chaining the previous block's hash and its
own token ids, so equal hashes mean equal prefixes. A block whose last reference is dropped keeps its
hash and stays a cache-hit candidate until it is reused for new tokens (least recently freed first).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from collections.abc import Sequence as SequenceOf

from hopperllm.engine.sequence import Sequence

_NO_HASH = -1  # the "previous hash" of a sequence's first block


def compute_block_hash(prev_hash: int, token_ids: SequenceOf[int]) -> int:
    """Chained hash of a full block: deterministic within a process (ints hash to themselves)."""
    return hash((prev_hash, tuple(token_ids)))


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()  # kept to reject hash collisions

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_count}, hash={self.hash})"


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, least recently freed first. An OrderedDict so that a cache hit can
        # pull a block out of the middle in O(1).
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block_id: dict[int, int] = {}
        self.prefix_cache_queries = 0  # tokens looked up at admission
        self.prefix_cache_hits = 0  # of those, tokens found in the cache

    # -- sizes ------------------------------------------------------------------------------------
    @property
    def num_total_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks with no reference, cached or not."""
        return len(self.free_block_ids)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_total_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache ---------------------------------------------------------------------------
    def get_computed_blocks(self, seq: Sequence) -> tuple[list[int], int]:
        """Longest chain of cached full blocks matching the start of `seq.token_ids`.

        Returns (block_ids, num_computed_tokens) and changes nothing. At least one token is always
        left to compute, so that the step that follows produces logits to sample from.
        """
        if not self.enable_prefix_caching or seq.block_table:
            return [], 0
        if seq.sampling_params is not None and seq.sampling_params.prompt_logprobs is not None:
            return [], 0  # its prompt logprobs need every prompt position computed (vLLM does the same)
        bs = self.block_size
        block_ids: list[int] = []
        prev_hash = _NO_HASH
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            prev_hash = compute_block_hash(prev_hash, tokens)
            block_id = self.hash_to_block_id.get(prev_hash)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            block_ids.append(block_id)
        return block_ids, len(block_ids) * bs

    def record_prefix_lookup(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_cache_queries += num_queried_tokens
        self.prefix_cache_hits += num_hit_tokens

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Hash every block of `seq` that is now full of computed tokens and has no hash yet."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        prev_hash = seq.block_hashes[-1] if seq.block_hashes else _NO_HASH
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            prev_hash = compute_block_hash(prev_hash, tokens)
            block = self.blocks[seq.block_table[i]]
            block.hash, block.token_ids = prev_hash, tokens
            seq.block_hashes.append(prev_hash)
            # Another block with the same content may already be registered: keep it (no dedup).
            self.hash_to_block_id.setdefault(prev_hash, block.block_id)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (free blocks become plain free blocks) and the hit statistics."""
        self.hash_to_block_id.clear()
        for block_id in self.free_block_ids:
            self.blocks[block_id].hash, self.blocks[block_id].token_ids = None, ()
        self.prefix_cache_queries = self.prefix_cache_hits = 0

    # -- allocation -----------------------------------------------------------------------------
    def allocate_slots(
        self, seq: Sequence, num_new_tokens: int, computed_blocks: list[int] | None = None
    ) -> bool:
        """Give `seq` blocks for `seq.num_computed_tokens + num_new_tokens` tokens.

        `computed_blocks` (from `get_computed_blocks`, called just before, for a seq with no blocks)
        are attached first. Returns False, changing nothing, if the free pool is too small.
        """
        computed_blocks = computed_blocks or []
        assert not computed_blocks or not seq.block_table, "computed blocks go to a seq without blocks"
        num_needed = self.num_blocks_for(seq.num_computed_tokens + num_new_tokens)
        num_fresh = max(0, num_needed - len(seq.block_table) - len(computed_blocks))
        num_revived = sum(1 for b in computed_blocks if self.blocks[b].ref_count == 0)
        if num_fresh + num_revived > self.num_free_blocks:
            return False
        for block_id in computed_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            assert block.hash is not None
            seq.block_hashes.append(block.hash)
        for _ in range(num_fresh):
            seq.block_table.append(self._take_free_block())
        return True

    def _take_free_block(self) -> int:
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block_id.get(block.hash) == block_id:
            del self.hash_to_block_id[block.hash]
        block.ref_count, block.hash, block.token_ids = 1, None, ()
        return block_id

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references, tail first so that a sequence's tail is evicted before its prefix."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count > 0:
                continue
            if block.hash is not None and self.hash_to_block_id.get(block.hash) == block_id:
                self.free_block_ids[block_id] = None  # a cache-hit candidate: most recently used end
            else:
                # Holds nothing findable: reuse it before evicting any cached block.
                block.hash, block.token_ids = None, ()
                self.free_block_ids[block_id] = None
                self.free_block_ids.move_to_end(block_id, last=False)
        seq.block_table.clear()
        seq.block_hashes.clear()

    # -- testing --------------------------------------------------------------------------------
    def check_invariants(self, live_seqs: Iterable[Sequence]) -> None:
        """Raise AssertionError unless the block state agrees with the tables of `live_seqs`."""
        refs = [0] * self.num_total_blocks
        for seq in live_seqs:
            if len(set(seq.block_table)) != len(seq.block_table):
                raise AssertionError(f"{seq} holds a block twice: {seq.block_table}")
            if len(seq.block_hashes) > len(seq.block_table):
                raise AssertionError(f"{seq} has more hashes than blocks")
            for block_id, h in zip(seq.block_table, seq.block_hashes, strict=False):
                if self.blocks[block_id].hash != h:
                    raise AssertionError(f"{seq}: block {block_id} hash differs from the seq's")
            for block_id in seq.block_table:
                refs[block_id] += 1
        for block, ref in zip(self.blocks, refs, strict=True):
            if block.ref_count != ref:
                raise AssertionError(f"{block}: ref_count {block.ref_count}, held by {ref} sequences")
            if (block.ref_count == 0) != (block.block_id in self.free_block_ids):
                raise AssertionError(f"{block}: free queue membership disagrees with ref_count")
            if block.ref_count == 0 and block.hash is not None:
                if self.hash_to_block_id.get(block.hash) != block.block_id:
                    raise AssertionError(f"{block}: free block keeps a hash nobody can find")
        for h, block_id in self.hash_to_block_id.items():
            if self.blocks[block_id].hash != h:
                raise AssertionError(f"hash map entry {h} -> {block_id} points to {self.blocks[block_id]}")
