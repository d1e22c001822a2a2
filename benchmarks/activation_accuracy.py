"""Accuracy of each decode activation mode against transformers (fp32, dequantized GGUF).

    python benchmarks/activation_accuracy.py [N_TOKENS]

Feeds the first N_TOKENS (default 300) of tests/data/gpl3_preamble.txt one token at a time
(max_num_batched_tokens=1), so every matmul is a one-row call that takes the activation mode,
and prints mean / max KL and top-1 agreement of the next-token distributions.
"""

from __future__ import annotations

import sys
import time

import torch
from logits_vs_transformers import TEXT, divergence, reference_logits

from jisu import LLM
from jisu.registry import resolve


def main(n: int) -> None:
    print("| model | activations | mean KL | max KL | top-1 agreement | s |")
    print("|---|---|---|---|---|---|")
    for name in ("smollm2-135m-instruct", "gemma3-270m"):
        path = resolve(name)
        ref = None
        for mode in ("float32", "int16", "int8"):
            llm = LLM(str(path), activations=mode, max_num_batched_tokens=1, enable_prefix_caching=False,
                      progress=False)
            ids = llm.tokenizer.encode(TEXT.read_text(), add_special=True)[:n]
            if ref is None:
                ref = reference_logits(path, ids)
            t = time.perf_counter()
            ours = torch.from_numpy(llm.logits(ids))
            dt = time.perf_counter() - t
            kl, top1 = divergence(ref, ours)
            print(f"| {name} | {mode} | {kl.mean():.1e} | {kl.max():.1e} | {top1:.4f} | {dt:.1f} |", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
