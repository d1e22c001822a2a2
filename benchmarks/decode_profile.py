"""Where a single-stream decode step's time goes, for each activation mode, in one process.

    python benchmarks/decode_profile.py [MODEL ...]   (registry names or .gguf paths)

Times every engine step of a 128-token greedy decode (after an 8-token prompt) and, inside it,
the transformer blocks (the fused C++ call for all blocks, or per block) and the output projection; the rest is
the Python engine (runner, sampler, detokenizer). Modes alternate, 5 rounds, medians.
"""

from __future__ import annotations

import statistics
import sys
import time

from jisu import LLM, SamplingParams
from jisu.model.fused import FusedDecode, FusedModel

MODES = ("float32", "int16", "int8")


class Timer:
    def __init__(self):
        self.total = 0.0

    def wrap(self, fn):
        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.total += time.perf_counter() - t
        return timed


def profile(model: str, rounds: int = 5, n_decode: int = 128) -> None:
    blocks = Timer()
    FusedDecode.__call__ = blocks.wrap(FusedDecode.__call__)
    FusedModel.__call__ = blocks.wrap(FusedModel.__call__)       # all blocks in one call, when it applies
    llms = {}
    for mode in MODES:
        llm = LLM(model, activations=mode, progress=False, enable_prefix_caching=False)
        out = Timer()
        # the runner computes logits through compute_logits (into its buffer), not output.forward
        llm.model.compute_logits = out.wrap(llm.model.compute_logits)
        llms[mode] = (llm, out)
    ids = llms[MODES[0]][0].tokenizer.encode("Once upon a time", add_special=True)[:8]
    params = SamplingParams(max_tokens=n_decode, temperature=0, ignore_eos=True)
    rows = {m: [] for m in MODES}
    for _ in range(rounds):
        for mode, (llm, out) in llms.items():
            eng = llm.engine
            eng.add_request("p", ids, params)
            eng.step()                               # prefill + first token: not a decode step
            blocks.total = out.total = 0.0
            t, n = time.perf_counter(), 0
            while eng.has_unfinished():
                eng.step()
                n += 1
            step = (time.perf_counter() - t) / n
            eng.release("p")
            rows[mode].append((step, blocks.total / n, out.total / n))
    name = llms[MODES[0]][0].config.name
    print(f"\n### {name}: ms per decode step (median of {rounds} rounds of {n_decode} tokens)\n")
    print("| activations | step | blocks | output projection | rest (Python engine) | tok/s |")
    print("|---|---|---|---|---|---|")
    for mode in MODES:
        step, blk, out = (statistics.median(r[i] for r in rows[mode]) for i in range(3))
        print(f"| {mode} | {step * 1e3:.2f} | {blk * 1e3:.2f} | {out * 1e3:.2f} | {(step - blk - out) * 1e3:.2f} | {1 / step:.1f} |")


if __name__ == "__main__":
    for m in sys.argv[1:] or ["smollm2-135m-instruct", "gemma3-270m"]:
        profile(m)
