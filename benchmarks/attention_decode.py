"""Decode attention alone: one step's paged_attention_decode over every layer, synthetic caches.

    python benchmarks/attention_decode.py                       # 32 Gemma-shaped sequences, 430 keys
    python benchmarks/attention_decode.py --batch 1 --heads 9 --kv-heads 3 --head-dim 64 --keys 1800 --layers 30

Each layer has its own float16 caches, so with enough layers a step reads its keys and values from
memory as a decode step does (--layers 1: the same layer again and again, from cache). Pages of 16
keys lie side by side, sequence after sequence (the placement lockstep decode gets, see
engine/block_manager.py). Prints the median step time and the bytes of keys and values it read
per second.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from jisu.kernels.cpu import load

BLOCK = 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=256)
    ap.add_argument("--keys", type=int, default=430, help="keys per sequence")
    ap.add_argument("--layers", type=int, default=18, help="layers, each with its own caches")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    ops = load()
    if ops is None:
        raise SystemExit("the C++ kernels are not available here")
    B, H, KVH, D, n = args.batch, args.heads, args.kv_heads, args.head_dim, args.keys
    pages = -(-n // BLOCK)
    slots_total = B * pages * BLOCK
    torch.manual_seed(0)
    caches = [(torch.randn(slots_total + 1, KVH, D).half(), torch.randn(slots_total + 1, KVH, D).half())
              for _ in range(args.layers)]
    table = np.arange(pages)[None, :] * B + np.arange(B)[:, None]          # page i of sequence b
    pos = np.arange(n)
    slots = torch.from_numpy(table[:, pos // BLOCK] * BLOCK + pos % BLOCK).long().contiguous()
    lens = torch.full((B,), n, dtype=torch.long)
    q = torch.randn(B, H, D)

    def step() -> None:
        for k, v in caches:
            ops.paged_attention_decode(q, k, v, slots, lens, D ** -0.5, 0)

    step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    read = args.layers * B * n * KVH * D * 2 * 2     # keys and values, float16
    print(f"{B} sequences x {n} keys, {H} heads / {KVH} KV heads of {D}, {args.layers} layers: "
          f"median {med * 1e3:.3f} ms a step, {read / med / 1e9:.1f} GB/s of keys and values")


if __name__ == "__main__":
    main()
