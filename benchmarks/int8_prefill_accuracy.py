"""What int8 activations in the prefill GEMMs would cost in accuracy, matrix by matrix.

    python benchmarks/int8_prefill_accuracy.py [MODEL ...]

The int16 GEMM runs near `vpdpwssd`'s rate; `vpdpbusd` (int8) would double it, as llama.cpp
does, if the activations were rounded to 8 bits per 32 values. This simulates exactly that
rounding (round to nearest, absmax scale per 32 values) on the inputs of the chosen matrices of
every block, through the exact float32 kernels otherwise, and prints mean / max KL and top-1
agreement of the prompt's next-token distributions against transformers (fp32, the same GGUF
dequantized) on tests/data/gpl3_preamble.txt. The real-model tests require top-1 >= 0.99.
"""

from __future__ import annotations

import sys

import torch
from logits_vs_transformers import TEXT, divergence, reference_logits

from jisu import LLM
from jisu.model.layers import QLinear
from jisu.registry import resolve
Q, K, V, O, G, U, D = "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"
CHOICES = [set(), {Q, K, V, O, G, U, D}, {Q, K, V}, {G, U}, {O}, {D}, {Q, K, V, G, U}, {Q, K, V, O}]


def int8_per_32(x: torch.Tensor) -> torch.Tensor:
    blocks = x.reshape(-1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    scale[scale == 0] = 1
    return ((blocks / scale).round().clamp(-127, 127) * scale).reshape(x.shape)


def main(names: list[str]) -> None:
    print("| model | int8 inputs of | mean KL | max KL | top-1 agreement |\n|---|---|---|---|---|")
    exact_columns = QLinear.columns
    for name in names:
        path = resolve(name)
        llm = LLM(str(path), activations="float32", enable_prefix_caching=False, progress=False)
        ids = llm.tokenizer.encode(TEXT.read_text(), add_special=True)
        ref = reference_logits(path, ids)
        kinds = {m: n.rsplit(".", 1)[-1] for n, m in llm.model.named_modules() if isinstance(m, QLinear)}
        for chosen in CHOICES:
            def columns(self, x, start, end, out=None):
                if kinds.get(self) in chosen and x.numel() > self.small_m * self.in_features:
                    x = int8_per_32(x)
                return exact_columns(self, x, start, end, out)
            QLinear.columns = columns
            try:
                ours = torch.from_numpy(llm.logits(ids))
            finally:
                QLinear.columns = exact_columns
            kl, top1 = divergence(ref, ours)
            print(f"| {name} | {', '.join(sorted(chosen)) or 'none (int16 today: float32 here)'} | "
                  f"{kl.mean():.1e} | {kl.max():.1e} | {top1:.4f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["smollm2-135m-instruct", "gemma3-270m"])
