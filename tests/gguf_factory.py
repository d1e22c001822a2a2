"""Writes tiny random GGUF files with the `gguf` package: models small enough to test in
seconds, with the same metadata layout, tokenizers and quant types as the real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q, GGUFWriter, TokenType
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import quantize

K_QUANTS = (Q.Q4_K, Q.Q6_K, Q.Q5_K, Q.Q2_K, Q.Q3_K)


# K-quant scales for random blocks: (low, high) of d, and dmin/d for the formats that subtract
# a minimum. d puts a weight's spread near 0.05 (as the Gaussian formats and real checkpoints);
# dmin/d is the mean quant, so a block's values centre on zero. Random bytes with larger d and no
# centring gave weights of ~0.5 with a positive mean: attention scores of ~1e5 in two layers,
# where float16 K/V (or any 1e-4 change) flips which key wins, so logit checks failed at random.
K_SCALES = {Q.Q4_K: (1e-4, 3e-4, 7.5), Q.Q5_K: (5e-5, 1.5e-4, 15.5), Q.Q2_K: (2.5e-3, 6e-3, 1.5),
            Q.Q3_K: (5e-4, 1.5e-3, None), Q.Q6_K: (6.2e-5, 9e-5, None)}


def random_quant_bytes(shape: tuple[int, int], qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Raw blocks for `shape` in `qtype`. Formats the gguf package can quantize are quantized
    from Gaussian data; K-quants get random bytes with the fp16 scales of K_SCALES."""
    if qtype not in K_QUANTS:
        data = rng.standard_normal(shape).astype(np.float32) * 0.05
        return data.astype(np.float16) if qtype == Q.F16 else data if qtype == Q.F32 else quantize(data, qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    n_blocks = shape[0] * shape[1] // block
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    lo, hi, mean_q = K_SCALES[qtype]
    d = rng.uniform(lo, hi, size=(n_blocks, 1))
    scales = d if mean_q is None else np.concatenate([d, d * mean_q], axis=1)
    scales = scales.astype(np.float16).view(np.uint8)
    if qtype in (Q.Q4_K, Q.Q5_K):      # d, dmin first
        raw[:, 0:4] = scales
    elif qtype == Q.Q2_K:              # scales[16], qs[64], d, dmin
        raw[:, 80:84] = scales
    elif qtype in (Q.Q3_K, Q.Q6_K):    # d last
        raw[:, size - 2:] = scales
    return raw.reshape(shape[0], -1)


def add_tensor(w: GGUFWriter, name: str, shape: tuple[int, ...], qtype: Q, rng) -> None:
    if len(shape) == 1 or qtype == Q.F32:
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32) if len(shape) == 1
                     else rng.standard_normal(shape).astype(np.float32) * 0.05)
        return
    data = random_quant_bytes(shape, qtype, rng)
    if qtype in (Q.F16,):
        w.add_tensor(name, data)
    else:
        w.add_tensor(name, data, raw_dtype=qtype)   # shape follows from the byte shape


def _byte_level_chars() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


GPT2_MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "Ġ w", "o r", "Ġ o", "e r", "Ġ s"]
GPT2_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def add_gpt2_tokenizer(w: GGUFWriter) -> int:
    tokens = GPT2_SPECIAL + _byte_level_chars()
    for m in GPT2_MERGES:
        tokens.append(m.replace(" ", ""))
    types = [TokenType.CONTROL] * len(GPT2_SPECIAL) + [TokenType.NORMAL] * (len(tokens) - len(GPT2_SPECIAL))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(GPT2_MERGES)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return len(tokens)


SPM_PIECES = ["▁", "e", "t", "a", "o", "h", "▁t", "he", "▁the", "▁a", "n", "▁an", "d", "▁and", "s", "▁s",
              "i", "in", "r", "er", "l", "c", "x", "y", "z"]


def add_spm_tokenizer(w: GGUFWriter) -> int:
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    types = [TokenType.CONTROL] * 3 + [TokenType.UNKNOWN] + [TokenType.CONTROL] * 2
    scores = [0.0] * 6
    tokens += ["\n", "\n\n"]
    types += [TokenType.USER_DEFINED] * 2
    scores += [0.0, 0.0]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TokenType.BYTE] * 256
    scores += [0.0] * 256
    tokens += SPM_PIECES
    types += [TokenType.NORMAL] * len(SPM_PIECES)
    scores += [-float(i) for i in range(len(SPM_PIECES))]
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    return len(tokens)


