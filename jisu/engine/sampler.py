"""Turns next-token logits into tokens, per sequence, following its SamplingParams."""

from __future__ import annotations

import torch

from jisu.engine.sequence import Sequence


def apply_penalties(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """The logits with seq's penalties applied: a new tensor where one applies, else `logits`
    itself (no copy of a 262k-entry row on every step that has none)."""
    p = seq.params
    if p.repetition_penalty != 1.0:
        logits = logits.clone()
        seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
        counts = torch.bincount(torch.tensor(seq.output_token_ids), minlength=logits.shape[-1]).float()
        logits = logits - (p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float())
    return logits


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Masks (to -inf) tokens outside top-k, outside the top-p nucleus, or below min_p * p_max."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


def argmax(row: torch.Tensor) -> int:
    """torch.argmax's answer; the C++ kernel is ~10x faster over a 262k vocabulary."""
    from jisu.kernels import cpu
    ops = cpu.load()
    if ops is not None and row.is_contiguous():
        i = ops.argmax(row)
        if i >= 0:
            return i
    return int(row.argmax())      # no kernels, or a NaN


def _plain_greedy(seq: Sequence) -> bool:
    p = seq.params
    return p.greedy and p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty


def argmax_only(seq: Sequence) -> bool:
    """Whether seq's next token is the argmax of its raw logits and nothing else is wanted
    from them (no penalties, no logprobs)."""
    return _plain_greedy(seq) and seq.params.logprobs is None


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[tuple[int, dict | None]]:
    """Returns (token id, logprob info or None) for each row of logits [B, vocab]."""
    from jisu.kernels import cpu
    ops = cpu.load()
    fast = {}
    # greedy rows with no penalty: one call for all of them, rows split over the threads
    plain = [i for i, seq in enumerate(seqs) if _plain_greedy(seq)]
    if ops is not None and len(plain) > 1 and logits.dim() == 2 and logits.stride(-1) == 1:
        fast = {i: t for i, t in zip(plain, ops.argmax_rows(logits, plain).tolist()) if t >= 0}
    out = []
    for b, seq in enumerate(seqs):
        p = seq.params
        token = fast.get(b)
        if token is not None and p.logprobs is None:
            out.append((token, None))
            continue
        row = raw = logits[b]
        if token is None:
            row = apply_penalties(row, seq)
            if p.greedy:
                token = argmax(row)
            else:
                row = filter_logits(row / p.temperature, p.top_k, p.top_p, p.min_p)
                probs = row.softmax(-1)
                token = int(torch.multinomial(probs, 1, generator=seq.generator))
        info = None
        if p.logprobs is not None:
            lp = raw.log_softmax(-1)
            top = torch.topk(lp, p.logprobs) if p.logprobs else None
            info = {"token": token, "logprob": float(lp[token]),
                    "top": [] if top is None else list(zip(top.indices.tolist(), top.values.tolist()))}
        out.append((token, info))
    return out
