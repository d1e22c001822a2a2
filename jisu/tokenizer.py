"""Tokenizers built from GGUF metadata, matching llama.cpp's token ids.

Two vocab types cover our models:
- "gpt2": byte-level BPE with the merges stored in the file, pre-tokenized by a regex chosen by
  `tokenizer.ggml.pre` (SmolLM2: single digits, then the GPT-2 pattern).
- "llama": SentencePiece-style vocab with scores and byte-fallback tokens (Gemma 3). llama.cpp
  merges the adjacent pair whose merged piece has the highest score; a BPE whose merges are all
  two-piece splits of every vocab entry, ranked by that entry's score, does the same.
Both run on the Rust `tokenizers` library. Control tokens are split out of the text only when
asked (parse_special), user-defined ones always, as llama.cpp does. Decoding works on bytes, so
a token holding half of a UTF-8 character streams correctly.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from pathlib import Path

import jinja2
from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers

from jisu.loader.gguf import GGUFError, GGUFFile

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Regex pre-tokenizers by `tokenizer.ggml.pre`, as llama.cpp defines them.
_PRE_TOKENIZERS = {
    "smollm": lambda: [pre_tokenizers.Digits(individual_digits=True),
                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)],
    "gpt-2": lambda: [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)],
    "llama-bpe": lambda: [pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)],
}

# End-of-generation markers that chat models emit instead of (or beside) EOS.
_EOG_TEXTS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>", "<|end|>", "<|eom_id|>")

GEMMA_TEMPLATE = """{{ bos_token }}
{%- set sys = '' -%}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set sys = messages[0]['content'] + '\n\n' -%}{%- set messages = messages[1:] -%}
{%- endif -%}
{%- for m in messages -%}
{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}
<start_of_turn>{{ role }}
{{ (sys if loop.first else '') + m['content'] | trim }}<end_of_turn>
{% endfor -%}
{%- if add_generation_prompt -%}<start_of_turn>model
{% endif -%}"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every split of every mergeable piece into two vocab pieces, best-scoring result first."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] not in (BYTE, UNKNOWN)}
    merges = []
    for piece, i in vocab.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((-scores[i], i, vocab[left], left, right))
    merges.sort()
    return [(m[3], m[4]) for m in merges]


def _add_special(hf: HFTokenizer, tokens: list[str], types: list[int]) -> None:
    hf.add_tokens([AddedToken(tokens[i], special=types[i] == CONTROL, normalized=False)
                   for i in range(len(tokens)) if types[i] in (CONTROL, USER_DEFINED)])


def _cached(build, *inputs) -> HFTokenizer:
    """build() once per distinct vocabulary, then from a JSON copy under $JISU_HOME/tokenizers.

    A SentencePiece-style vocab has no merges: generating them from 262k scores (Gemma) takes
    seconds, while loading the serialized tokenizer takes about a third of that. The name hashes
    everything build() reads, then this file's source, so a changed vocab or a changed recipe
    never meets a stale copy; a new copy replaces the same vocab's copies by older recipes."""
    from jisu.registry import jisu_home
    h = hashlib.sha256()
    for x in inputs:
        h.update(json.dumps(x, separators=(",", ":")).encode())
    vocab, recipe = h.hexdigest()[:32], hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    path = jisu_home() / "tokenizers" / f"{vocab}-{recipe}.json"
    try:
        return HFTokenizer.from_str(path.read_text())
    except Exception:                # missing, unreadable or corrupt: rebuild
        pass
    hf = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(hf.to_str())
        os.replace(tmp, path)
        for stale in path.parent.glob("*.json"):    # this vocab by an older recipe, or the old naming
            if stale != path and (stale.name.startswith(f"{vocab}-") or "-" not in stale.name):
                stale.unlink(missing_ok=True)
    except OSError:
        pass                         # a read-only cache only costs speed
    return hf


