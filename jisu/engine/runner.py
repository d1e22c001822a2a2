"""Runs one step's batch through the model: flattens the sequences' new tokens into one row,
computes the cache slots to write and read, and returns next-token logits. Owns the KV cache."""

from __future__ import annotations

import torch
from torch import nn

from jisu.config import ModelConfig
from jisu.engine.sequence import Sequence
from jisu.model.layers import Attention, AttentionMetadata, PrefillSegment


class ModelRunner:
    def __init__(self, model: nn.Module, cfg: ModelConfig, num_blocks: int, block_size: int):
        self.model, self.cfg, self.block_size = model, cfg, block_size
        num_slots = num_blocks * block_size
        self.scratch_slot = num_slots      # decode rows pad their key slots with it; never attended
        shape = (cfg.n_layers, 2, num_slots + 1, cfg.n_kv_heads, cfg.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=torch.float32)
        layers = [m for m in model.modules() if isinstance(m, Attention)]
        assert len(layers) == cfg.n_layers
        for i, attn in enumerate(layers):
            attn.k_cache, attn.v_cache = self.kv_cache[i, 0], self.kv_cache[i, 1]

    def _slots(self, seq: Sequence, end: int) -> torch.Tensor:
        """Cache slots of the sequence's tokens 0..end-1, through its block table."""
        pos = torch.arange(end)
        table = torch.tensor(seq.block_table, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def prepare(self, seqs: list[Sequence]) -> tuple[torch.Tensor, AttentionMetadata]:
        """seqs: one-token sequences first, then the multi-token ones (see `order`)."""
        ids, positions, slot_mapping = [], [], []
        decodes = [s for s in seqs if s.num_scheduled_tokens == 1]
        L = max((s.num_computed_tokens + 1 for s in decodes), default=0)
        decode_slots = torch.full((len(decodes), L), self.scratch_slot, dtype=torch.long)
        prefills, row = [], 0
        for b, seq in enumerate(seqs):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + seq.num_scheduled_tokens
            slots = self._slots(seq, end)
            ids.extend(seq.token_ids[start:end])
            pos = torch.arange(start, end)
            positions.append(pos)
            slot_mapping.append(slots[start:])
            if end - start == 1:
                decode_slots[b, :end] = slots
            else:
                prefills.append(PrefillSegment(row, row + end - start, slots, pos))
            row += end - start
        meta = AttentionMetadata(torch.cat(positions)[None], torch.cat(slot_mapping), num_decode=len(decodes),
                                 decode_slots=decode_slots,
                                 decode_lens=torch.tensor([s.num_computed_tokens + 1 for s in decodes]),
                                 prefills=prefills)
        return torch.tensor(ids, dtype=torch.long)[None], meta

    @staticmethod
    def order(seqs: list[Sequence]) -> list[Sequence]:
        return [s for s in seqs if s.num_scheduled_tokens == 1] + [s for s in seqs if s.num_scheduled_tokens != 1]

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], all_logits: bool = False) -> tuple[list[Sequence], torch.Tensor]:
        """Computes each sequence's scheduled tokens and marks them cached.

        Returns the sequences whose last token was computed (they need a next token) and their
        next-token logits [len, vocab]; with all_logits (one sequence only), logits
        [new tokens, vocab] at every new position instead."""
        seqs = self.order(seqs)
        input_ids, meta = self.prepare(seqs)
        hidden = self.model(input_ids, meta)[0]
        ready, rows, row = [], [], 0
        for seq in seqs:
            row += seq.num_scheduled_tokens
            seq.num_computed_tokens += seq.num_scheduled_tokens
            seq.num_scheduled_tokens = 0
            if seq.num_computed_tokens == seq.num_tokens:
                ready.append(seq)
                rows.append(row - 1)
        if all_logits:
            assert len(seqs) == 1
            return ready, self.model.compute_logits(hidden).float()
        return ready, self.model.compute_logits(hidden[rows]).float()
