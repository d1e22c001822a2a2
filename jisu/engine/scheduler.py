"""Chooses each step's batch under a token budget (continuous batching with chunked prefill).

Every running sequence gets its next token (decode) or its next prompt chunk, oldest first;
what is left of `max_num_batched_tokens` admits waiting sequences, whose prompts may start
with cached blocks. A long prompt is thus prefilled in chunks alongside the running decodes
instead of stalling them. When the cache runs out of blocks the newest running sequence is
preempted: its blocks are freed and it is recomputed later from its tokens.
"""

from __future__ import annotations

from collections import deque

from jisu.config import EngineConfig
from jisu.engine.block_manager import BlockManager
from jisu.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, cfg: EngineConfig, block_manager: BlockManager):
        self.cfg = cfg
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Sequence]:
        """Returns the sequences to run this step, each with `num_scheduled_tokens` set."""
        bm = self.block_manager
        budget = self.cfg.max_num_batched_tokens
        batch: list[Sequence] = []
        preempted = False
        for seq in list(self.running):
            if seq not in self.running:      # preempted below to make room for an older one
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if n <= 0:
                continue
            while not bm.can_allocate(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self.preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq in self.running:
                bm.allocate(seq, seq.num_computed_tokens + n)
                seq.num_scheduled_tokens = n
                batch.append(seq)
                budget -= n

        # admit waiting sequences (not in a step that had to preempt: the cache is full)
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            bm.match_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not bm.can_allocate(seq, seq.num_computed_tokens + n):
                bm.free(seq)                 # give back the cached blocks it took
                break
            bm.allocate(seq, seq.num_computed_tokens + n)
            bm.record_admission(seq)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.num_scheduled_tokens = n
            self.running.append(seq)
            batch.append(seq)
            budget -= n

        if not batch and self.waiting and not self.running:
            seq = self.waiting[0]
            raise RuntimeError(f"sequence of {seq.num_tokens} tokens does not fit in the KV cache "
                               f"({bm.num_blocks} blocks of {bm.block_size}); raise kv_cache_gb")
        return batch

    def preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks; it is recomputed from its tokens when rescheduled."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_scheduled_tokens = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.FINISHED
        self.running.remove(seq)
        self.block_manager.free(seq)
