"""The offline API: LLM.generate / chat / stream / logits / perplexity."""

from __future__ import annotations

import gc
import itertools
import math
import os
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from jisu.config import EngineConfig, ModelConfig
from jisu.engine.engine import LLMEngine
from jisu.engine.sequence import Sequence
from jisu.loader.gguf import read_gguf
from jisu.model import activation_digits, load_model
from jisu.registry import resolve
from jisu.sampling_params import SamplingParams
from jisu.tokenizer import Tokenizer


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)

    # the first (usually only) sample, as DESIGN.md's `outs[0].text` expects
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


def _output(request_id: str, prompt: str | None, seqs: list[Sequence]) -> RequestOutput:
    return RequestOutput(request_id, prompt, seqs[0].token_ids[:seqs[0].num_prompt_tokens], [
        CompletionOutput(s.index, s.text, s.output_token_ids, s.finish_reason,
                         s.logprobs if s.params.logprobs is not None else None) for s in seqs])


def _keep_freed_memory() -> None:
    """Lets glibc's malloc reuse freed blocks below 256 MB instead of unmapping them.

    A prefill step allocates and frees megabyte tensors in every layer; by default glibc maps
    each one fresh and unmaps it on free, so every layer paid page faults and page zeroing
    (~9% of a 512-token prefill in perf). Measured: prefill +16-18%, peak RSS unchanged. The
    limit was 64 MB until a batch of 64 Gemma 3 decode rows (logits: 64 x 262k floats, 67 MB)
    was measured mapping and zeroing them every step: 742 -> 951 tok/s at 256 MB. The KV pool
    (larger) stays its own lazily touched mapping. Set JISU_MALLOC=default to skip."""
    if os.environ.get("JISU_MALLOC") == "default":
        return
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):      # not glibc
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 256 << 20)
    mallopt(M_TRIM_THRESHOLD, 512 << 20)


