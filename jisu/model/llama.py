"""Llama family (SmolLM2, Llama 2/3, Mistral-style): pre-norm blocks, GQA, RoPE, SwiGLU."""

from __future__ import annotations

import torch
from torch import nn

from jisu.config import ModelConfig
from jisu.model.layers import (Attention, AttentionMetadata, Embedding, Linear, RMSNorm, Rotary, gated_ffn, greedy_tokens,
                               project, reserve_rotaries, run_blocks)


class LlamaBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, rotary,
                              scale=cfg.head_dim ** -0.5)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.ffn_gate = Linear(cfg.d_model, cfg.d_ff)
        self.ffn_up = Linear(cfg.d_model, cfg.d_ff)
        self.ffn_down = Linear(cfg.d_ff, cfg.d_model)
        self.fused = None          # one C++ call per decode step (model/fused.py), set by the loader
        self.ops = None            # compiled kernels (act_mul_), set by the loader

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x [1, T, d] -> [1, T, d], or only `rows` of it (the model's last block: see
        AttentionMetadata.out_rows)."""
        if rows is None and self.fused is not None and self.fused.applies(x, meta):
            return self.fused(x, meta)
        # residual adds into the fresh output (a + b == b + a exactly): one [T, d] tensor less
        a = self.attn(self.attn_norm(x), meta, rows)
        if rows is not None:
            if rows.numel() == 0:
                return a
            x = x[:, rows]
        x = a.add_(x)
        h = self.ffn_norm(x)
        g = gated_ffn(self.ffn_gate, self.ffn_up, h, self.ops, gelu=False)
        del h                                      # freed before the down projection allocates
        return self.ffn_down(g).add_(x)


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig, max_len: int):
        super().__init__()
        self.cfg = cfg
        rotary = Rotary(cfg.head_dim, cfg.rope_base, max_len, interleaved=True)
        self.token_embd = Embedding(cfg.vocab_size, cfg.d_model)
        self.blk = nn.ModuleList(LlamaBlock(cfg, rotary) for _ in range(cfg.n_layers))
        self.rotaries = [rotary]
        self.output_norm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.fused = None          # FusedModel (model/fused.py), set by the loader
        self.output = Linear(cfg.d_model, cfg.vocab_size)   # tied unless the file has one

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        reserve_rotaries(self.rotaries, meta)
        x = self.token_embd(input_ids).float()
        x = run_blocks(self, x, meta)
        return self.output_norm(x) if x.shape[1] else x

    def compute_logits(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return project(self.output, h, out)

    def greedy(self, h: torch.Tensor, vocab: int) -> torch.Tensor | None:
        """argmax of compute_logits(h)[:, :vocab] per row, or None (see greedy_tokens)."""
        return greedy_tokens(self.output, h, vocab)