def write_tiny_llama(path: Path, qtype: Q = Q.Q8_0, n_layers: int = 2, seed: int = 0,
                     d_model: int = 256, d_ff: int = 512, tied: bool = True, context_length: int = 256) -> Path:
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    n_heads, n_kv, head_dim = 4, 2, d_model // 4
    w.add_block_count(n_layers)
    w.add_context_length(context_length)
    w.add_embedding_length(d_model)
    w.add_feed_forward_length(d_ff)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    vocab = add_gpt2_tokenizer(w)
    w.add_vocab_size(vocab)
    add_tensor(w, "token_embd.weight", (vocab, d_model), Q.Q8_0, rng)
    if not tied:
        add_tensor(w, "output.weight", (vocab, d_model), Q.Q8_0, rng)
    add_tensor(w, "output_norm.weight", (d_model,), Q.F32, rng)
    for i in range(n_layers):
        p = f"blk.{i}."
        add_tensor(w, p + "attn_norm.weight", (d_model,), Q.F32, rng)
        add_tensor(w, p + "ffn_norm.weight", (d_model,), Q.F32, rng)
        add_tensor(w, p + "attn_q.weight", (n_heads * head_dim, d_model), qtype, rng)
        add_tensor(w, p + "attn_k.weight", (n_kv * head_dim, d_model), qtype, rng)
        add_tensor(w, p + "attn_v.weight", (n_kv * head_dim, d_model), qtype, rng)
        add_tensor(w, p + "attn_output.weight", (d_model, n_heads * head_dim), qtype, rng)
        add_tensor(w, p + "ffn_gate.weight", (d_ff, d_model), qtype, rng)
        add_tensor(w, p + "ffn_up.weight", (d_ff, d_model), qtype, rng)
        add_tensor(w, p + "ffn_down.weight", (d_model, d_ff), qtype, rng)
    _finish(w)
    return Path(path)


def write_tiny_gemma3(path: Path, qtype: Q = Q.Q8_0, n_layers: int = 6, seed: int = 0,
                      sliding_window: int = 4) -> Path:
    rng = np.random.default_rng(seed)
    # head_dim 256 as in the real models: transformers assumes query_pre_attn_scalar=256 for GGUFs
    d_model, d_ff, n_heads, n_kv, head_dim = 256, 512, 2, 1, 256
    w = GGUFWriter(str(path), "gemma3")
    w.add_name("tiny-gemma3")
    w.add_block_count(n_layers)
    w.add_context_length(512)
    w.add_embedding_length(d_model)
    w.add_feed_forward_length(d_ff)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(1_000_000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_sliding_window(sliding_window)
    vocab = add_spm_tokenizer(w)
    add_tensor(w, "token_embd.weight", (vocab, d_model), Q.Q8_0, rng)
    add_tensor(w, "output_norm.weight", (d_model,), Q.F32, rng)
    for i in range(n_layers):
        p = f"blk.{i}."
        for norm in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            add_tensor(w, p + norm + ".weight", (d_model,), Q.F32, rng)
        add_tensor(w, p + "attn_q_norm.weight", (head_dim,), Q.F32, rng)
        add_tensor(w, p + "attn_k_norm.weight", (head_dim,), Q.F32, rng)
        add_tensor(w, p + "attn_q.weight", (n_heads * head_dim, d_model), qtype, rng)
        add_tensor(w, p + "attn_k.weight", (n_kv * head_dim, d_model), qtype, rng)
        add_tensor(w, p + "attn_v.weight", (n_kv * head_dim, d_model), qtype, rng)
        add_tensor(w, p + "attn_output.weight", (d_model, n_heads * head_dim), qtype, rng)
        add_tensor(w, p + "ffn_gate.weight", (d_ff, d_model), qtype, rng)
        add_tensor(w, p + "ffn_up.weight", (d_ff, d_model), qtype, rng)
        add_tensor(w, p + "ffn_down.weight", (d_model, d_ff), qtype, rng)
    _finish(w)
    return Path(path)


def _finish(w: GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
