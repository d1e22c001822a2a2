"""Chooses each step's batch: prefill waiting sequences while blocks allow, else decode every
running sequence, preempting the newest when the cache is full."""

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

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """Returns (sequences to run, is_prefill)."""
        bm = self.block_manager
        batch: list[Sequence] = []
        num_tokens = 0
        while self.waiting and len(self.running) + len(batch) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            n = seq.num_tokens - seq.num_computed_tokens
            if batch and num_tokens + n > self.cfg.max_num_batched_tokens:
                break
            if not bm.can_allocate(seq, seq.num_tokens):
                break
            bm.allocate(seq, seq.num_tokens)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            batch.append(seq)
            num_tokens += n
        if batch:
            self.running.extend(batch)
            return batch, True

        # decode: every running sequence gets one more slot; the newest give way when full
        batch = []
        for seq in list(self.running):
            if seq not in self.running:      # preempted below to make room for an older one
                continue
            while not bm.can_allocate(seq, seq.num_tokens):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            if seq in self.running:
                bm.allocate(seq, seq.num_tokens)
                batch.append(seq)
        if not batch and self.waiting and not self.running:
            seq = self.waiting[0]
            raise RuntimeError(f"sequence of {seq.num_tokens} tokens does not fit in the KV cache "
                               f"({bm.num_blocks} blocks of {bm.block_size}); raise kv_cache_gb")
        return batch, False

    def preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks; it is recomputed from its tokens when rescheduled."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.FINISHED
        self.running.remove(seq)
        self.block_manager.free(seq)
