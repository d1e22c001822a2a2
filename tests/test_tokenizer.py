"""Tokenizers built from GGUF metadata against llama.cpp's ids, decode round trips, streaming."""

import json

import pytest

from conftest import DATA
from jisu.loader import read_gguf
from jisu.loader import GGUFError
from jisu.tokenizer import _BYTE_CHARS, BpeEncoder, IncrementalDecoder, SpmEncoder, Tokenizer

CORPUS = json.loads((DATA / "tokenizer_corpus.json").read_text())
REFERENCE = json.loads((DATA / "llama_cpp_reference.json").read_text())["models"]
NAMES = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma3-270m"}


@pytest.fixture(scope="module", params=list(NAMES))
def tok_and_ref(request):
    path = request.getfixturevalue(f"{request.param}_path")
    return Tokenizer.from_gguf(read_gguf(path)), REFERENCE[NAMES[request.param]]


def test_ids_match_llama_cpp(tok_and_ref):
    tok, ref = tok_and_ref
    mismatches = [(text[:40], tok.encode(text), want)
                  for text, want in zip(CORPUS, ref["token_ids"]) if tok.encode(text) != want]
    assert not mismatches, mismatches[:3]
    assert len(ref["token_ids"]) == len(CORPUS)


def test_bos_as_metadata_says(tok_and_ref):
    tok, ref = tok_and_ref
    text = (DATA / "gpl3_preamble.txt").read_text()
    assert tok.encode(text, add_special=True) == ref["perplexity_tokens"]


@pytest.mark.parametrize("text", CORPUS[:-1])
def test_decode_round_trips(tok_and_ref, text):
    tok, _ = tok_and_ref
    assert tok.decode(tok.encode(text)) == text


