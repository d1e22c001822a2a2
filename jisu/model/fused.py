"""Decode steps through one C++ call per block (`decode_block` in kernels/cpu/qmatmul.cpp).

A Python block issues ~15 dispatches per layer; at one token per sequence they cost a small
model about as much as its matmuls. The fused call runs the same kernels in the same order,
so the numbers are the same (tested). The loader attaches one to every block whose weights
all stay quantized for the kernels; a block uses it when the whole step is decodes.
"""

from __future__ import annotations

import torch

from jisu.model.layers import AttentionMetadata, QLinear


class FusedDecode:
    def __init__(self, block, gemma: bool, ops):
        a = block.attn
        linears = [a.attn_q, a.attn_k, a.attn_v, a.attn_output, block.ffn_gate, block.ffn_up, block.ffn_down]
        assert all(isinstance(m, QLinear) for m in linears)
        self.attn, self.ops, self.gemma = a, ops, gemma
        self.weights = [m.qweight for m in linears]
        self.qtypes = [m.qtype for m in linears]
        norms = [block.attn_norm, block.ffn_norm]
        if gemma:
            norms += [a.attn_q_norm, a.attn_k_norm, block.post_attention_norm, block.post_ffw_norm]
        self.norms = [n.weight for n in norms]
        self.eps = block.attn_norm.eps
        self.act_digits = block.ffn_up.act_digits
        self.int_gemm = bool(self.act_digits) and getattr(ops, "isa", "avx2") == "avx512"   # any row count

    def applies(self, x: torch.Tensor, meta: AttentionMetadata) -> bool:
        # the Python path hands more than QLinear.small_m rows to MKL (AVX2 builds): stay on it there
        return meta.num_decode == x.shape[1] and (x.shape[1] <= QLinear.small_m or self.int_gemm)

    def __call__(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        a = self.attn
        slots = meta.groups[a.kv_group]
        out = self.ops.decode_block(
            x[0], self.weights, self.qtypes, self.norms, a.n_heads, a.n_kv_heads, a.head_dim, self.eps,
            a.k_cache, a.v_cache, slots.slot_mapping, slots.decode_slots, meta.decode_lens, meta.positions,
            a.rotary.cos, a.rotary.sin, a.rotary.interleaved, a.scale, a.window or 0, self.gemma, self.act_digits)
        return out[None]


class FusedModel:
    """Every block of a decode step in one C++ call (`decode_layers`), when every block has a
    FusedDecode. The blocks' fixed arguments live in C++ objects, built at the first step (the
    KV cache is attached after loading) and again if the cache tensors change."""

    def __init__(self, model, ops):
        self.ops = ops
        self.blocks = list(model.blk)          # not the model: model.fused -> model would be a cycle
        self._layers, self._caches = None, None

    def applies(self, x: torch.Tensor, meta: AttentionMetadata) -> bool:
        return hasattr(self.ops, "decode_layers") and all(b.fused is not None for b in self.blocks) \
            and self.blocks[0].fused.applies(x, meta)

    def _build(self) -> None:
        rotaries = []
        layers = []
        for b in self.blocks:
            f, a = b.fused, b.attn
            if a.rotary not in rotaries:
                rotaries.append(a.rotary)
            layers.append(self.ops.decode_layer(
                f.weights, f.qtypes, f.norms, a.n_heads, a.n_kv_heads, a.head_dim, f.eps, a.k_cache, a.v_cache,
                a.kv_group, rotaries.index(a.rotary), a.rotary.interleaved, a.scale, a.window or 0, f.gemma,
                f.act_digits))
        self._layers, self._rotaries = layers, rotaries
        self._caches = [(b.attn.k_cache, b.attn.v_cache) for b in self.blocks]

    def __call__(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        a = self.blocks[0].attn
        if self._layers is None or self._caches[0][0] is not a.k_cache or self._caches[0][1] is not a.v_cache:
            self._build()
        groups = meta.groups
        out = self.ops.decode_layers(x[0], self._layers, [g.slot_mapping for g in groups],
                                     [g.decode_slots for g in groups], meta.decode_lens, meta.positions,
                                     [r.cos for r in self._rotaries], [r.sin for r in self._rotaries])
        return out[None]


def attach(model, ops) -> int:
    """Gives each block whose seven matrices are QLinear (head dim a multiple of 16, as the attention
    kernel needs) a FusedDecode; returns how many."""
    gemma = model.cfg.arch == "gemma3"
    n = 0
    for block in model.blk:
        a = block.attn
        if a.head_dim % 16 == 0 and all(isinstance(m, QLinear) for m in (
                a.attn_q, a.attn_k, a.attn_v, a.attn_output, block.ffn_gate, block.ffn_up, block.ffn_down)):
            block.fused = FusedDecode(block, gemma, ops)
            n += 1
    model.fused = FusedModel(model, ops) if n == len(model.blk) else None
    return n
