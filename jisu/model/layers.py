"""Layers shared by the architectures: RMSNorm, RoPE, attention over the paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """y = x W^T with W dense in its storage dtype (float32, or bf16 on CPUs with bf16 units);
    the residual stream stays float32. Used where the compiled kernels are not."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def reset_parameters(self) -> None:
        pass    # weights always come from the checkpoint: no random init to pay for

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return F.linear(x.to(w.dtype), w).to(x.dtype)


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        # nn.Embedding's normal_ init, even on the meta device, imports torch._dynamo (~2.7 s)
        pass


class QLinear(nn.Module):
    """y = x W^T with W kept in its GGUF blocks (uint8 [out_features, row_bytes]).

    Few rows (decode) go through the fused C++ kernel, which reads each weight block once and
    dequantizes it in registers/L1. Many rows (prefill) are compute-bound: W is dequantized in
    slices of `chunk` output rows and multiplied by MKL, so the fp32 copy never exceeds a slice.
    On AVX-512 VNNI builds with integer activations, every row count goes to the kernel: its
    int16 GEMM beats dequantize + MKL 1.8x at 512 rows (measured, RESULTS.md).
    """

    small_m = 96     # measured: the fused kernel beats dequantize + MKL up to ~128 rows
    chunk = 4096

    def __init__(self, qweight: torch.Tensor, qtype: int, in_features: int, ops):
        super().__init__()
        self.register_buffer("qweight", qweight, persistent=False)
        self.qtype, self.in_features, self.out_features = qtype, in_features, qweight.shape[0]
        self.ops = ops
        self.act_digits = 0   # one-row calls: 0 float32 activations, 1 int8, 2 int16 (per 32 values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.columns(x, 0, self.out_features)

    def columns(self, x: torch.Tensor, start: int, end: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Output features start..end-1 only: (x W^T)[..., start:end], into `out` if given
        (contiguous, [rows, end - start])."""
        qweight = self.qweight[start:end]
        if x.numel() <= self.small_m * self.in_features or (self.act_digits and getattr(self.ops, "isa", "") == "avx512"):
            return self.ops.qmatmul(x, qweight, self.qtype, self.in_features, self.act_digits, out)
        x2 = x.reshape(-1, self.in_features)
        y = torch.empty(x2.shape[0], end - start) if out is None else out.view(x2.shape[0], end - start)
        for n in range(0, end - start, self.chunk):
            rows = slice(n, min(n + self.chunk, end - start))
            w = self.ops.dequantize(qweight[rows], self.qtype, self.in_features)
            torch.mm(x2, w.t(), out=y[:, rows])
        return y.view(*x.shape[:-1], end - start)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (int64 [n]) of W, dequantized: float32 [n, in_features] (embedding lookups)."""
        return self.ops.dequantize(self.qweight.index_select(0, ids), self.qtype, self.in_features)

    def greedy(self, x: torch.Tensor, vocab: int) -> torch.Tensor:
        """The kernel's argmax of (x W^T)[:, :vocab] per row (see greedy_tokens)."""
        return self.ops.greedy_rows(x, self.qweight[:vocab], self.qtype, self.in_features)


class PanelLinear(QLinear):
    """A Q8_0 output matrix (with tied embeddings, also the embedding table) repacked at load into
    the kernels' panels of 32 rows (kernels/cpu/qmatmul.cpp, "Q8_0 in panels"): as many bytes as
    the file's blocks, and the batched GEMM and the greedy screen no longer transpose it every
    step. Every row count and the row lookups read the panels; the values are the file's. Its
    qtype is -1: no ggml type describes the panels, and nothing may read qweight as blocks.
    `norms` [panels, 64]: each column's Euclidean norm, then the norm of what the six-bit screen
    leaves out of it, rounded up (the screen's bound; 2 MB for Gemma's 262k columns)."""

    def __init__(self, panels: torch.Tensor, norms: torch.Tensor, out_features: int, in_features: int, ops):
        super().__init__(panels, -1, in_features, ops)
        self.norms = norms
        self.out_features = out_features
        self.act_digits = 2

    def columns(self, x: torch.Tensor, start: int, end: int, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.ops.panel_matmul(x, self.qweight, self.out_features, self.in_features, start, end, out)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.ops.panel_rows(self.qweight, ids, self.out_features, self.in_features)

    def greedy(self, x: torch.Tensor, vocab: int) -> torch.Tensor:
        return self.ops.panel_greedy(x, self.qweight, self.norms, self.out_features, vocab, self.in_features)


def project(lin: nn.Module, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """lin(x), written into `out` where lin keeps GGUF blocks (QLinear) and out is given."""
    if out is not None and isinstance(lin, QLinear):
        return lin.columns(x, 0, lin.out_features, out)
    return lin(x)


def greedy_tokens(lin: nn.Module, x: torch.Tensor, vocab: int) -> torch.Tensor | None:
    """argmax over the first `vocab` columns of lin(x) for each row of x [M, K], found without
    computing every logit (int64 [M], -1 where a row is left to the caller), or None where lin
    cannot: the answer is the argmax of the kernel that would compute lin(x), so for blocks it
    applies only where that is the int16 GEMM (integer activations, AVX-512, at least
    ops.GEMM_MIN_ROWS rows), for panels to any row count (their screen recomputes its candidates
    as panel_matmul's tile for that many rows). The kernel itself leaves every row to the caller
    for types it does not screen (block offsets: Q4_1, Q4_K)."""
    ops = getattr(lin, "ops", None)
    if (not isinstance(lin, QLinear) or not lin.act_digits
            or not hasattr(ops, "greedy_rows") or x.dim() != 2 or x.shape[0] == 0
            or (x.shape[0] < ops.GEMM_MIN_ROWS and not isinstance(lin, PanelLinear))):
        return None
    return lin.greedy(x, vocab)


def _int16_gemm(mods: tuple[nn.Module, ...], x: torch.Tensor) -> bool:
    """Whether QLinear modules reading x take the int16 GEMM together: AVX-512 kernels, the same
    integer activations, 3+ rows (what QLinear.columns would pick for each of them)."""
    first = mods[0]
    return (all(type(m) is QLinear for m in mods) and first.act_digits > 0
            and all(m.act_digits == first.act_digits and m.in_features == first.in_features for m in mods)
            and getattr(first.ops, "isa", "") == "avx512" and x.numel() >= first.ops.GEMM_MIN_ROWS * first.in_features)


def linear_many(mods: tuple[nn.Module, ...], x: torch.Tensor) -> list[torch.Tensor]:
    """[m(x) for m in mods], for modules reading the same x (q/k/v): on the int16 GEMM in one
    kernel call, x rounded once and all their panels in one parallel region."""
    if not _int16_gemm(mods, x):
        return [m(x) for m in mods]
    first = mods[0]
    return first.ops.qmatmul_many(x, [m.qweight for m in mods], [m.qtype for m in mods], first.in_features, first.act_digits)


def gated_ffn(gate: nn.Module, up: nn.Module, h: torch.Tensor, ops, gelu: bool, chunk: int = 512) -> torch.Tensor:
    """act(h W_gate^T) * (h W_up^T), act SiLU or GELU (tanh). With the kernels, many rows take
    up's output `chunk` columns at a time into one small buffer, multiplied into the gate's in
    place: a 512-token prompt chunk held [512, d_ff] twice (SmolLM2: 3.1 MB each) and that pair
    was the peak of the prefill's working memory. On the int16 GEMM (gated_ffn_i16) h is rounded
    once for both, and up's tiles multiply act(gate) by their sums as they store them: no buffer."""
    if ops is not None and hasattr(ops, "gated_ffn_i16") and _int16_gemm((gate, up), h):
        g = ops.gated_ffn_i16(h.reshape(-1, h.shape[-1]), gate.qweight, up.qweight, gate.qtype, up.qtype,
                              gate.in_features, gelu)
        return g.view(*h.shape[:-1], gate.out_features)
    g = gate(h)
    if ops is None:
        return (F.gelu(g, approximate="tanh") if gelu else F.silu(g, inplace=True)).mul_(up(h))
    d_ff = g.shape[-1]
    if not isinstance(up, QLinear) or h.numel() < 64 * h.shape[-1] or d_ff <= chunk:
        ops.act_mul_(g, up(h), gelu)
        return g
    g2 = g.view(-1, d_ff)
    for start in range(0, d_ff, chunk):
        end = min(start + chunk, d_ff)
        ops.act_mul_(g2[:, start:end], up.columns(h, start, end).view(-1, end - start), gelu)
    return g


class QEmbedding(nn.Module):
    """Token embeddings kept quantized: only the looked-up rows are dequantized."""

    def __init__(self, table: QLinear):
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.rows(ids.reshape(-1)).view(*ids.shape, -1)


class RMSNorm(nn.Module):
    # GGUF stores Gemma's (1 + w) already folded into w, so one form serves both families.
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.ops = None        # the compiled kernels, when the loader has them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ops is not None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Rotary(nn.Module):
    """cos/sin tables for rotary position embeddings.

    `interleaved=True` rotates adjacent pairs (x0,x1),(x2,x3)... : llama.cpp's "normal" RoPE,
    which llama GGUFs are converted for (their q/k rows are permuted at conversion).
    `interleaved=False` rotates (x_i, x_{i+d/2}): the "neox" layout Gemma uses.
    """

    def __init__(self, head_dim: int, base: float, max_len: int, interleaved: bool):
        super().__init__()
        # explicit device: models are built under torch.device("meta") and these are not loaded
        # numpy, not torch: a handful of float64 torch ops touched ~4 MB of libtorch's code
        self.inv_freq = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        self.max_len = max_len
        self.register_buffer("cos", torch.empty(0, head_dim // 2, device="cpu"), persistent=False)
        self.register_buffer("sin", torch.empty(0, head_dim // 2, device="cpu"), persistent=False)
        self.reserve(min(max_len, 1024))
        self.interleaved = interleaved
        self.ops = None        # compiled kernels, set by the loader

    def reserve(self, n: int) -> None:
        """Tables for positions 0..n-1 at least. They grow by doubling as contexts get longer:
        for Gemma 3's 32k context two full tables took 67 MB before any token was seen."""
        have = self.cos.shape[0]
        if n <= have:
            return
        if n > self.max_len:
            raise ValueError(f"position {n - 1} is past the rotary tables' {self.max_len} positions")
        n = min(self.max_len, max(n, 2 * have))
        angles = np.arange(n, dtype=np.float64)[:, None] * self.inv_freq[None, :]
        self.cos = torch.from_numpy(np.cos(angles).astype(np.float32))
        self.sin = torch.from_numpy(np.sin(angles).astype(np.float32))

    def apply(self, q: torch.Tensor, k: torch.Tensor, meta: "AttentionMetadata") -> tuple[torch.Tensor, torch.Tensor]:
        if self.ops is not None:
            q, k = q.contiguous(), k.contiguous()
            self.ops.rope_(q, k, meta.positions, self.cos, self.sin, self.interleaved)
            return q, k
        return self(q, meta), self(k, meta)

    def forward(self, x: torch.Tensor, meta: "AttentionMetadata") -> torch.Tensor:
        # x: [B, T, H, D]; the tables at the batch's positions are looked up once per step
        key = ("rope", id(self))
        if key not in meta.cache:
            cos, sin = self.cos[meta.positions].unsqueeze(2), self.sin[meta.positions].unsqueeze(2)
            meta.cache[key] = torch.complex(cos, sin) if self.interleaved else (cos, sin)
        if self.interleaved:   # pairs as complex numbers: (x0 + i x1) * (cos + i sin)
            rot = torch.view_as_complex(x.unflatten(-1, (-1, 2))) * meta.cache[key]
            return torch.view_as_real(rot).flatten(-2)
        cos, sin = meta.cache[key]
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def reserve_rotaries(rotaries: list[Rotary], meta: "AttentionMetadata") -> None:
    """Once per step, before any layer reads the tables."""
    if meta.positions.numel():
        n = int(meta.positions.max()) + 1
        for r in rotaries:
            r.reserve(n)


def run_blocks(model: nn.Module, x: torch.Tensor, meta: "AttentionMetadata") -> torch.Tensor:
    """model.blk in order, every block in one C++ call where model.fused applies (a step of
    one-token rows); only the rows meta.out_rows names come out (when set). A prompt's positions
    before its last need keys and values from every block but no output from the last one: its
    output projection and MLP then take the rows that the step's logits read (one per ready
    sequence), as llama.cpp does. SmolLM2 has 30 blocks and Gemma 3 18: a 512-token prompt
    skips ~1/30 and ~1/18 of its matrix work."""
    rows = meta.out_rows
    if model.fused is not None and model.fused.applies(x, meta):
        x = model.fused(x, meta)                  # model/fused.py
        return x if rows is None else x[:, rows]  # rows: one of them a prompt's one-token chunk
    last = len(model.blk) - 1
    start = 0
    if model.fused is not None and model.fused.prefill_applies(x, meta):
        start = last if rows is not None else last + 1      # the last block takes `rows` here
        x = model.fused.prefill(x, meta, start)
    for i in range(start, last + 1):
        block = model.blk[i]
        x = block(x, meta, rows) if i == last and rows is not None else block(x, meta)
    return x


@dataclass
class PrefillSegment:
    """One sequence's run of new tokens in the flattened batch, rows start:end."""

    start: int
    end: int
    positions: torch.Tensor     # [T] absolute positions of the new tokens
    context_len: int            # keys the segment sees: positions 0 .. context_len-1


@dataclass
class KVGroupSlots:
    """Cache slots for the layers of one KV group (see BlockManager): each group has its own
    block tables, so its own slots. Slots of blocks a window group freed are the scratch slot."""

    slot_mapping: torch.Tensor          # [N] slot each new token's k/v is written to
    decode_slots: torch.Tensor          # [num_decode, L] slot of key j (scratch past the end)
    prefill_slots: list[torch.Tensor]   # per prefill segment, [context_len] slots of its keys


@dataclass
class AttentionMetadata:
    """What attention needs to read and write the paged KV cache for one step.

    The step's new tokens are flattened into one row of N tokens ([1, N]): first the
    sequences that add one token (decodes), then one segment per sequence that adds several
    (prefill chunks). Decode rows read their keys in place through their slots; each
    prefill segment attends causally over its gathered keys.
    """

    positions: torch.Tensor                # [1, N] absolute position of each new token
    groups: list[KVGroupSlots]             # indexed by Attention.kv_group
    num_decode: int = 0
    decode_lens: torch.Tensor | None = None    # [num_decode] keys each decode row sees
    prefills: list[PrefillSegment] = field(default_factory=list)
    cache: dict = field(default_factory=dict)   # per-step values shared by the layers
    # the rows whose hidden states the step returns (None: all): the last block computes its
    # attention for every row (the cache needs their keys and values) and the rest only for these
    out_rows: torch.Tensor | None = None

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """[num_decode, 1, 1, L] bool (True = attend) for the PyTorch decode path."""
        key = ("decode_mask", window)
        if key not in self.cache:
            j = torch.arange(self.groups[0].decode_slots.shape[1])[None, :]
            n = self.decode_lens[:, None]
            ok = j < n
            if window:
                ok &= j >= n - window
            self.cache[key] = ok[:, None, None, :]
        return self.cache[key]

    def prefill_mask(self, i: int, window: int | None) -> torch.Tensor | None:
        """[T, L] bool for segment i: causal, and within the window; None when plain causal
        from position 0 (SDPA's is_causal covers it)."""
        key = ("prefill_mask", i, window)
        if key not in self.cache:
            seg = self.prefills[i]
            L = seg.context_len
            if L == seg.positions.shape[0] and (not window or L <= window):
                self.cache[key] = None
            else:
                q_pos = seg.positions[:, None]
                k_pos = torch.arange(L)[None, :]
                ok = k_pos <= q_pos
                if window:
                    ok &= k_pos > q_pos - window
                self.cache[key] = ok
        return self.cache[key]


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 rotary: Rotary, scale: float, window: int | None = None,
                 qk_norm_eps: float | None = None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.attn_q = Linear(d_model, n_heads * head_dim)
        self.attn_k = Linear(d_model, n_kv_heads * head_dim)
        self.attn_v = Linear(d_model, n_kv_heads * head_dim)
        self.attn_output = Linear(n_heads * head_dim, d_model)
        if qk_norm_eps is not None:
            self.attn_q_norm = RMSNorm(head_dim, qk_norm_eps)
            self.attn_k_norm = RMSNorm(head_dim, qk_norm_eps)
        self.qk_norm = qk_norm_eps is not None
        self.rotary, self.scale, self.window = rotary, scale, window
        self.k_cache: torch.Tensor | None = None   # [num_slots, n_kv_heads, head_dim], set by the runner
        self.v_cache: torch.Tensor | None = None
        self.kv_group = 0                          # which block tables address the cache, set by the runner
        self.ops = None                            # compiled kernels, set by the loader

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x [1, T, d] -> [1, T, d], or [1, len(rows), d]: every row's keys and values are written
        to the cache and attend, and the output projection takes only `rows` where given."""
        B, T, _ = x.shape                          # B == 1: the batch is flattened
        q, k, v = linear_many((self.attn_q, self.attn_k, self.attn_v), x)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.attn_q_norm(q), self.attn_k_norm(k)
        q, k = self.rotary.apply(q, k, meta)

        slots = meta.groups[self.kv_group]
        if self.ops is not None:
            self.ops.write_kv_(self.k_cache, self.v_cache, slots.slot_mapping, k, v)
        else:
            kv = self.k_cache.dtype           # float32, or float16 (rounded to nearest, as the fused path)
            self.k_cache.index_copy_(0, slots.slot_mapping, k.reshape(B * T, self.n_kv_heads, self.head_dim).to(kv))
            self.v_cache.index_copy_(0, slots.slot_mapping, v.reshape(B * T, self.n_kv_heads, self.head_dim).to(kv))
        q = q.view(B * T, self.n_heads, self.head_dim)
        nd = meta.num_decode
        if nd == B * T:
            out = self._decode(q, slots, meta)
        elif nd == 0 and len(meta.prefills) == 1 and meta.prefills[0].end - meta.prefills[0].start == B * T:
            # one prompt chunk: its result is the output
            out = self._prefill(q, 0, slots.prefill_slots[0], meta)
        else:
            out = torch.empty_like(q)
            if nd:
                out[:nd] = self._decode(q[:nd], slots, meta)
            for i, seg in enumerate(meta.prefills):
                out[seg.start:seg.end] = self._prefill(q[seg.start:seg.end], i, slots.prefill_slots[i], meta)
        out = out.reshape(B, T, -1)
        if rows is not None:
            if rows.numel() == 0:
                return x.new_empty(B, 0, x.shape[2])
            out = out[:, rows]
        return self.attn_output(out)

    def _decode(self, q: torch.Tensor, slots: KVGroupSlots, meta: AttentionMetadata) -> torch.Tensor:
        """q [D, H, hd] -> [D, H, hd]: one query per sequence, keys read through the slots."""
        if self.ops is not None and self.head_dim % 16 == 0:
            return self.ops.paged_attention_decode(q, self.k_cache, self.v_cache, slots.decode_slots,
                                                   meta.decode_lens, self.scale, self.window or 0)
        keys = self.k_cache[slots.decode_slots].transpose(1, 2).to(q.dtype)      # [D, KVH, L, hd]
        values = self.v_cache[slots.decode_slots].transpose(1, 2).to(q.dtype)
        out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=meta.decode_mask(self.window),
                                             scale=self.scale, enable_gqa=self.n_heads != self.n_kv_heads)
        return out[:, :, 0]

    def _prefill(self, q: torch.Tensor, i: int, key_slots: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [T, H, hd] of one sequence's new tokens -> [T, H, hd], causal over its keys."""
        if self.ops is not None and self.head_dim % 64 == 0 and self.n_heads // self.n_kv_heads <= 32:
            return self.ops.paged_attention_prefill(q, self.k_cache, self.v_cache, key_slots,
                                                    meta.prefills[i].positions, self.scale, self.window or 0)
        keys = self.k_cache[key_slots].transpose(0, 1)[None].to(q.dtype)         # [1, KVH, L, hd]
        values = self.v_cache[key_slots].transpose(0, 1)[None].to(q.dtype)
        mask = meta.prefill_mask(i, self.window)
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys, values, attn_mask=mask,
                                             is_causal=mask is None, scale=self.scale,
                                             enable_gqa=self.n_heads != self.n_kv_heads)
        return out[0].transpose(0, 1)
