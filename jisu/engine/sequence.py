"""A Sequence: one stream of tokens being generated, with an explicit status."""

from __future__ import annotations

import itertools
import time
from enum import Enum, auto

import torch

from jisu.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()    # needs (re)prefill
    RUNNING = auto()    # holds KV-cache blocks: prefilling (maybe in chunks) or decoding
    FINISHED = auto()


class Sequence:
    _ids = itertools.count()

    def __init__(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str = "",
                 index: int = 0):
        self.seq_id = next(Sequence._ids)
        self.request_id = request_id
        self.index = index                          # which of the request's n samples
        self.status = SequenceStatus.WAITING
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0                # tokens whose K/V are in the cache
        self.num_scheduled_tokens = 0               # tokens the current step computes
        self.block_tables: list[list[int]] = []     # one per KV group (see BlockManager)
        self.block_hashes: list[int] = []           # prefix hashes of the full blocks, in order
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.params = params
        self.text = ""
        self.num_emitted = 0                        # characters of text already streamed out
        self.finish_reason: str | None = None
        self.logprobs: list[dict] = []
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            # any integer seed: torch takes at most 64 bits
            self.generator = torch.Generator().manual_seed((params.seed * 1_000_003 + index) % 2**63)
        self.detokenizer = None                     # set by the engine

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED
