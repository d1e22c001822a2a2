"""GGUF reader and dequantization on tiny files written with the `gguf` package."""

import struct

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize

from gguf_factory import random_quant_bytes, write_tiny_llama
from jisu.kernels.dequant import dequantize
from jisu.loader import GGUFError, read_gguf
from jisu.config import ModelConfig

QTYPES = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q6_K]


def write_one(path, qtype, shape=(8, 512), seed=None):
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), "llama")
    data = random_quant_bytes(shape, qtype, rng)
    if qtype in (Q.F32, Q.F16):
        w.add_tensor("t", data)
    else:
        w.add_tensor("t", data, raw_dtype=qtype)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return data


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_dequantize_matches_gguf_reference(tmp_path, qtype):
    raw = write_one(tmp_path / "t.gguf", qtype)       # fresh random data every run
    t = read_gguf(tmp_path / "t.gguf").tensors["t"]
    assert t.qtype == qtype and t.shape == (8, 512)
    ours = dequantize(t)
    assert ours.dtype == torch.float32 and ours.shape == (8, 512)
    if qtype == Q.F32:
        ref = raw
    elif qtype == Q.F16:
        ref = raw.astype(np.float32)
    else:
        ref = gguf_dequantize(raw, qtype)
    ref = np.asarray(ref, dtype=np.float32).reshape(8, 512)
    np.testing.assert_array_equal(ours.numpy(), ref)
    assert np.isfinite(ref).all() and np.abs(ref).max() > 0


def test_q8_0_and_q4_0_by_hand(tmp_path):
    """Independent of gguf's dequantizer: the block formulas, written out."""
    raw = write_one(tmp_path / "q8.gguf", Q.Q8_0, shape=(2, 64))
    blocks = raw.reshape(-1, 34)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    want = (d * q).reshape(2, 64)
    got = dequantize(read_gguf(tmp_path / "q8.gguf").tensors["t"]).numpy()
    np.testing.assert_array_equal(got, want)

    raw = write_one(tmp_path / "q4.gguf", Q.Q4_0, shape=(2, 64))
    blocks = raw.reshape(-1, 18)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    qs = blocks[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32) - 8
    got = dequantize(read_gguf(tmp_path / "q4.gguf").tensors["t"]).numpy()
    np.testing.assert_array_equal(got, (d * q).reshape(2, 64))


def test_reads_metadata(tiny_llama_path):
    g = read_gguf(tiny_llama_path)
    assert g.metadata["general.architecture"] == "llama"
    assert g.metadata["llama.block_count"] == 2
    cfg = ModelConfig.from_gguf(g)
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (2, 256, 4, 2, 64)
    assert g.tensors["blk.0.ffn_down.weight"].shape == (256, 512)


# ---- corrupt files: clear errors naming the file and the field/tensor ------------------

def test_truncated_tensor_data(tmp_path, tiny_llama_path):
    data = tiny_llama_path.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:-1000])
    with pytest.raises(GGUFError, match=r"cut\.gguf: file truncated: tensor '[\w.]+'"):
        read_gguf(bad)


@pytest.mark.parametrize("keep", [3, 10, 30, 200, 2000])
def test_truncated_header(tmp_path, tiny_llama_path, keep):
    bad = tmp_path / "short.gguf"
    bad.write_bytes(tiny_llama_path.read_bytes()[:keep])
    with pytest.raises(GGUFError, match=r"short\.gguf"):
        read_gguf(bad)


