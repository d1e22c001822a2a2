"""Runs the LLMEngine's step loop on a thread of its own and hands results to asyncio.

Only the engine thread touches the engine. Requests and aborts reach it through an inbox;
each step's new text goes back to the event loop as Deltas on the request's asyncio queue,
with one call into the loop per step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

from jisu.sampling_params import SamplingParams

log = logging.getLogger("jisu.server")


class EngineOverloaded(Exception):
    """The request queue is full; the client should retry later."""


class EngineDead(Exception):
    """The engine thread stopped after an error; the server cannot generate any more."""


@dataclass
class Delta:
    index: int                      # which of the request's n samples
    text: str                       # text this step added (stop strings held back)
    token_id: int
    logprob: dict | None            # {"token", "logprob", "top": [(id, logprob)]} when asked for
    finish_reason: str | None       # set on the sample's last delta


@dataclass
class Finished:
    num_prompt_tokens: int
    num_output_tokens: int          # over all samples


@dataclass
class Failed:
    message: str


@dataclass
class RequestStream:
    """One request as the event loop sees it: (tag, Delta) items arrive on `queue` until
    (tag, Finished) or (tag, Failed). Several requests may share a queue (one HTTP request
    with several prompts); the tag tells them apart."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    queue: asyncio.Queue
    tag: int = 0
    arrival: float = field(default_factory=time.monotonic)
    last_token: dict = field(default_factory=dict)      # sample index -> time of its last token (engine thread)
    num_output_tokens: int = 0


class AsyncEngine:
    def __init__(self, llm, max_queue: int = 256, metrics=None):
        self.llm, self.engine = llm, llm.engine
        self.max_queue = max_queue
        self.metrics = metrics
        self.streams: dict[str, RequestStream] = {}      # requests in flight (added, not yet finished)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="jisu-engine", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error: str | None = None

    # ---- event-loop side ----------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    @property
    def capacity(self) -> int:
        """Sequences that may be in flight: a full batch plus the queue."""
        return self.engine.cfg.max_num_seqs + self.max_queue

    @property
    def num_in_flight(self) -> int:
        """Sequences submitted and not finished."""
        return sum(s.params.n for s in self.streams.values())

    def check_capacity(self, num_seqs: int) -> None:
        if self.error:
            raise EngineDead(self.error)
        if self.num_in_flight + num_seqs > self.capacity:
            raise EngineOverloaded(f"server busy: {self.num_in_flight} sequences in flight, limit {self.capacity}")

    def submit(self, prompt_token_ids: list[int], params: SamplingParams, out: asyncio.Queue,
               tag: int = 0) -> RequestStream:
        """Queues a request (already validated). Call check_capacity first."""
        if self.error:       # set by the engine thread before it fails what is registered
            raise EngineDead(self.error)
        rid = uuid.uuid4().hex
        stream = RequestStream(rid, prompt_token_ids, params, out, tag)
        self.streams[rid] = stream
        self._inbox.put(("add", stream))
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        if request_id in self.streams:
            self._inbox.put(("abort", request_id))
            self._wake.set()

    async def shutdown(self) -> None:
        """Stops the engine thread (after the server has drained its requests)."""
        for rid in list(self.streams):
            self.abort(rid)
        self._stop = True
        self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30)

    # ---- engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop:
                self._take_inbox()
                if not self.engine.has_unfinished():
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                self._publish(self.engine.step())
        except Exception as e:   # the engine is in an unknown state: fail everything, refuse more
            log.exception("engine step failed")
            self.error = f"engine failed: {type(e).__name__}: {e}"
            # on the loop's thread, which owns `streams`: every request registered by then fails,
            # and submit() refuses new ones once `error` is set
            self._loop.call_soon_threadsafe(
                lambda: self._post_now([(s, Failed(self.error)) for s in list(self.streams.values())]))

    def _take_inbox(self) -> None:
        while True:
            try:
                kind, arg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    self.engine.add_request(arg.request_id, arg.prompt_token_ids, arg.params)
                except Exception as e:     # this request only (it was validated; be safe anyway)
                    self.engine.abort(arg.request_id)
                    self._post([(arg, Failed(f"request rejected: {type(e).__name__}: {e}"))])
            else:
                self.engine.abort(arg)
                self.engine.release(arg)
                self._loop.call_soon_threadsafe(self.streams.pop, arg, None)

    def _publish(self, outputs) -> None:
        now = time.monotonic()
        items, done = [], []
        for out in outputs:
            seq = out.seq
            stream = self.streams.get(seq.request_id)
            if stream is None:
                continue
            stream.num_output_tokens += 1
            if self.metrics is not None:
                last = stream.last_token.get(seq.index)
                if last is None:
                    self.metrics.ttft.observe(now - stream.arrival)
                else:
                    self.metrics.itl.observe(now - last)
            stream.last_token[seq.index] = now
            info = seq.logprobs[-1] if seq.params.logprobs is not None and seq.logprobs else None
            items.append((stream, Delta(seq.index, out.new_text, out.new_token_id, info,
                                        seq.finish_reason if seq.is_finished else None)))
            if seq.is_finished and all(s.is_finished for s in self.engine.sequences[seq.request_id]):
                done.append(stream)
        for stream in done:
            self.engine.release(stream.request_id)
            items.append((stream, Finished(len(stream.prompt_token_ids), stream.num_output_tokens)))
            if self.metrics is not None:
                self.metrics.e2e.observe(now - stream.arrival)
                self.metrics.prompt_tokens.inc(len(stream.prompt_token_ids))
                self.metrics.generation_tokens.inc(stream.num_output_tokens)
        if items:
            self._post(items)

    def _post(self, items) -> None:
        self._loop.call_soon_threadsafe(self._post_now, items)

    def _post_now(self, items) -> None:    # on the event loop
        for stream, item in items:
            stream.queue.put_nowait((stream.tag, item))
            if isinstance(item, (Finished, Failed)):
                self.streams.pop(stream.request_id, None)
