"""The step loop: schedule a batch, run it, sample, detokenize, check stop conditions."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from jisu.config import KV_DTYPES, EngineConfig, ModelConfig
from jisu.engine.block_manager import BlockManager
from jisu.engine.runner import ModelRunner
from jisu.engine.sampler import sample
from jisu.engine.scheduler import Scheduler
from jisu.engine.sequence import Sequence, SequenceStatus
from jisu.sampling_params import SamplingParams
from jisu.tokenizer import IncrementalDecoder, Tokenizer


@dataclass
class StepOutput:
    seq: Sequence
    new_token_id: int
    new_text: str          # text this step added (may be "" while a character is incomplete)


class LLMEngine:
    def __init__(self, model, model_cfg: ModelConfig, tokenizer: Tokenizer, cfg: EngineConfig):
        self.model_cfg, self.tokenizer, self.cfg = model_cfg, tokenizer, cfg
        groups = model_cfg.kv_groups()
        # a page: block_size tokens of K and V for the layers of one group
        page_bytes = (2 * len(groups[0][0]) * model_cfg.n_kv_heads * model_cfg.head_dim * KV_DTYPES[cfg.kv_cache_dtype]
                      * cfg.block_size)
        num_blocks = max(2 * len(groups), cfg.kv_cache_bytes() // page_bytes)
        self.block_manager = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching,
                                          windows=[w for _, w in groups])
        self.max_model_len = self._capacity(cfg.model_len(model_cfg.context_length))
        self.scheduler = Scheduler(cfg, self.block_manager)
        self.runner = ModelRunner(model, model_cfg, num_blocks, cfg.block_size, getattr(torch, cfg.kv_cache_dtype))
        self.sequences: dict[str, list[Sequence]] = {}

    def _capacity(self, longest: int) -> int:
        """The longest sequence (up to `longest`) whose pages fit the pool when it is alone."""
        bm, chunk = self.block_manager, self.cfg.max_num_batched_tokens
        lo, hi = 0, longest
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if bm.pages_for(mid, chunk) <= bm.num_blocks:
                lo = mid
            else:
                hi = mid - 1
        return lo

    # ---- requests -----------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> list[Sequence]:
        self.check_prompt(prompt_token_ids)
        params.validate()
        seqs = [Sequence(prompt_token_ids, params, request_id, i) for i in range(params.n)]
        for seq in seqs:
            seq.detokenizer = IncrementalDecoder(self.tokenizer, params.skip_special_tokens)
            self.scheduler.add(seq)
        self.sequences[request_id] = seqs
        return seqs

    def check_prompt(self, ids: list[int], room: int = 1) -> None:
        """Rejects ids that are empty, out of vocabulary, or leave fewer than `room` free
        positions in the context."""
        if not ids:
            raise ValueError("prompt is empty: it must hold at least one token")
        if len(ids) + room > self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; the context holds {self.max_model_len}")
        bad = [t for t in ids if not 0 <= t < self.model_cfg.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {self.model_cfg.vocab_size})")

    def abort(self, request_id: str) -> None:
        for seq in self.sequences.pop(request_id, []):
            if seq.status == SequenceStatus.RUNNING:
                self.scheduler.finish(seq)
            elif seq.status == SequenceStatus.WAITING:
                self.scheduler.waiting.remove(seq)
                seq.status = SequenceStatus.FINISHED
            seq.finish_reason = seq.finish_reason or "abort"

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def release(self, request_id: str) -> list[Sequence]:
        return self.sequences.pop(request_id, [])

    # ---- the loop -----------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        seqs = self.scheduler.schedule()
        if not seqs:
            return []
        vocab = min(self.model_cfg.vocab_size, self.tokenizer.vocab_size)    # columns past it: padding, no such token
        ready, logits, picked = self.runner.run(seqs, greedy_vocab=vocab)
        for seq in seqs:
            self.block_manager.after_step(seq)
        if not ready:                     # only partial prompt chunks this step
            return []
        rest = [seq for i, seq in enumerate(ready) if i not in picked]
        if rest and logits.shape[1] > vocab:
            logits[:, vocab:] = float("-inf")
        sampled = iter(sample(logits, rest) if rest else [])
        return [self._append(seq, *((picked[i], None) if i in picked else next(sampled))) for i, seq in enumerate(ready)]

    def _append(self, seq: Sequence, token: int, info: dict | None) -> StepOutput:
        p = seq.params
        seq.token_ids.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        if info is not None:
            seq.logprobs.append(info)
        scanned = len(seq.text)
        seq.text += seq.detokenizer.feed(token)
        reason = None
        if not p.ignore_eos and token in self.tokenizer.eog_ids:
            reason = "stop"
        elif token in p.stop_token_ids:
            reason = "stop"
        elif p.stop:
            # a stop string ends in the new text, having started up to len(stop)-1 chars before;
            # the earliest one wins, and the text is cut where it starts
            hits = [i for s in p.stop if (i := seq.text.find(s, max(0, scanned - len(s) + 1))) >= 0]
            if hits:
                seq.text = seq.text[:min(hits)]
                reason = "stop"
        if reason is None and ((p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens)
                               or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            if reason == "length":
                seq.text += seq.detokenizer.flush()
            seq.finish_reason = reason
            self.scheduler.finish(seq)
            visible = len(seq.text)
        elif p.stop:
            # hold back a tail that may be the start of a stop string, so streamed text never
            # has to be taken back
            visible = len(seq.text) - max((k for s in p.stop for k in range(len(s) - 1, 0, -1)
                                           if seq.text.endswith(s[:k])), default=0)
        else:
            visible = len(seq.text)
        new_text = seq.text[seq.num_emitted:visible]
        seq.num_emitted += len(new_text)
        return StepOutput(seq, token, new_text)
