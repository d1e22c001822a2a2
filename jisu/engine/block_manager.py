"""Paged KV cache bookkeeping: one pool of fixed-size pages, block tables, prefix caching, and
sliding-window groups.

The model's layers are split into KV groups of equal size (`ModelConfig.kv_groups`); a page
holds `block_size` tokens of K/V for the layers of one group, and each sequence has one block
table per group. A group of sliding-window layers only ever reads the last `window` keys, so
its pages behind the window go back to the pool as the sequence advances (entry NO_BLOCK in
the table). Llama-style models have a single group of all layers.

Prefix caching: a block that fills up is registered under a hash of its tokens and of every
token before it (the previous block's hash chains in), per group. A new sequence whose prompt
starts with the same tokens takes those pages instead of computing them again. Pages nobody
references stay cached until the pool needs them; the least recently freed goes first.

Placement: decode attention reads every sequence's keys and values page by page, and how the
pages lie in memory sets its speed (32 sequences of 430 keys, Gemma's 18 layers: 12.0-12.4 ms
with each group's pages six apart or scattered at random, 7.9-8.5 ms with each sequence's
pages following each other or the sequences' pages side by side). So each group's next page
is the one after the page that group took last, when that page is empty, in the same chunk
of CHUNK pages, and the one before still in use; otherwise the first page of the lowest
vacant chunk (all CHUNK pages empty), so the pool is reused from its start and the pages
touched stay within about twice those in use. A lone sequence's pages then
follow each other, and sequences decoding in lockstep (all crossing into a new page the same
step) get theirs side by side, group by group; before, Gemma's six groups took turns, which
left each group's pages six apart. Which pages are evicted is unchanged: only empty pages are
placed this way, and where none is next in line or in a vacant chunk, the pool's eviction
order decides as before.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict

from jisu.engine.sequence import Sequence

NO_BLOCK = -1     # a window group's entry for a block behind the window (its page was freed)
CHUNK = 16        # pages per placement chunk (256 tokens at block_size 16)


class Block:
    __slots__ = ("block_id", "ref_count", "key", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.key: tuple[int, int] | None = None   # (group, prefix hash) while registered as cached
        self.token_ids: tuple[int, ...] = ()      # its tokens, checked on a hit (hashes can collide)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 windows: list[int | None] | None = None):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.windows = windows or [None]              # one entry per KV group
        # the fewest computed tokens at which some window group's first needed block is past 0
        # (_first_needed): after_step frees nothing below it
        self._free_from = min((w - 1 + block_size for w in self.windows if w is not None), default=1 << 62)
        self.blocks = [Block(i) for i in range(num_blocks)]
        # unreferenced pages in eviction order: empty ones first, then cached ones, least
        # recently freed first
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[tuple[int, int], int] = {}   # (group, prefix hash) -> page
        # placement (see the module's docstring): per chunk of CHUNK pages, how many are empty
        # (unreferenced, nothing cached); a heap of chunks that were wholly empty when pushed
        # (checked again when popped)
        self._chunk_size = [min(CHUNK, num_blocks - c) for c in range(0, num_blocks, CHUNK)]
        self._chunk_empty = list(self._chunk_size)
        self._vacant = list(range(len(self._chunk_size)))   # sorted: already a heap
        self._last = [NO_BLOCK] * len(self.windows)         # the page each group took last
        self.num_queried_tokens = 0              # prompt tokens looked up in the prefix cache
        self.num_hit_tokens = 0                  # ... and found there

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def _first_needed(self, group: int, num_computed: int) -> int:
        """Index of the first block a group still reads once `num_computed` tokens are cached:
        the next query, at position num_computed, sees keys from num_computed - window + 1."""
        window = self.windows[group]
        return 0 if window is None else max(0, num_computed - window + 1) // self.block_size

    def pages_for(self, num_tokens: int, chunk: int) -> int:
        """Pages one sequence of num_tokens tokens needs at most (prefilled `chunk` at a time)."""
        n = -(-num_tokens // self.block_size)
        return sum(n if w is None else min(n, -(-(w + chunk) // self.block_size) + 1) for w in self.windows)

    def _init_tables(self, seq: Sequence) -> None:
        if not seq.block_tables:
            seq.block_tables = [[] for _ in self.windows]

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra pages `seq` needs to hold `num_tokens` tokens."""
        n = -(-num_tokens // self.block_size)
        if not seq.block_tables:
            return len(self.windows) * n
        # every group's table has the same length: they grow together (allocate, match_prefix)
        # and a window group keeps NO_BLOCK where it freed a page
        return len(seq.block_tables) * max(0, n - len(seq.block_tables[0]))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free_blocks

    def _hash(self, prev: int | None, tokens: tuple[int, ...]) -> int:
        return hash((prev, tokens))

    def _lookup(self, group: int, h: int, tokens: tuple[int, ...]) -> int | None:
        block_id = self.cached.get((group, h))
        if block_id is None or self.blocks[block_id].token_ids != tokens:
            return None
        return block_id

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_blocks[block_id]
        block.ref_count += 1

    def match_prefix(self, seq: Sequence) -> int:
        """Gives a sequence that holds no pages the cached pages its tokens start with, and
        marks their tokens computed. Returns the number of tokens reused.

        Only blocks wholly before the last token count: that token is always computed, since
        its logits are what the step is for. A window group needs only the blocks its next
        query can see, so a hit is the longest prefix whose full-attention blocks are all
        cached and whose window groups have their last blocks cached."""
        assert not any(seq.block_tables), "match_prefix: the sequence already holds pages"
        self._init_tables(seq)
        if not self.enable_prefix_caching:
            return 0
        bs, h, hashes, found = self.block_size, None, [], []
        full = [g for g, w in enumerate(self.windows) if w is None]
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = self._hash(h, tokens)
            ids = [self._lookup(g, h, tokens) for g in range(len(self.windows))]
            if any(ids[g] is None for g in full):
                break
            hashes.append(h)
            found.append(ids)
        k = len(found)                               # longest run the full groups allow
        while k > 0 and any(found[i][g] is None for g, w in enumerate(self.windows) if w is not None
                            for i in range(self._first_needed(g, k * bs), k)):
            k -= 1
        for g in range(len(self.windows)):
            first = self._first_needed(g, k * bs)
            for i in range(k):
                if i < first:
                    seq.block_tables[g].append(NO_BLOCK)
                else:
                    self._take(found[i][g])
                    seq.block_tables[g].append(found[i][g])
        seq.block_hashes = hashes[:k]
        seq.num_computed_tokens = k * bs
        return seq.num_computed_tokens

    def record_admission(self, seq: Sequence) -> None:
        """Prefix-cache statistics, once per request's first admission, over its prompt."""
        if seq.num_output_tokens == 0:
            self.num_queried_tokens += seq.num_prompt_tokens
            self.num_hit_tokens += min(seq.num_computed_tokens, seq.num_prompt_tokens)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        n = self.blocks_needed(seq, num_tokens)
        if n > self.num_free_blocks:
            raise RuntimeError(f"KV cache out of blocks: need {n}, have {self.num_free_blocks}")
        self._init_tables(seq)
        want = -(-num_tokens // self.block_size)
        for g, table in enumerate(seq.block_tables):
            while len(table) < want:
                self._last[g] = self._claim(self._place(self._last[g]))
                table.append(self._last[g])

    def _is_empty(self, block_id: int) -> bool:
        block = self.blocks[block_id]
        return block.ref_count == 0 and block.key is None

    def _is_vacant(self, chunk: int) -> bool:
        return self._chunk_empty[chunk] == self._chunk_size[chunk]

    def _place(self, last: int) -> int:
        """The page for a group that took page `last` before: the next one if it is empty, in
        the same chunk, and `last` is still in use; else the first page of the lowest vacant
        chunk; else the first in eviction order. A run ends at its chunk's end and where its
        page was released: growing on past either walks into untouched memory while released
        pages lie ready below (the pool is mapped lazily: SmolLM2's `jisu bench` RSS +55 MB with
        one request after another; with staggered requests the first version's runs marched
        through the whole pool)."""
        if (last != NO_BLOCK and self.blocks[last].ref_count > 0 and (last + 1) % CHUNK
                and last + 1 < self.num_blocks and self._is_empty(last + 1)):
            return last + 1
        while self._vacant:
            c = heapq.heappop(self._vacant)
            if self._is_vacant(c):
                return c * CHUNK
        return next(iter(self.free_blocks))

    def _claim(self, block_id: int) -> int:
        """Takes unreferenced page block_id for a table, evicting what it cached."""
        del self.free_blocks[block_id]
        block = self.blocks[block_id]
        if block.key is not None:           # evict its cached content
            if self.cached.get(block.key) == block_id:
                del self.cached[block.key]
            block.key, block.token_ids = None, ()
        else:
            self._chunk_empty[block_id // CHUNK] -= 1
        block.ref_count = 1
        return block_id

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_blocks[block_id] = None
            if block.key is None:                # nothing worth keeping: reuse it first
                self.free_blocks.move_to_end(block_id, last=False)
                c = block_id // CHUNK
                self._chunk_empty[c] += 1
                if self._is_vacant(c):
                    heapq.heappush(self._vacant, c)
                    if len(self._vacant) > 4 * len(self._chunk_size):   # stale entries: rebuild
                        self._vacant = [i for i in range(len(self._chunk_size)) if self._is_vacant(i)]

    def after_step(self, seq: Sequence) -> None:
        """Registers the sequence's newly full blocks for prefix caching, then frees the pages
        its window groups can no longer see."""
        bs = self.block_size
        if self.enable_prefix_caching:
            for i in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
                tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
                h = self._hash(seq.block_hashes[-1] if seq.block_hashes else None, tokens)
                seq.block_hashes.append(h)
                for g, table in enumerate(seq.block_tables):
                    if table[i] != NO_BLOCK and (g, h) not in self.cached:   # an identical page may be cached
                        block = self.blocks[table[i]]
                        block.key, block.token_ids = (g, h), tokens
                        self.cached[(g, h)] = block.block_id
        if seq.num_computed_tokens < self._free_from:
            return                               # no window group frees a page yet
        for g, table in enumerate(seq.block_tables):
            if self.windows[g] is None:
                continue
            # freed blocks are always a prefix of the table: walk back from the window's edge
            # to the last block freed before, so a step costs what it frees, not the length
            for i in reversed(range(self._first_needed(g, seq.num_computed_tokens))):
                if table[i] == NO_BLOCK:
                    break
                self._release(table[i])
                table[i] = NO_BLOCK

    def free(self, seq: Sequence) -> None:
        # the tail goes first, across all groups: a cached page is only useful while the pages
        # before it are, so block i of every group must outlive block i+1 of any group
        for i in reversed(range(max((len(t) for t in seq.block_tables), default=0))):
            for table in seq.block_tables:
                if i < len(table) and table[i] != NO_BLOCK:
                    self._release(table[i])
        seq.block_tables = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0