class LLM:
    def __init__(self, model: str | None = None, *, kv_cache_gb: float | None = 1.0, kv_cache_fraction: float = 0.25,
                 max_num_seqs: int = 32,
                 max_model_len: int | None = None, max_num_batched_tokens: int = 512,
                 enable_prefix_caching: bool = True, num_threads: int | None = None, progress: bool = True,
                 dtype: str = "float32", kernels: bool | None = None, activations: str = "int16",
                 kv_cache_dtype: str = "auto"):
        if num_threads or not os.environ.get("OMP_NUM_THREADS"):
            torch.set_num_threads(num_threads or os.cpu_count() or 1)
        t0 = time.perf_counter()
        _keep_freed_memory()
        self.engine_config = EngineConfig(max_num_seqs=max_num_seqs, kv_cache_gb=kv_cache_gb,
                                          kv_cache_fraction=kv_cache_fraction,
                                          max_model_len=max_model_len,
                                          max_num_batched_tokens=max_num_batched_tokens,
                                          enable_prefix_caching=enable_prefix_caching,
                                          kv_cache_dtype="float32" if kv_cache_dtype == "auto" else kv_cache_dtype)
        self.path = str(resolve(model, progress=progress))
        g = read_gguf(self.path)
        self.config = ModelConfig.from_gguf(g)
        self.tokenizer = Tokenizer.from_gguf(g)
        max_len = self.engine_config.model_len(self.config.context_length)
        if dtype not in ("bfloat16", "float32"):
            raise ValueError(f"dtype must be 'bfloat16' or 'float32', got {dtype!r}")
        activation_digits(activations)      # checked before anything loads
        # kernels: None = use the compiled CPU kernels when they load, False = PyTorch only
        ops = None
        if kernels is not False:
            from jisu.kernels import cpu
            ops = cpu.load()
            if ops is None and kernels:
                raise RuntimeError(f"CPU kernels requested but unavailable: {cpu.load_error}")
        self.kernels = ops is not None
        self.activations = activations if ops is not None else "float32"
        if kv_cache_dtype == "auto":
            # float16 keys and values wherever activations are rounded anyway: half the cache's
            # memory and half of what decode attention reads (its bound); "float32" stays exact
            self.engine_config.kv_cache_dtype = "float16" if self.activations != "float32" else "float32"
        self.model = load_model(g, self.config, max_len, getattr(torch, dtype), ops, activations)
        self.engine = LLMEngine(self.model, self.config, self.tokenizer, self.engine_config)
        # Everything alive now (model, tokenizer, engine: ~190k objects with SmolLM2's vocabulary)
        # leaves the cyclic GC's generations, which its collections during generation walked:
        # measured on SmolLM2 decode, alternating in one process, 101.7 -> 109.4 tok/s. An LLM
        # holds no reference cycles, so deleting it still frees it (tested).
        gc.collect()
        gc.freeze()
        self.load_seconds = time.perf_counter() - t0
        self._request_ids = itertools.count()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    # ---- generation ---------------------------------------------------------------------
    def _encode_prompt(self, prompt: str) -> list[int]:
        # BOS as the metadata says; text that already starts with the BOS token is left alone
        return self.tokenizer.encode(prompt, add_special=True, parse_special=True)

    def generate(self, prompts: str | list[str] | None = None, params: SamplingParams | None = None,
                 *, prompt_token_ids: list[list[int]] | None = None, use_tqdm: bool | None = None
                 ) -> list[RequestOutput]:
        """Completes every prompt; returns one RequestOutput per prompt, in order."""
        params = params or SamplingParams()
        if prompts is None and prompt_token_ids is None:
            raise ValueError("give prompts or prompt_token_ids")
        if isinstance(prompts, str):
            prompts = [prompts]
        texts = list(prompts) if prompts is not None else [None] * len(prompt_token_ids)
        for i, p in enumerate(texts):
            if p is not None and not isinstance(p, str):
                raise TypeError(f"prompts[{i}] must be a str, got {type(p).__name__}")
        ids_list = prompt_token_ids or [self._encode_prompt(p) for p in texts]
        params_list = params if isinstance(params, list) else [params] * len(ids_list)
        if len(params_list) != len(ids_list):
            raise ValueError(f"got {len(params_list)} SamplingParams for {len(ids_list)} prompts")
        # validate everything before queueing anything, so bad input loses no work
        for ids, p in zip(ids_list, params_list):
            self.engine.check_prompt(ids)
            p.validate()
        rids = [self._submit(ids, p) for ids, p in zip(ids_list, params_list)]
        show = use_tqdm if use_tqdm is not None else len(rids) > 1
        bar = tqdm(total=len(rids), desc="generate", disable=not show)
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.seq.is_finished and all(s.is_finished for s in self.engine.sequences[out.seq.request_id]):
                        bar.update(1)
        except BaseException:
            for rid in rids:
                self.engine.abort(rid)
            raise
        finally:
            bar.close()
        return [_output(rid, text, self.engine.release(rid)) for rid, text in zip(rids, texts)]

    def _submit(self, ids: list[int], params: SamplingParams) -> str:
        rid = str(next(self._request_ids))
        self.engine.add_request(rid, ids, params)
        return rid

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | None = None,
             **kw) -> list[RequestOutput]:
        """Generates the assistant's reply with the model's chat template (vLLM's LLM.chat)."""
        convs = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in convs]
        return self.generate(prompts, params, **kw)

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Yields the completion's text piece by piece as tokens are generated (n must be 1)."""
        params = params or SamplingParams()
        if params.n != 1:
            raise ValueError("stream() supports n=1")
        rid = self._submit(prompt if isinstance(prompt, list) else self._encode_prompt(prompt), params)
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.seq.request_id == rid and out.new_text:
                        yield out.new_text
        finally:
            self.engine.abort(rid)

    # ---- scoring ------------------------------------------------------------------------
    def _score(self, token_ids: list[int], fn) -> list:
        """Runs token_ids through the model in chunks; fn(logits_chunk, start) per chunk."""
        self.engine.check_prompt(token_ids, room=0)
        seq = Sequence([], SamplingParams(max_tokens=1))
        bm = self.engine.block_manager
        chunk = self.engine_config.max_num_batched_tokens
        results = []
        try:
            for start in range(0, len(token_ids), chunk):
                piece = token_ids[start:start + chunk]
                seq.token_ids.extend(piece)
                bm.allocate(seq, seq.num_tokens)
                seq.num_scheduled_tokens = len(piece)
                results.append(fn(self.engine.runner.run([seq], all_logits=True)[1], start))
                bm.after_step(seq)      # window groups give back what they no longer see
        finally:
            bm.free(seq)
        return results

    def logits(self, token_ids: list[int]) -> np.ndarray:
        """float32 [len(token_ids), vocab]: next-token logits at every position."""
        token_ids = [int(t) for t in token_ids]
        if not token_ids:
            raise ValueError("token_ids is empty")
        return np.concatenate(self._score(token_ids, lambda lg, _: lg.numpy()))

    def perplexity(self, text: str) -> float:
        """exp(mean NLL) of the text's tokens (BOS as the metadata says). One window when the
        text fits the context, else windows of the context length with a stride of half."""
        ids = self.tokenizer.encode(text, add_special=True)
        if len(ids) < 2:
            raise ValueError("text is too short to score (needs at least 2 tokens)")
        n_ctx = self.max_model_len
        if n_ctx < 2:
            raise ValueError("the context must hold at least 2 tokens to score text")
        nll, count, scored_to = 0.0, 0, 1        # token 0 is never predicted
        begin = 0
        while scored_to < len(ids):
            end = min(begin + n_ctx, len(ids))
            window = ids[begin:end]
            first = scored_to - begin            # first target index inside the window

            def chunk_nll(lg: torch.Tensor, start: int) -> tuple[float, int]:
                # logits rows start.. predict tokens start+1..: a chunk's last row scores the
                # next chunk's first token
                lo, hi = max(first, start + 1), min(start + lg.shape[0] + 1, len(window))
                if lo >= hi:
                    return 0.0, 0
                targets = torch.tensor(window[lo:hi])
                lp = lg[lo - 1 - start: hi - 1 - start].log_softmax(-1)
                return float(-lp.gather(1, targets[:, None]).sum()), hi - lo

            for s, c in self._score(window, chunk_nll):
                nll, count = nll + s, count + c
            scored_to = end
            begin += max(1, n_ctx // 2)
        return math.exp(nll / count)
