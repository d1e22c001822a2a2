"""Paged KV cache bookkeeping: a pool of fixed-size blocks, one block table per sequence, and
prefix caching.

A block that fills up is registered under a hash of its tokens and of every token before it
(the hash of the previous block chains in). A new sequence whose prompt starts with the same
tokens takes those blocks instead of computing them again. Blocks nobody references stay
cached until the pool needs them; the least recently freed goes first.
"""

from __future__ import annotations

from collections import OrderedDict

from jisu.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None             # set while the block is registered as cached
        self.token_ids: tuple[int, ...] = ()     # its tokens, checked on a hit (hashes can collide)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # unreferenced blocks in eviction order: empty ones first, then cached ones, least
        # recently freed first
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}         # prefix hash -> block id
        self.num_queried_tokens = 0              # prompt tokens looked up in the prefix cache
        self.num_hit_tokens = 0                  # ... and found there

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs to hold `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free_blocks

    def _hash(self, prev: int | None, tokens: tuple[int, ...]) -> int:
        return hash((prev, tokens))

    def match_prefix(self, seq: Sequence) -> int:
        """Gives a sequence that holds no blocks the cached blocks its tokens start with, and
        marks their tokens computed. Returns the number of tokens reused.

        Only blocks wholly before the last token count: that token is always computed, since
        its logits are what the step is for."""
        assert not seq.block_table, "match_prefix: the sequence already holds blocks"
        if not self.enable_prefix_caching:
            return 0
        bs, h = self.block_size, None
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = self._hash(h, tokens)
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_blocks[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
        seq.num_computed_tokens = len(seq.block_table) * bs
        self.num_queried_tokens += seq.num_tokens
        self.num_hit_tokens += seq.num_computed_tokens
        return seq.num_computed_tokens

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        n = self.blocks_needed(seq, num_tokens)
        if n > self.num_free_blocks:
            raise RuntimeError(f"KV cache out of blocks: need {n}, have {self.num_free_blocks}")
        for _ in range(n):
            block_id, _ = self.free_blocks.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None:           # evict its cached content
                if self.cached.get(block.hash) == block_id:
                    del self.cached[block.hash]
                block.hash, block.token_ids = None, ()
            block.ref_count = 1
            seq.block_table.append(block_id)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Registers the sequence's blocks that are full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = self._hash(seq.block_hashes[-1] if seq.block_hashes else None, tokens)
            seq.block_hashes.append(h)
            if h not in self.cached:             # an identical block may already be cached
                block = self.blocks[seq.block_table[i]]
                block.hash, block.token_ids = h, tokens
                self.cached[h] = block.block_id

    def free(self, seq: Sequence) -> None:
        # the tail goes first: a cached block is only useful while the blocks before it are
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_blocks[block_id] = None
                if block.hash is None:           # nothing worth keeping: reuse it first
                    self.free_blocks.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def reset_prefix_cache(self) -> None:
        for block_id in self.free_blocks:
            block = self.blocks[block_id]
            block.hash, block.token_ids = None, ()
        self.cached = {h: b for h, b in self.cached.items() if self.blocks[b].ref_count > 0}

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0