def test_streaming_decode_of_split_characters(tok_and_ref):
    tok, _ = tok_and_ref
    text = "Emoji 👨‍👩‍👧‍👦 and 中文字符 and é, cuneiform 𒀀𒀁𒀂 and hieroglyphs 𓀀𓁐𓂀"
    ids = tok.encode(text)
    partial = [i for i in ids if not tok.token_bytes(i).decode("utf-8", errors="ignore")
               and tok.token_bytes(i)]
    assert partial, "expected some tokens that hold only part of a UTF-8 character"
    dec = IncrementalDecoder(tok)
    pieces = [dec.feed(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_special_tokens_parsed_only_when_asked(tok_and_ref):
    tok, _ = tok_and_ref
    marker = "<|im_start|>" if "<|im_start|>" in tok.tokens[:100] else "<start_of_turn>"
    special_id = tok.tokens.index(marker)
    assert special_id not in tok.encode(f"a {marker} b")
    assert special_id in tok.encode(f"a {marker} b", parse_special=True)
    assert tok.decode([special_id]) == "" and tok.decode([special_id], skip_special=False) == marker


def test_chat_templates(smollm2_path, gemma3_path):
    smol = Tokenizer.from_gguf(read_gguf(smollm2_path))
    msgs = [{"role": "user", "content": "Hi there"}]
    text = smol.apply_chat_template(msgs)
    assert "<|im_start|>user\nHi there<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    gem = Tokenizer.from_gguf(read_gguf(gemma3_path))
    text = gem.apply_chat_template([{"role": "system", "content": "Be brief."}] + msgs)
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\n"
    ids = gem.encode(text, add_special=True, parse_special=True)
    assert ids[0] == gem.bos_id and ids.count(gem.bos_id) == 1
    assert gem.tokens.index("<end_of_turn>") in gem.eog_ids
    with pytest.raises(ValueError, match="empty"):
        gem.apply_chat_template([])
    with pytest.raises(ValueError, match="messages\\[0\\]"):
        gem.apply_chat_template([{"role": "user"}])


def test_spm_cuts_only_where_no_piece_straddles():
    """The encoder merges ▁-separated chunks independently; that equals merging the whole text
    only because chunks are rejoined where a piece with an inner "x▁" occurs."""
    tokens = ["<unk>"] + list("abxy▁") + ["▁b", "a▁", "a▁b", "xa", "▁▁", "▁▁b"]
    scores = [0.0, -1, -1, -1, -1, -1, -5.0, -4.0, -2.0, -3.0, -6.0, -7.0]
    enc = SpmEncoder(tokens, scores, unk=0)
    assert enc.straddling == ["a▁", "a▁b"]
    for text in ["xa▁b", "a▁b▁b", "xa▁▁b▁a", "ya▁xa▁▁by", "▁b▁▁b", "bbb▁a▁"]:
        out: list[int] = []
        enc.encode(text, out)
        assert out == enc._merge(text), text
    out = []
    enc.encode("ya▁b", out)
    assert [tokens[i] for i in out] == ["y", "a▁b"]       # cut before ▁, it would be y a ▁b
    out = []
    enc.encode("é", out)                                  # no piece: UTF-8 bytes, unk without byte tokens
    assert out == [0, 0]


def test_spm_empty_text_gets_no_space_prefix(tiny_gemma3_path):
    tok = Tokenizer.from_gguf(read_gguf(tiny_gemma3_path))
    tok._space_prefix = True                              # as a vocab with add_space_prefix would
    assert tok.encode("") == [] and tok.encode("", add_special=True) == [tok.bos_id]
    with_prefix = tok.encode("the")
    tok._space_prefix = False
    assert with_prefix == tok.encode(" the") != []        # llama.cpp: " " prepended to the text


def test_spm_special_tokens_longest_first(tiny_gemma3_path):
    tok = Tokenizer.from_gguf(read_gguf(tiny_gemma3_path))
    nl, nlnl = tok.tokens.index("\n"), tok.tokens.index("\n\n")
    assert tok.encode("a\n\n\nb")[1:3] == [nlnl, nl]       # user-defined: always cut out, longest first
    unk, start = tok.tokens.index("<unk>"), tok.tokens.index("<start_of_turn>")
    assert unk not in tok.encode("<unk>") and tok.encode("<unk>", parse_special=True) == [unk]
    assert tok.encode("x<start_of_turn><unk>", parse_special=True)[-2:] == [start, unk]
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


def _bpe_tokens(enc: BpeEncoder, text: str, vocab: list[str]) -> list[str]:
    out: list[int] = []
    enc.encode(text, out)
    return [vocab[i] for i in out]


def test_bpe_lowest_rank_first_leftmost_on_ties():
    vocab = list(_BYTE_CHARS) + ["aa", "ab", "aab", "Ġa"]
    merges = ["a b", "a a", "aa b", "Ġ a"]             # ranks 0..3
    enc = BpeEncoder(vocab, merges, (r"\S+|\s+",))
    assert _bpe_tokens(enc, "aaa", vocab) == ["aa", "a"]           # ties: the leftmost pair
    assert _bpe_tokens(enc, "aab", vocab) == ["a", "ab"]           # a b (rank 0) before a a (rank 1)
    assert _bpe_tokens(enc, "aaab", vocab) == ["aa", "ab"]
    assert _bpe_tokens(enc, " a", vocab) == ["Ġ", "a"]             # the pattern cut " " from "a"
    assert _bpe_tokens(enc, "é", vocab) == ["Ã", "©"]              # bytes as GPT-2's characters
    with pytest.raises(GGUFError, match="merge 1"):
        BpeEncoder(vocab, ["a b", "b c"], (r"\S+",))                # "bc" is not in the vocab
    whole = BpeEncoder(vocab, merges, (r"\S+|\s+",), ignore_merges=True)
    assert _bpe_tokens(whole, "aab", vocab) == ["aab"]             # llama-bpe: a vocab piece whole


def test_bad_text_and_long_pieces(tok_and_ref):
    tok, _ = tok_and_ref
    with pytest.raises(ValueError, match="not valid Unicode"):
        tok.encode("ab\ud800c")                          # a lone surrogate cannot be UTF-8
    ids = tok.encode(" " * 3000 + "x")
    assert tok.decode(ids) == " " * 3000 + "x"
    assert all(len(k) <= 256 for k in tok._encoder._cache)  # long pieces are not memoized
