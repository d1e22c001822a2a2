"""Decode steps through one C++ call (`decode_layers` / `decode_block` in kernels/cpu/qmatmul.cpp),
and prompt chunks too (`prefill_layers`).

A Python block issues ~15 dispatches per layer; at one token per sequence they cost a small
model about as much as its matmuls, and a 512-token prompt ~6 ms of SmolLM2's ~175. The fused
call runs the same kernels in the same order, so the numbers are the same (tested). The loader
attaches one to every block whose weights all stay quantized for the kernels; a block uses it
when the whole step is decodes, and the model's blocks use prefill_layers when the step is one
prompt chunk on the int16 GEMM.
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
        self._layer, self._key = None, None

    def applies(self, x: torch.Tensor, meta: AttentionMetadata) -> bool:
        # the Python path hands more than QLinear.small_m rows to MKL (AVX2 builds): stay on it there
        return meta.num_decode == x.shape[1] and (x.shape[1] <= QLinear.small_m or self.int_gemm)

    def layer(self, rotary: int):
        """This block's fixed decode_block arguments as a C++ DecodeLayer (`rotary`: which table
        of the call's cos/sin lists it reads), rebuilt when the KV cache tensors change (the
        runner attaches them after loading)."""
        a = self.attn
        if self._key is None or self._key[0] is not a.k_cache or self._key[1] is not a.v_cache or self._key[2] != rotary:
            self._layer = self.ops.decode_layer(
                self.weights, self.qtypes, self.norms, a.n_heads, a.n_kv_heads, a.head_dim, self.eps, a.k_cache,
                a.v_cache, a.kv_group, rotary, a.rotary.interleaved, a.scale, a.window or 0, self.gemma,
                self.act_digits)
            self._key = (a.k_cache, a.v_cache, rotary)
        return self._layer

    def __call__(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return run_layers(self.ops, x, [self.layer(0)], meta, [self.attn.rotary])


def run_layers(ops, x: torch.Tensor, layers: list, meta: AttentionMetadata, rotaries: list) -> torch.Tensor:
    """`decode_layers` over the step's per-group slots and the rotaries' current tables."""
    groups = meta.groups
    out = ops.decode_layers(x[0], layers, [g.slot_mapping for g in groups], [g.decode_slots for g in groups],
                            meta.decode_lens, meta.positions, [r.cos for r in rotaries], [r.sin for r in rotaries])
    return out[None]


class FusedModel:
    """Every block of a decode step in one C++ call (`decode_layers`), when every block has a
    FusedDecode, and the blocks of a one-prompt step (`prefill_layers`). Each block's DecodeLayer
    is fetched once and again only if the cache changes."""

    def __init__(self, model, ops):
        self.ops = ops
        self.blocks = list(model.blk)          # not the model: model.fused -> model would be a cycle
        self.rotaries = list(dict.fromkeys(b.attn.rotary for b in self.blocks))
        self._layers, self._cache = None, None

    def applies(self, x: torch.Tensor, meta: AttentionMetadata) -> bool:
        return all(b.fused is not None for b in self.blocks) and self.blocks[0].fused.applies(x, meta)

    def layers(self) -> list:
        k_cache = self.blocks[0].attn.k_cache
        if self._layers is None or self._cache is not k_cache:
            self._layers = [b.fused.layer(self.rotaries.index(b.attn.rotary)) for b in self.blocks]
            self._cache = k_cache
        return self._layers

    def __call__(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return run_layers(self.ops, x, self.layers(), meta, self.rotaries)

    def prefill_applies(self, x: torch.Tensor, meta: AttentionMetadata) -> bool:
        """One prompt chunk and nothing else, on the int16 GEMM (where the Python blocks would take
        it too), with the shapes for which Attention._prefill takes paged_attention_prefill (head
        dims a multiple of 64, at most 32 query heads per KV head)."""
        first = self.blocks[0].fused
        return (first is not None and first.int_gemm and meta.num_decode == 0 and len(meta.prefills) == 1
                and meta.prefills[0].end - meta.prefills[0].start == x.shape[1]
                and all(b.fused is not None and b.attn.head_dim % 64 == 0
                        and b.attn.n_heads // b.attn.n_kv_heads <= 32 for b in self.blocks))

    def prefill(self, x: torch.Tensor, meta: AttentionMetadata, n: int) -> torch.Tensor:
        """The first n blocks over the step's one prompt chunk x [1, T, d] (see prefill_applies)."""
        groups = meta.groups
        out = self.ops.prefill_layers(x[0], self.layers()[:n], [g.slot_mapping for g in groups],
                                      [g.prefill_slots[0] for g in groups], meta.prefills[0].positions,
                                      [r.cos for r in self.rotaries], [r.sin for r in self.rotaries])
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