def test_bad_magic(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGML" + bytes(100))
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf(bad)


def test_missing_file(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        read_gguf(tmp_path / "nope.gguf")


def _patch_u32_after(data: bytes, marker: bytes, offset: int, value: int) -> bytes:
    i = data.index(marker) + len(marker) + offset
    return data[:i] + struct.pack("<I", value) + data[i + 4:]


def test_unknown_quant_type(tmp_path, tiny_llama_path):
    data = tiny_llama_path.read_bytes()
    # tensor info: name, n_dims (u32), dims (u64 * n), type (u32)
    name = b"blk.0.attn_q.weight"
    i = data.index(name) + len(name)
    n_dims = struct.unpack("<I", data[i:i + 4])[0]
    bad = tmp_path / "q.gguf"
    bad.write_bytes(_patch_u32_after(data, name, 4 + 8 * n_dims, 250))
    with pytest.raises(GGUFError, match=r"q\.gguf: tensor 'blk\.0\.attn_q\.weight' has unknown quantization type id 250"):
        read_gguf(bad)


def test_absurd_string_length(tmp_path, tiny_llama_path):
    data = tiny_llama_path.read_bytes()
    key = b"general.architecture"
    i = data.index(key) + len(key) + 4          # skip the value type; the string length follows
    bad = tmp_path / "len.gguf"
    bad.write_bytes(data[:i] + struct.pack("<Q", 1 << 60) + data[i + 8:])
    with pytest.raises(GGUFError, match=r"len\.gguf: file truncated or corrupt while reading .*general\.architecture"):
        read_gguf(bad)


def _vocab_entry_offset(data: bytes, token: bytes) -> int:
    """Offset of the u64 length before `token` inside tokenizer.ggml.tokens."""
    i = data.index(struct.pack("<Q", len(token)) + token)
    assert i > data.index(b"tokenizer.ggml.tokens")
    return i


def test_vocab_string_length_past_the_end(tmp_path, tiny_llama_path):
    data = tiny_llama_path.read_bytes()
    g = read_gguf(tiny_llama_path)
    tok = g.metadata["tokenizer.ggml.tokens"][5].encode()
    i = _vocab_entry_offset(data, tok)
    bad = tmp_path / "vocab.gguf"
    bad.write_bytes(data[:i] + struct.pack("<Q", 1 << 40) + data[i + 8:])
    with pytest.raises(GGUFError, match=r"vocab\.gguf: file truncated or corrupt while reading metadata field 'tokenizer\.ggml\.tokens'\[5\]"):
        read_gguf(bad)


def test_vocab_string_not_utf8(tmp_path, tiny_llama_path):
    data = tiny_llama_path.read_bytes()
    g = read_gguf(tiny_llama_path)
    k = next(k for k, t in enumerate(g.metadata["tokenizer.ggml.tokens"]) if len(t.encode()) >= 2)
    tok = g.metadata["tokenizer.ggml.tokens"][k].encode()
    i = _vocab_entry_offset(data, tok) + 8
    bad = tmp_path / "utf.gguf"
    bad.write_bytes(data[:i] + b"\xff" + data[i + 1:])
    with pytest.raises(GGUFError, match=r"utf\.gguf: metadata field 'tokenizer\.ggml\.tokens'\[\d+\] is not valid UTF-8"):
        read_gguf(bad)


def test_unknown_architecture(tmp_path):
    path = tmp_path / "arch.gguf"
    w = GGUFWriter(str(path), "mamba9")
    w.add_tensor("t", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    g = read_gguf(path)
    with pytest.raises(GGUFError, match=r"arch\.gguf: unknown architecture 'mamba9'"):
        ModelConfig.from_gguf(g)


def test_missing_tensor_is_named(tmp_path):
    from jisu.model import load_model
    path = write_tiny_llama(tmp_path / "m.gguf")
    g = read_gguf(path)
    del g.tensors["blk.1.ffn_up.weight"]
    with pytest.raises(GGUFError, match=r"missing tensor\(s\) blk\.1\.ffn_up\.weight"):
        load_model(g, ModelConfig.from_gguf(g), 64)


def test_llm_rejects_corrupt_file_cleanly(tmp_path, tiny_llama_path):
    from jisu import LLM
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(tiny_llama_path.read_bytes()[:5000])
    with pytest.raises(GGUFError, match="bad.gguf"):
        LLM(str(bad), progress=False)


def test_vocab_string_cut_inside_a_character(tmp_path):
    # string 0 ends with the first byte of a two-byte character and string 1 is 133 bytes long:
    # its length's first byte, 0x85, would complete the character if the strings were checked
    # as one stretch with the lengths between them
    path = tmp_path / "cut.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_array("tokenizer.ggml.tokens", ["abcé", "y" * 133, "z"])
    w.add_tensor("t", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    assert list(read_gguf(path).metadata["tokenizer.ggml.tokens"]) == ["abcé", "y" * 133, "z"]
    data = path.read_bytes()
    i = data.index("abcé".encode())
    bad = tmp_path / "cut2.gguf"
    bad.write_bytes(data[:i] + b"abab\xc3" + data[i + 5:])
    with pytest.raises(GGUFError, match=r"cut2\.gguf: metadata field 'tokenizer\.ggml\.tokens'\[0\] is not valid UTF-8"):
        read_gguf(bad)


def test_string_arrays_read_as_sequences(tiny_llama_path):
    tokens = read_gguf(tiny_llama_path).metadata["tokenizer.ggml.tokens"]
    as_list = list(tokens)
    assert len(tokens) == len(as_list) > 10
    assert tokens[3] == as_list[3] and tokens[-1] == as_list[-1] and tokens[2:5] == as_list[2:5]
    assert tokens == as_list and tokens.index(as_list[7]) == as_list.index(as_list[7])
    with pytest.raises(IndexError):
        tokens[len(as_list)]
