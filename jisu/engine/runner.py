"""Runs one batch through the model: builds the padded inputs, the cache slots to write and
read, and returns next-token logits. Owns the KV cache tensors."""

from __future__ import annotations

import torch
from torch import nn

from jisu.config import ModelConfig
from jisu.engine.sequence import Sequence
from jisu.model.layers import Attention, AttentionMetadata


class ModelRunner:
    def __init__(self, model: nn.Module, cfg: ModelConfig, num_blocks: int, block_size: int):
        self.model, self.cfg, self.block_size = model, cfg, block_size
        num_slots = num_blocks * block_size
        self.scratch_slot = num_slots      # padding tokens write here; never read as a real key
        shape = (cfg.n_layers, 2, num_slots + 1, cfg.n_kv_heads, cfg.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=torch.float32)
        layers = [m for m in model.modules() if isinstance(m, Attention)]
        assert len(layers) == cfg.n_layers
        for i, attn in enumerate(layers):
            attn.k_cache, attn.v_cache = self.kv_cache[i, 0], self.kv_cache[i, 1]

    def _slots(self, seq: Sequence) -> torch.Tensor:
        """Cache slot of each of the sequence's tokens, through its block table."""
        pos = torch.arange(seq.num_tokens)
        table = torch.tensor(seq.block_table, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def prepare(self, seqs: list[Sequence]) -> tuple[torch.Tensor, AttentionMetadata, list[int]]:
        new = [seq.num_tokens - seq.num_computed_tokens for seq in seqs]
        B, T, L = len(seqs), max(new), max(seq.num_tokens for seq in seqs)
        input_ids = torch.zeros(B, T, dtype=torch.long)
        positions = torch.zeros(B, T, dtype=torch.long)
        slot_mapping = torch.full((B, T), self.scratch_slot, dtype=torch.long)
        gather_slots = torch.full((B, L), self.scratch_slot, dtype=torch.long)
        for b, (seq, n) in enumerate(zip(seqs, new)):
            start = seq.num_computed_tokens
            input_ids[b, :n] = torch.tensor(seq.token_ids[start:], dtype=torch.long)
            positions[b, :n] = torch.arange(start, seq.num_tokens)
            all_slots = self._slots(seq)
            slot_mapping[b, :n] = all_slots[start:]
            gather_slots[b, :seq.num_tokens] = all_slots
        context_lens = torch.tensor([seq.num_tokens for seq in seqs], dtype=torch.long)
        meta = AttentionMetadata(positions, slot_mapping.flatten(), gather_slots, context_lens)
        return input_ids, meta, new

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], all_logits: bool = False) -> torch.Tensor:
        """Computes the new tokens of each sequence and marks them cached.

        Returns next-token logits [B, vocab] at each sequence's last token, or with
        all_logits (one sequence only) [new_tokens, vocab] at every new position."""
        input_ids, meta, new = self.prepare(seqs)
        hidden = self.model(input_ids, meta)
        for seq in seqs:
            seq.num_computed_tokens = seq.num_tokens
        if all_logits:
            assert len(seqs) == 1
            return self.model.compute_logits(hidden[0, :new[0]]).float()
        last = hidden[torch.arange(len(seqs)), torch.tensor(new) - 1]
        return self.model.compute_logits(last).float()
