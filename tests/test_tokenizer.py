"""Tokenizers built from GGUF metadata against llama.cpp's ids, decode round trips, streaming."""

import json

import pytest

from conftest import DATA
from jisu.loader import read_gguf
from jisu.tokenizer import IncrementalDecoder, Tokenizer

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


def test_spm_tokenizer_cache_is_used_and_survives_corruption(tiny_gemma3_path, tmp_path, monkeypatch):
    monkeypatch.setenv("JISU_HOME", str(tmp_path))
    g = read_gguf(tiny_gemma3_path)
    texts = ["hello world", "  leading spaces\n\nand newlines", "ünïcödé ✨"]
    built = Tokenizer.from_gguf(g)
    files = list((tmp_path / "tokenizers").glob("*.json"))
    assert len(files) == 1                                   # written on first build
    cached = Tokenizer.from_gguf(g)
    assert [cached.encode(t) for t in texts] == [built.encode(t) for t in texts]
    files[0].write_text("{not json")                          # a corrupt copy is rebuilt, not trusted
    rebuilt = Tokenizer.from_gguf(g)
    assert [rebuilt.encode(t) for t in texts] == [built.encode(t) for t in texts]
    json.loads(files[0].read_text())                          # and rewritten whole
    vocab = files[0].name.split("-")[0]
    old = files[0].with_name(f"{vocab}-0123456789abcdef.json")   # this vocab, an older recipe
    old.write_text("{}")
    other = files[0].with_name("f" * 32 + "-0123456789abcdef.json")   # another vocab: kept
    other.write_text("{}")
    unnamed = files[0].with_name("0" * 32 + ".json")                 # the old naming: removed
    unnamed.write_text("{}")
    files[0].unlink()
    Tokenizer.from_gguf(g)                                    # rebuilt: the older copy goes
    assert sorted(f.name for f in (tmp_path / "tokenizers").glob("*.json")) == sorted([files[0].name, other.name])