class Tokenizer:
    def __init__(self, hf: HFTokenizer, token_bytes: list[bytes], types: list[int], *,
                 bos_id: int | None, eos_id: int | None, add_bos: bool, add_eos: bool,
                 chat_template: str | None, tokens: list[str]):
        self._hf = hf
        self._token_bytes = token_bytes
        self._types = types
        self.tokens = tokens
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos, self.add_eos = add_bos, add_eos
        self.chat_template = chat_template
        self.vocab_size = len(tokens)
        ids = {t: i for i, t in enumerate(tokens) if types[i] == CONTROL}
        self.eog_ids = {i for i in (eos_id,) if i is not None} | {ids[t] for t in _EOG_TEXTS if t in ids}
        self._template = None

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, g: GGUFFile) -> "Tokenizer":
        kind = g.require("tokenizer.ggml.model")
        tokens = list(g.require("tokenizer.ggml.tokens"))
        types = [int(t) for t in g.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))]
        if len(types) != len(tokens):
            raise GGUFError(f"{g.path}: tokenizer.ggml.token_type has {len(types)} entries, "
                            f"tokenizer.ggml.tokens has {len(tokens)}")
        vocab = {t: i for i, t in enumerate(tokens)}

        if kind == "gpt2":
            pre = g.get("tokenizer.ggml.pre", "gpt-2")
            if pre not in _PRE_TOKENIZERS:
                raise GGUFError(f"{g.path}: unsupported tokenizer.ggml.pre '{pre}' "
                                f"(supported: {', '.join(_PRE_TOKENIZERS)})")
            merges = [tuple(m.split(" ", 1)) for m in g.require("tokenizer.ggml.merges")]
            hf = HFTokenizer(models.BPE(vocab, merges, ignore_merges=(pre == "llama-bpe")))
            hf.pre_tokenizer = pre_tokenizers.Sequence(_PRE_TOKENIZERS[pre]())
            decode = {c: b for b, c in _bytes_to_unicode().items()}

            def piece_bytes(i: int) -> bytes:
                if types[i] in (CONTROL, USER_DEFINED):
                    return tokens[i].encode()
                return bytes(decode[c] for c in tokens[i]) if all(c in decode for c in tokens[i]) \
                    else tokens[i].encode()
        elif kind == "llama":
            scores = [float(s) for s in g.require("tokenizer.ggml.scores")]
            unk = g.get("tokenizer.ggml.unknown_token_id")
            space_prefix = bool(g.get("tokenizer.ggml.add_space_prefix", True))

            def build() -> HFTokenizer:
                hf = HFTokenizer(models.BPE(vocab, _spm_merges(tokens, scores, types), byte_fallback=True,
                                            unk_token=tokens[unk] if unk is not None else None))
                norm = [normalizers.Replace(" ", "▁")]
                if space_prefix:
                    norm.insert(0, normalizers.Prepend("▁"))
                hf.normalizer = normalizers.Sequence(norm)
                _add_special(hf, tokens, types)
                return hf
            hf = _cached(build, tokens, scores, types, unk, space_prefix)

            def piece_bytes(i: int) -> bytes:
                if types[i] == BYTE:
                    return bytes([int(tokens[i][3:5], 16)])
                if types[i] in (CONTROL, USER_DEFINED):
                    return tokens[i].encode()
                return tokens[i].replace("▁", " ").encode()
        else:
            raise GGUFError(f"{g.path}: unsupported tokenizer.ggml.model '{kind}' (supported: gpt2, llama)")

        if kind == "gpt2":
            _add_special(hf, tokens, types)
        return cls(hf, [piece_bytes(i) for i in range(len(tokens))], types,
                   bos_id=g.get("tokenizer.ggml.bos_token_id"), eos_id=g.get("tokenizer.ggml.eos_token_id"),
                   add_bos=bool(g.get("tokenizer.ggml.add_bos_token", kind == "llama")),
                   add_eos=bool(g.get("tokenizer.ggml.add_eos_token", False)),
                   chat_template=g.get("tokenizer.chat_template"), tokens=tokens)

    # ---- encode / decode ----------------------------------------------------------------
    def encode(self, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
        """Token ids of `text`. add_special adds BOS/EOS as the model's metadata says;
        parse_special turns control-token text such as "<|im_start|>" into that token."""
        if not isinstance(text, str):
            raise TypeError(f"encode() expects str, got {type(text).__name__}")
        self._hf.encode_special_tokens = not parse_special
        ids = self._hf.encode(text, add_special_tokens=False).ids
        if add_special:
            if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
                ids = [self.bos_id] + ids
            if self.add_eos and self.eos_id is not None:
                ids = ids + [self.eos_id]
        return ids

    def token_bytes(self, token_id: int, skip_special: bool = True) -> bytes:
        if skip_special and self._types[token_id] == CONTROL:
            return b""
        return self._token_bytes[token_id]

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return b"".join(self.token_bytes(i, skip_special) for i in ids).decode("utf-8", errors="replace")

    def is_special(self, token_id: int) -> bool:
        return self._types[token_id] == CONTROL

    # ---- chat ---------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not messages:
            raise ValueError("messages is empty")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be a dict with 'role' and string 'content'")
        if self._template is None:
            env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)

            def raise_exception(msg):
                raise ValueError(f"chat template: {msg}")
            env.globals["raise_exception"] = raise_exception
            src = self.chat_template or (GEMMA_TEMPLATE if "<start_of_turn>" in self.tokens[:300] else None)
            if src is None:
                raise ValueError("this model has no chat template (tokenizer.chat_template is missing)")
            self._template = env.from_string(src)
        special = lambda i: self.tokens[i] if i is not None else ""
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=special(self.bos_id), eos_token=special(self.eos_id))


class IncrementalDecoder:
    """Turns a stream of token ids into text, holding back bytes of an unfinished character."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.token_bytes(token_id, self.skip_special))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
