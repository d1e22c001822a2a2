"""Tokenizers built from GGUF metadata, matching llama.cpp's token ids.

Two vocab types cover our models:
- "gpt2": byte-level BPE with the merges stored in the file, pre-tokenized by a regex chosen by
  `tokenizer.ggml.pre` (SmolLM2: single digits, then the GPT-2 pattern).
- "llama": SentencePiece-style vocab with scores and byte-fallback tokens (Gemma 3): llama.cpp
  merges the adjacent pair whose merged piece has the highest score (SpmEncoder, ours).
Control tokens are split out of the text only when asked (parse_special), user-defined ones
always, as llama.cpp does. Decoding works on bytes, so a token holding half of a UTF-8
character streams correctly.
"""

from __future__ import annotations

import codecs
import heapq
import re
from array import array
from collections.abc import Sequence

import jinja2
import numpy as np
import regex

from jisu.loader.gguf import GGUFError, GGUFFile

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Pre-tokenizers by `tokenizer.ggml.pre`, as llama.cpp defines them: each is a list of regexes,
# applied in turn; every match (and every stretch between matches) becomes its own piece.
_PRE_TOKENIZERS = {
    "smollm": (r"\p{N}", GPT2_PATTERN),
    "gpt-2": (GPT2_PATTERN,),
    "llama-bpe": (LLAMA3_PATTERN,),
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


_BYTE_CHARS = [_bytes_to_unicode()[b] for b in range(256)]     # byte -> its character in the vocab


_CACHE_MAX = 1 << 16
_CACHE_PIECE_MAX = 256                  # characters


def _merge_memoized(pieces, merge, cache: dict[str, tuple[int, ...]], out: list[int]) -> None:
    """Append each piece's ids (merge(piece), remembered in cache) to out."""
    for piece in pieces:
        ids = cache.get(piece)
        if ids is None:
            ids = merge(piece)
            if len(piece) <= _CACHE_PIECE_MAX:      # a long piece (a whitespace run) is kept whole: not memoized
                if len(cache) >= _CACHE_MAX:
                    cache.clear()
                cache[piece] = tuple(ids)
        out.extend(ids)


class _PairTable:
    """(left id, right id) -> (rank, joined id) for BPE merges: open addressing in two int64
    arrays, ~2 MB for SmolLM2's 48,900 merges where a dict of Python ints took 5.6 MB (97,800
    int objects) and left its construction's fragments behind. A lookup costs ~0.3 us more
    than a dict's; pieces are memoized, so it runs only for text not seen before."""

    _MUL = 0x9E3779B97F4A7C15                   # Fibonacci hashing

    def __init__(self, n: int):
        bits = max(4, (2 * n - 1).bit_length())  # at most half full
        self.mask, self.shift = (1 << bits) - 1, 64 - bits
        self.keys = array("q", bytes(8 << bits))    # key + 1; 0 = empty
        self.values = array("q", bytes(8 << bits))

    def _slot(self, key: int) -> int:
        h = (key * self._MUL & 0xFFFFFFFFFFFFFFFF) >> self.shift
        keys, mask = self.keys, self.mask
        while keys[h] and keys[h] != key + 1:
            h = (h + 1) & mask
        return h

    def setdefault(self, key: int, value: int) -> None:
        h = self._slot(key)
        if not self.keys[h]:
            self.keys[h], self.values[h] = key + 1, value

    def get(self, key: int) -> int:
        """The value, or -1."""
        h = (key * self._MUL & 0xFFFFFFFFFFFFFFFF) >> self.shift
        keys, mask, k = self.keys, self.mask, key + 1
        while True:
            at = keys[h]
            if at == k:
                return self.values[h]
            if not at:
                return -1
            h = (h + 1) & mask


class BpeEncoder:
    """Byte-level BPE ("gpt2" vocab type), as llama.cpp runs it.

    The text is cut by the pre-tokenizer's regexes; each piece starts as one token per UTF-8
    byte, and the adjacent pair with the lowest merge rank joins first (the leftmost on ties)
    until no adjacent pair has a merge. `ignore_merges` (llama-bpe) takes a piece that is a
    vocab token whole. Pieces are memoized. Replaces tokenizers' BPE, which held ~11 MB for
    SmolLM2 and left ~10 MB of freed Python objects from its construction."""

    _BITS = 21                                  # ids below 2M

    def __init__(self, tokens: Sequence[str], merges, pre: tuple[str, ...], ignore_merges: bool = False):
        if len(tokens) >= 1 << self._BITS:
            raise GGUFError(f"BPE vocab of {len(tokens)} tokens is too large (at most {(1 << self._BITS) - 1})")
        vocab = {t: i for i, t in enumerate(tokens)}
        self.byte_ids = [vocab.get(c) for c in _BYTE_CHARS]
        bits = self._BITS
        ranks = _PairTable(len(merges))
        for rank, m in enumerate(merges):
            left, sep, right = m.partition(" ")
            a, b, joined = vocab.get(left), vocab.get(right), vocab.get(left + right)
            if not sep or a is None or b is None or joined is None:
                raise GGUFError(f"BPE merge {rank} ({m!r}) names a token missing from the vocab")
            ranks.setdefault(a << bits | b, rank << bits | joined)
        self.ranks = ranks
        self.whole = vocab if ignore_merges else None
        self.patterns = [regex.compile(p) for p in pre]
        self._cache: dict[str, tuple[int, ...]] = {}

    def _pieces(self, text: str) -> list[str]:
        pieces = [text]
        for pattern in self.patterns:
            cut = []
            for p in pieces:
                pos = 0
                for m in pattern.finditer(p):
                    if m.start() > pos:
                        cut.append(p[pos:m.start()])
                    if m.end() > m.start():
                        cut.append(m.group())
                    pos = m.end()
                if pos < len(p):
                    cut.append(p[pos:])
            pieces = cut
        return pieces

    def encode(self, text: str, out: list[int]) -> None:
        """Append the ids of `text` to out."""
        _merge_memoized(self._pieces(text), self._merge, self._cache, out)

    def _merge(self, piece: str) -> list[int]:
        data = piece.encode()
        if self.whole is not None:
            t = self.whole.get("".join(_BYTE_CHARS[b] for b in data))
            if t is not None:
                return [t]
        ids = [self.byte_ids[b] for b in data]
        if None in ids:
            raise ValueError(f"the vocab has no token for byte(s) of {piece!r}")
        n = len(ids)
        if n < 2:
            return ids
        get, bits, mask = self.ranks.get, self._BITS, (1 << self._BITS) - 1
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap = []
        for i in range(n - 1):
            r = get(ids[i] << bits | ids[i + 1])
            if r >= 0:
                heap.append((r >> bits, i, ids[i], ids[i + 1], r & mask))
        heapq.heapify(heap)
        while heap:
            _, left, a, b, joined = heapq.heappop(heap)
            right = nxt[left]
            if ids[left] != a or right < 0 or ids[right] != b:
                continue                        # a side merged since this pair was queued
            ids[left], ids[right] = joined, -1
            after = nxt[left] = nxt[right]
            if after >= 0:
                prv[after] = left
                r = get(joined << bits | ids[after])
                if r >= 0:
                    heapq.heappush(heap, (r >> bits, left, joined, ids[after], r & mask))
            before = prv[left]
            if before >= 0:
                r = get(ids[before] << bits | joined)
                if r >= 0:
                    heapq.heappush(heap, (r >> bits, before, ids[before], joined, r & mask))
        return [t for t in ids if t >= 0]


class SpmEncoder:
    """llama.cpp's SentencePiece-style tokenizer ("llama" vocab type), without a merge table.

    Each run of text between special tokens starts as one symbol per character; the adjacent
    pair whose joined text is a vocab piece with the highest score merges first (the leftmost
    on ties), until no pair joins to a piece. A character that no piece covers becomes its
    UTF-8 bytes' <0xXX> tokens. A 262k vocab (Gemma 3) needs only a dict of the pieces: as a
    BPE merge table (every two-piece split of every piece, ~515k merges) it cost ~370 MB at
    peak and 0.8 s to load.

    Speed: a merge can only join text across a "x▁" boundary (x not ▁) if some vocab piece
    holds such a boundary (Gemma 3 has one, '>▁</'), so the text is cut before every ▁-run
    that is not inside such a piece's occurrence, and the cut pieces are merged independently
    (a merge in one can never change the pairs of another) and memoized."""

    _CHUNK = re.compile("▁*[^▁]+|▁+")

    def __init__(self, tokens: Sequence[str], scores: array, unk: int | None):
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.scores = scores
        byte_tokens = [self.vocab.get(f"<0x{b:02X}>", self.vocab.get(chr(b)) if b < 128 else None)
                       for b in range(256)]
        self.byte_ids = [t if t is not None else unk for t in byte_tokens]
        # pieces that straddle a "x▁" boundary: text is never cut inside one of their occurrences
        # (str.find first: 262k regex searches took 0.09 s of a Gemma load, this 0.02)
        straddles = re.compile("[^▁]▁").search
        self.straddling = [t for t in self.vocab if t.find("▁", 1) > 0 and straddles(t)]
        self._cache: dict[str, tuple[int, ...]] = {}

    def encode(self, text: str, out: list[int]) -> None:
        """Append the ids of `text` (spaces already escaped to ▁) to out."""
        if not text:
            return
        if len(self.straddling) > 64:          # too many to search for: one chunk, not memoized
            out.extend(self._merge(text))
            return
        chunks = self._CHUNK.findall(text)
        if any(p in text for p in self.straddling):
            chunks = self._rejoin(text, chunks)
        _merge_memoized(chunks, self._merge, self._cache, out)

    def _rejoin(self, text: str, chunks: list[str]) -> list[str]:
        inside = set()                          # cut positions inside a straddling piece
        for p in self.straddling:
            at = text.find(p)
            while at >= 0:
                inside.update(range(at + 1, at + len(p)))
                at = text.find(p, at + 1)
        joined, pos = [chunks[0]], len(chunks[0])
        for c in chunks[1:]:
            if pos in inside:
                joined[-1] += c
            else:
                joined.append(c)
            pos += len(c)
        return joined

    def _merge(self, s: str) -> list[int]:
        vocab, scores = self.vocab, self.scores
        n = len(s)
        # symbol i starts at character i (a merge absorbs the right symbol into the left one)
        size = [1] * n
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap = []
        for i in range(n - 1):
            t = vocab.get(s[i:i + 2])
            if t is not None:
                heap.append((-scores[t], i, i + 1, 2))
        heapq.heapify(heap)
        while heap:
            _, left, right, joined = heapq.heappop(heap)
            if size[left] == 0 or size[right] == 0 or size[left] + size[right] != joined:
                continue                        # one side merged since this pair was queued
            size[left], size[right] = joined, 0
            after = nxt[left] = nxt[right]
            if after >= 0:
                prv[after] = left
            before = prv[left]
            if before >= 0:
                t = vocab.get(s[before:left + joined])
                if t is not None:
                    heapq.heappush(heap, (-scores[t], before, left, size[before] + joined))
            if after >= 0:
                t = vocab.get(s[left:after + size[after]])
                if t is not None:
                    heapq.heappush(heap, (-scores[t], left, after, joined + size[after]))
        ids, i = [], 0
        while i >= 0:
            t = vocab.get(s[i:i + size[i]])
            if t is not None:
                ids.append(t)
            else:                               # a character no piece covers: its bytes
                ids.extend(self.byte_ids[b] for b in s[i:i + size[i]].encode())
            i = nxt[i]
        return ids


class _Specials:
    """Cuts special-token text out of a string as llama.cpp does: the longest token first, each
    at all its non-overlapping occurrences, left to right."""

    def __init__(self, tokens: Sequence[str], ids: list[int]):
        self.ids = {tokens[i]: i for i in ids if tokens[i]}
        # an occurrence can start only where a token's first two characters (or a one-character
        # token) appear: those index the lengths to try
        self.singles = {t for t in self.ids if len(t) == 1}
        self.lengths: dict[str, list[int]] = {}
        for t in self.ids:
            if len(t) > 1:
                self.lengths.setdefault(t[:2], []).append(len(t))
        for v in self.lengths.values():
            v.sort(reverse=True)
        firsts = {t[0] for t in self.ids}
        self.starts = re.compile("[" + "".join(re.escape(c) for c in sorted(firsts)) + "]") if firsts else None

    def split(self, text: str) -> list[str | int]:
        """text as a list of plain-text pieces (str) and special token ids (int)."""
        if self.starts is None:
            return [text]
        found = set()
        for m in self.starts.finditer(text):
            at = m.start()
            if text[at] in self.singles:
                found.add(text[at])
            for n in self.lengths.get(text[at:at + 2], ()):
                if text[at:at + n] in self.ids:
                    found.add(text[at:at + n])
        if not found:
            return [text]
        parts: list[str | int] = [text]
        for tok in sorted(found, key=lambda t: (-len(t), self.ids[t])):
            tid, cut = self.ids[tok], []
            for p in parts:
                if isinstance(p, int):
                    cut.append(p)
                    continue
                at, pos = p.find(tok), 0
                while at >= 0:
                    if at > pos:
                        cut.append(p[pos:at])
                    cut.append(tid)
                    pos = at + len(tok)
                    at = p.find(tok, pos)
                if pos < len(p):
                    cut.append(p[pos:])
            parts = cut
        return parts


class Tokenizer:
    def __init__(self, encoder: BpeEncoder | SpmEncoder, piece_bytes, types: bytes, *,
                 space_prefix: bool = False, bos_id: int | None, eos_id: int | None, add_bos: bool, add_eos: bool,
                 chat_template: str | None, tokens: Sequence[str]):
        self._encoder = encoder
        self._piece_bytes = piece_bytes     # id -> bytes, computed per call: a list cost 12 MB for 262k
        self._types = types
        self.tokens = tokens
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos, self.add_eos = add_bos, add_eos
        self.chat_template = chat_template
        self.vocab_size = len(tokens)
        ids = {tokens[i]: i for i in range(len(tokens)) if types[i] == CONTROL}   # reads only those pieces
        self.eog_ids = {i for i in (eos_id,) if i is not None} | {ids[t] for t in _EOG_TEXTS if t in ids}
        self._template = None
        self._space_prefix = space_prefix
        # special tokens cut out as llama.cpp does: user-defined ones always, control ones when asked
        self._specials = {parse: _Specials(tokens, [i for i, t in enumerate(types) if t == USER_DEFINED
                                                    or (parse and t in (CONTROL, UNKNOWN))])
                          for parse in (False, True)}

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, g: GGUFFile) -> "Tokenizer":
        kind = g.require("tokenizer.ggml.model")
        tokens = g.require("tokenizer.ggml.tokens")
        raw_types = g.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))
        if len(raw_types) != len(tokens):
            raise GGUFError(f"{g.path}: tokenizer.ggml.token_type has {len(raw_types)} entries, "
                            f"tokenizer.ggml.tokens has {len(tokens)}")
        types = bytes(int(t) if 0 <= t <= BYTE else 0 for t in raw_types)   # one byte per token

        if kind == "gpt2":
            pre = g.get("tokenizer.ggml.pre", "gpt-2")
            if pre not in _PRE_TOKENIZERS:
                raise GGUFError(f"{g.path}: unsupported tokenizer.ggml.pre '{pre}' "
                                f"(supported: {', '.join(_PRE_TOKENIZERS)})")
            encoder = BpeEncoder(tokens, g.require("tokenizer.ggml.merges"), _PRE_TOKENIZERS[pre],
                                 ignore_merges=(pre == "llama-bpe"))
            decode = {c: b for b, c in enumerate(_BYTE_CHARS)}

            def piece_bytes(i: int) -> bytes:
                if types[i] in (CONTROL, USER_DEFINED):
                    return tokens[i].encode()
                return bytes(decode[c] for c in tokens[i]) if all(c in decode for c in tokens[i]) \
                    else tokens[i].encode()
        elif kind == "llama":
            scores = array("f", np.asarray(g.require("tokenizer.ggml.scores"), dtype=np.float32).tobytes())
            if len(scores) != len(tokens):
                raise GGUFError(f"{g.path}: tokenizer.ggml.scores has {len(scores)} entries, "
                                f"tokenizer.ggml.tokens has {len(tokens)}")
            encoder = SpmEncoder(tokens, scores, g.get("tokenizer.ggml.unknown_token_id"))
            space_prefix = bool(g.get("tokenizer.ggml.add_space_prefix", True))

            def piece_bytes(i: int) -> bytes:
                if types[i] == BYTE:
                    return bytes([int(tokens[i][3:5], 16)])
                if types[i] in (CONTROL, USER_DEFINED):
                    return tokens[i].encode()
                return tokens[i].replace("▁", " ").encode()
        else:
            raise GGUFError(f"{g.path}: unsupported tokenizer.ggml.model '{kind}' (supported: gpt2, llama)")

        if kind == "gpt2":
            space_prefix = False
        return cls(encoder, piece_bytes, types, space_prefix=space_prefix,
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
        if not text.isascii():
            try:
                text.encode()
            except UnicodeEncodeError as e:
                raise ValueError(f"text is not valid Unicode: {e.reason} at position {e.start}") from None
        ids: list[int] = []
        after_special = True                    # llama.cpp: the space prefix goes after a special token
        for part in self._specials[parse_special].split(text):
            if part == "":                      # no fragment for empty text (llama.cpp): no space prefix
                continue
            if isinstance(part, int):
                ids.append(part)
                after_special = True
            elif isinstance(self._encoder, SpmEncoder):
                self._encoder.encode(((" " if self._space_prefix and after_special else "") + part)
                                     .replace(" ", "▁"), ids)
                after_special = False
            else:
                self._encoder.encode(part, ids)
        if add_special:
            if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
                ids = [self.bos_id] + ids
            if self.add_eos and self.eos_id is not None:
                ids = ids + [self.eos_id]
        return ids

    def token_bytes(self, token_id: int, skip_special: bool = True) -> bytes:
        if skip_special and self._types[token_id] == CONTROL:
            return b""
        return self._piece_bytes(token_id)

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
