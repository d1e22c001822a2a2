"""Runs one step's batch through the model: flattens the sequences' new tokens into one row,
computes the cache slots to write and read, and returns next-token logits. Owns the KV cache."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from jisu.config import ModelConfig
from jisu.engine.block_manager import NO_BLOCK
from jisu.engine.sampler import argmax_only
from jisu.engine.sequence import Sequence
from jisu.model.layers import Attention, AttentionMetadata, KVGroupSlots, PrefillSegment, QLinear


class ModelRunner:
    def __init__(self, model: nn.Module, cfg: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32):
        self.model, self.cfg, self.block_size = model, cfg, block_size
        groups = cfg.kv_groups()
        num_slots = num_blocks * block_size
        self.scratch_slot = num_slots      # decode rows pad their key slots with it; never attended
        self.num_groups = len(groups)
        # a page holds block_size tokens for the layers of one group: layer j of every group
        # shares kv_cache[j], each group writing only the pages its block tables own
        shape = (len(groups[0][0]), 2, num_slots + 1, cfg.n_kv_heads, cfg.head_dim)
        # empty, not zeros: the pool's pages stay unmapped until a sequence writes them, so memory
        # follows use rather than the budget. Only the scratch slot is ever read unwritten (padding
        # and freed window blocks, always masked out); it is zeroed so masked keys are not NaN.
        self.kv_cache = torch.empty(shape, dtype=dtype)
        self.kv_cache[:, :, self.scratch_slot] = 0
        self._logits: torch.Tensor | None = None   # next-token logits, reused from step to step
        layers = [m for m in model.modules() if isinstance(m, Attention)]
        assert len(layers) == cfg.n_layers
        for g, (members, _window) in enumerate(groups):
            for j, i in enumerate(members):
                layers[i].k_cache, layers[i].v_cache = self.kv_cache[j, 0], self.kv_cache[j, 1]
                layers[i].kv_group = g

    def _slots(self, tables: list[list[list[int]]], ends: np.ndarray) -> np.ndarray:
        """Cache slots [groups, len(tables), L] of keys 0..L-1 (L: the longest end) through each
        sequence's per-group block tables, from one padded array; freed blocks (NO_BLOCK) and
        keys at or past a sequence's end map to the scratch slot. One go for all sequences: per
        sequence through torch this was ~8 calls, ~0.8 ms of a 32-sequence decode step, and
        numpy's ops cost ~1 us each where torch's cost several."""
        L = int(ends.max())
        bs = self.block_size
        width = -(-L // bs)
        # the pages as one flat list, group by group: numpy reads it in 22 us, where a nested
        # list (32 sequences, Gemma's 6 groups) took 51 us to build and read
        flat: list[int] = []
        for g in range(self.num_groups):
            for groups in tables:
                t = groups[g]
                flat += t[:width]
                if len(t) < width:
                    flat += [NO_BLOCK] * (width - len(t))
        pages = np.array(flat, dtype=np.int64).reshape(self.num_groups, len(tables), width)
        # each page's bs slots side by side, cut at L (a gather through pos // bs cost 2x)
        slots = (pages[..., None] * bs + np.arange(bs)).reshape(*pages.shape[:2], width * bs)[:, :, :L]
        unused = np.repeat(pages < 0, bs, axis=2)[:, :, :L] | (np.arange(L) >= ends[:, None])
        return np.where(unused, self.scratch_slot, slots)

    def _decode_slots(self, decodes: list[Sequence], ends: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache slots [groups, len(decodes), L] of every key of each one-token sequence, and each
        one's new slot [groups, len(decodes)]."""
        slots = self._slots([s.block_tables for s in decodes], ends)
        last = slots[:, np.arange(len(decodes)), ends - 1]                      # [groups, B]
        return torch.from_numpy(slots), torch.from_numpy(last)

    def prepare(self, seqs: list[Sequence], all_rows: bool = False) -> tuple[torch.Tensor, AttentionMetadata]:
        """seqs: one-token sequences first, then the multi-token ones (see `order`). Unless
        all_rows, the model returns only the rows the step's logits read (meta.out_rows): each
        sequence's last row where this step computes its last token, in order."""
        decodes = [s for s in seqs if s.num_scheduled_tokens == 1]
        D = len(decodes)
        ids = [s.token_ids[s.num_computed_tokens] for s in decodes]
        ends = np.array([s.num_computed_tokens + 1 for s in decodes], dtype=np.int64)
        decode_lens = torch.from_numpy(ends)
        positions = [torch.from_numpy(ends - 1)]
        if D:
            decode_slots, last = self._decode_slots(decodes, ends)            # [groups, D, L], [groups, D]
        else:
            decode_slots = torch.full((self.num_groups, 0, 0), self.scratch_slot, dtype=torch.long)
        groups = [KVGroupSlots([last[g]] if D else [], decode_slots[g], []) for g in range(self.num_groups)]
        prefills, row = [], D
        # (a one-token row is a decode or a prompt chunk of one token, not always its last)
        out_rows = [i for i, s in enumerate(decodes) if s.num_computed_tokens + 1 == s.num_tokens]
        for seq in seqs[D:]:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + seq.num_scheduled_tokens
            if end == seq.num_tokens:
                out_rows.append(row + end - start - 1)
            ids.extend(seq.token_ids[start:end])
            pos = torch.arange(start, end)
            positions.append(pos)
            slots = torch.from_numpy(self._slots([seq.block_tables], np.array([end]))[:, 0])   # [groups, end]
            for g, group in enumerate(groups):
                group.slot_mapping.append(slots[g, start:])
                group.prefill_slots.append(slots[g])
            prefills.append(PrefillSegment(row, row + end - start, pos, end))
            row += end - start
        for group in groups:
            group.slot_mapping = torch.cat(group.slot_mapping) if len(group.slot_mapping) > 1 else group.slot_mapping[0]
        keep = None if all_rows or len(out_rows) == row else torch.tensor(out_rows, dtype=torch.long)   # may be []
        meta = AttentionMetadata(torch.cat(positions)[None], groups, num_decode=D, decode_lens=decode_lens,
                                 prefills=prefills, out_rows=keep)
        return torch.tensor(ids, dtype=torch.long)[None], meta

    @staticmethod
    def order(seqs: list[Sequence]) -> list[Sequence]:
        return [s for s in seqs if s.num_scheduled_tokens == 1] + [s for s in seqs if s.num_scheduled_tokens != 1]

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], all_logits: bool = False,
            greedy_vocab: int = 0) -> tuple[list[Sequence], torch.Tensor, dict[int, int]]:
        """Computes each sequence's scheduled tokens and marks them cached.

        Returns the sequences whose last token was computed (they need a next token), `picked`
        and logits: with greedy_vocab > 0, the ready sequences that want only the argmax of
        their logits' first greedy_vocab columns (see sampler.argmax_only) may get it straight
        from the model (model.greedy: the output projection screened, not computed in full);
        picked maps their index in ready to that token. logits [len(ready) - len(picked), vocab]
        are the next-token logits of the others, in order, computed as a batch of their own (a
        different row count may take a different kernel: one or two rows the one-row kernels,
        and for an output matrix in panels fewer than 16 rows p8_tile, rather than the int16
        GEMM: the same values within integer rounding, as with any change of batch size). With all_logits (one
        sequence only), logits [new tokens, vocab] at every new position instead."""
        seqs = self.order(seqs)
        input_ids, meta = self.prepare(seqs, all_rows=all_logits)
        hidden = self.model(input_ids, meta)[0]
        ready, rows, row = [], [], 0
        for seq in seqs:
            row += seq.num_scheduled_tokens
            seq.num_computed_tokens += seq.num_scheduled_tokens
            seq.num_scheduled_tokens = 0
            if seq.num_computed_tokens == seq.num_tokens:
                ready.append(seq)
                rows.append(row - 1)
        if meta.out_rows is not None:             # hidden holds only the ready rows, in order
            assert hidden.shape[0] == len(ready), "prepare's rows and run's ready sequences disagree"
            rows = list(range(len(ready)))
        if all_logits:
            assert len(seqs) == 1
            return ready, self.model.compute_logits(hidden).float(), {}
        picked = {}
        fast = [i for i, seq in enumerate(ready) if argmax_only(seq)] if greedy_vocab > 0 else []
        if fast and hasattr(self.model, "greedy"):
            # a decode step's rows are all fast and in order: hidden itself (no gather)
            pick = rows if len(fast) == len(rows) else [rows[i] for i in fast]
            tokens = self.model.greedy(hidden if len(pick) == hidden.shape[0] else hidden[pick], greedy_vocab)
            if tokens is not None:
                picked = {i: t for i, t in zip(fast, tokens.tolist()) if t >= 0}
                rows = [r for i, r in enumerate(rows) if i not in picked]
        if not rows:
            return ready, hidden.new_empty(0, self.model.output.out_features), picked
        # a step's logits live until the next step (the engine samples from them at once): one
        # buffer, grown to the most rows seen (64 rows of Gemma's 262k vocab: 67 MB, allocated
        # and page-faulted anew each step before; on the server's engine thread malloc maps
        # anything over its arena's 64 MB heaps fresh whatever its threshold)
        if not isinstance(self.model.output, QLinear):      # dense: computed by torch into its own tensor
            return ready, self.model.compute_logits(hidden[rows]).float(), picked
        if self._logits is None or self._logits.shape[0] < len(rows):
            self._logits = None
            self._logits = torch.empty(max(len(rows), 1), self.model.output.out_features)
        return ready, self.model.compute_logits(hidden[rows], out=self._logits[:len(rows)]).float(), picked
