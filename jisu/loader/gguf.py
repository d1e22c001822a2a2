"""GGUF file reader: header, metadata and tensor index, with every length checked.

We parse the container ourselves (it is small and simple) so that a truncated or corrupt file
fails with a message naming the file and the field or tensor that is wrong, instead of an
IndexError deep inside a library or an attempt to allocate a terabyte. Tensor data stays
memory-mapped; dequantization is in `jisu.kernels.dequant`.
"""

from __future__ import annotations

import bisect
import math
import os
import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

GGUF_MAGIC = b"GGUF"
MAX_DIMS = 4

# value type id -> (struct format, size) for scalar metadata types
_SCALARS = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
          6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    """A GGUF file is unreadable; the message names the file and the offending field/tensor."""


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]      # numpy order (outermost first), e.g. (out_features, in_features)
    qtype: GGMLQuantizationType
    offset: int                 # absolute offset in the file
    nbytes: int
    data: np.ndarray            # raw bytes (uint8, memory-mapped)


@dataclass
class GGUFFile:
    path: str
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise GGUFError(f"{self.path}: missing metadata field '{key}'")
        return self.metadata[key]


_U64 = struct.Struct("<Q")


class StringArray(Sequence):
    """A metadata array of strings, kept as one bytes object and decoded per item on access.

    A vocabulary as a list of str costs ~60 bytes per entry plus the list (SmolLM2's tokens and
    merges: ~9 MB; Gemma 3's 262k tokens: ~18 MB), and the freed objects of a list built only to
    be read once stay in the process as fragments of Python's allocator. Here: the bytes and
    one 8-byte offset per string. Indexing gives a str, slicing a list."""

    __slots__ = ("_data", "_starts")

    def __init__(self, raw: bytes, starts: array):
        """raw: the strings as the file stores them, each after its u64 length; starts[i]: string
        i's first byte in raw, starts[-1]: one length prefix past the end (so string i is
        raw[starts[i] : starts[i + 1] - 8])."""
        self._data, self._starts = raw, starts

    def __len__(self) -> int:
        return len(self._starts) - 1

    def _bytes(self, i: int) -> bytes:
        return self._data[self._starts[i]:self._starts[i + 1] - 8]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("StringArray index out of range")
        return str(self._bytes(i), "utf-8")

    def __iter__(self):
        data, ends = self._data, self._starts
        for i in range(len(ends) - 1):
            yield str(data[ends[i]:ends[i + 1] - 8], "utf-8")

    def __eq__(self, other) -> bool:
        if isinstance(other, (StringArray, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __repr__(self) -> str:
        return f"StringArray({len(self)} strings)"

    def invalid_utf8(self) -> tuple[int, str] | None:
        """(index, reason) of the first string that is not valid UTF-8, or None. The strings
        decode a few thousand at a time as one stretch with their length prefixes zeroed (a NUL
        is a whole character, so no character can run from one string into the next)."""
        starts = np.frombuffer(self._starts, dtype=np.uint64).astype(np.int64)
        step = 4096
        for lo in range(0, len(starts) - 1, step):
            hi = min(lo + step, len(starts) - 1)
            base = int(starts[lo])
            data = np.frombuffer(self._data, dtype=np.uint8, count=int(starts[hi]) - 8 - base, offset=base).copy()
            data[(starts[lo + 1:hi, None] - 8 - base + np.arange(8)).ravel()] = 0
            try:
                str(data.tobytes(), "utf-8")
            except UnicodeDecodeError as e:
                return bisect.bisect_right(self._starts, base + e.start) - 1, e.reason
        return None


class _Cursor:
    def __init__(self, buf: memoryview, path: str):
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def _truncated(self, n: int, what: str, pos: int) -> GGUFError:
        return GGUFError(f"{self.path}: file truncated or corrupt while reading {what} "
                         f"(need {n} bytes at offset {pos}, file has {self.size})")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > self.size:
            raise self._truncated(n, what, self.pos)
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, vtype: int, what: str):
        fmt, n = _SCALARS[vtype]
        return struct.unpack(fmt, self.take(n, what))[0]

    def u32(self, what: str) -> int:
        return self.scalar(4, what)

    def u64(self, what: str) -> int:
        return self.scalar(10, what)

    def _string_at(self, pos: int, what: str, i: int | None = None) -> tuple[str, int]:
        """The string at pos and the position after it; `what` ([i] appended) names it in errors,
        built only on an error (a 262k-entry vocabulary took ~0.9 s when every entry built its
        label and read through take/scalar, ~0.2 s this way)."""
        if pos + 8 > self.size:
            raise self._truncated(8, f"length of {what if i is None else f'{what}[{i}]'}", pos)
        n = _U64.unpack_from(self.buf, pos)[0]
        pos += 8
        if pos + n > self.size:
            raise self._truncated(n, what if i is None else f"{what}[{i}]", pos)
        try:
            return str(self.buf[pos:pos + n], "utf-8"), pos + n
        except UnicodeDecodeError as e:
            raise GGUFError(f"{self.path}: {what if i is None else f'{what}[{i}]'} is not valid UTF-8 ({e})") from None

    def string(self, what: str) -> str:
        out, self.pos = self._string_at(self.pos, what)
        return out

    def strings(self, count: int, what: str) -> "StringArray":
        starts, pos, size, buf = array("Q", bytes(8 * (count + 1))), self.pos, self.size, self.buf
        unpack = _U64.unpack_from
        for i in range(count):
            if pos + 8 > size:
                raise self._truncated(8, f"length of {what}[{i}]", pos)
            n = unpack(buf, pos)[0]
            if pos + 8 + n > size:
                raise self._truncated(n, f"{what}[{i}]", pos + 8)
            starts[i] = pos + 8 - self.pos          # within the array's bytes
            pos += 8 + n
        starts[count] = pos + 8 - self.pos
        out = StringArray(bytes(buf[self.pos:pos]), starts)
        bad = out.invalid_utf8()
        if bad is not None:
            raise GGUFError(f"{self.path}: {what}[{bad[0]}] is not valid UTF-8 ({bad[1]})")
        self.pos = pos
        return out

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.scalar(vtype, what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            etype = self.u32(f"element type of {what}")
            count = self.u64(f"element count of {what}")
            if etype in _NUMPY:
                size = _SCALARS[etype][1]
                raw = self.take(count * size, what)
                return np.frombuffer(raw, dtype=_NUMPY[etype]).copy()
            if etype == _STRING:
                # each string needs at least 8 bytes for its length: reject absurd counts early
                if count * 8 > self.size - self.pos:
                    raise GGUFError(f"{self.path}: {what} claims {count} strings, more than the file holds")
                return self.strings(count, what)
            if etype == _ARRAY:
                if count > self.size - self.pos or depth >= 8:
                    raise GGUFError(f"{self.path}: {what} claims {count} nested arrays at depth {depth + 1}, "
                                    "more than a valid file holds")
                return [self.value(_ARRAY, f"{what}[{i}]", depth + 1) for i in range(count)]
            raise GGUFError(f"{self.path}: {what} has unknown array element type {etype}")
        raise GGUFError(f"{self.path}: {what} has unknown value type {vtype}")


def tensor_nbytes(shape: tuple[int, ...], qtype: GGMLQuantizationType, path: str, name: str) -> int:
    block, type_size = GGML_QUANT_SIZES[qtype]
    n = math.prod(shape)        # Python ints: a corrupt dim must not wrap around
    if shape and shape[-1] % block:
        raise GGUFError(f"{path}: tensor '{name}' has row length {shape[-1]}, "
                        f"not a multiple of the {qtype.name} block size {block}")
    return n // block * type_size


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's header and tensor index; tensor data is memory-mapped, not read."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise GGUFError(f"{path}: no such file")
    size = os.path.getsize(path)
    if size < 24:
        raise GGUFError(f"{path}: file is {size} bytes, too small to be GGUF")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(mm), path)

    magic = bytes(cur.take(4, "magic"))
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    version = cur.u32("version")
    if version not in (2, 3):
        raise GGUFError(f"{path}: unsupported GGUF version {version} (expected 2 or 3)")
    n_tensors = cur.u64("tensor_count")
    n_kv = cur.u64("kv_count")
    if n_tensors > size or n_kv > size:
        raise GGUFError(f"{path}: header claims {n_tensors} tensors and {n_kv} metadata fields, "
                        "more than the file can hold")

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        vtype = cur.u32(f"type of metadata field '{key}'")
        metadata[key] = cur.value(vtype, f"metadata field '{key}'")

    infos = []
    for i in range(n_tensors):
        name = cur.string(f"name of tensor #{i}")
        n_dims = cur.u32(f"n_dims of tensor '{name}'")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f"{path}: tensor '{name}' has {n_dims} dimensions (expected 1..{MAX_DIMS})")
        dims = [cur.u64(f"dims of tensor '{name}'") for _ in range(n_dims)]
        type_id = cur.u32(f"type of tensor '{name}'")
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise GGUFError(f"{path}: tensor '{name}' has unknown quantization type id {type_id}") from None
        if qtype not in GGML_QUANT_SIZES:
            raise GGUFError(f"{path}: tensor '{name}' has unsupported quantization type {qtype.name}")
        offset = cur.u64(f"data offset of tensor '{name}'")
        infos.append((name, tuple(reversed(dims)), qtype, offset))

    alignment = int(metadata.get("general.alignment", 32))
    if alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{path}: general.alignment is {alignment}, expected a power of two")
    data_start = (cur.pos + alignment - 1) // alignment * alignment

    tensors: dict[str, GGUFTensor] = {}
    for name, shape, qtype, rel in infos:
        if name in tensors:
            raise GGUFError(f"{path}: tensor '{name}' appears twice")
        nbytes = tensor_nbytes(shape, qtype, path, name)
        start = data_start + rel
        if rel % alignment:
            raise GGUFError(f"{path}: tensor '{name}' data offset {rel} is not aligned to {alignment}")
        if start + nbytes > size:
            raise GGUFError(f"{path}: file truncated: tensor '{name}' ({qtype.name}, shape {list(shape)}) "
                            f"needs bytes {start}..{start + nbytes} but the file has {size}")
        tensors[name] = GGUFTensor(name, shape, qtype, start, nbytes, mm[start:start + nbytes])
    _drop_pages(mm, cur.pos)
    return GGUFFile(path, version, metadata, tensors)


def _dontneed(mm, start: int, end: int) -> None:
    """The whole pages of bytes start..end of a memory map (np.memmap or a view of one) leave this
    process's resident set; the mapping stays valid, and a later read faults them back in from
    the file. Best effort: skipped where madvise is missing."""
    import mmap
    raw = getattr(mm, "_mmap", None)
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    if raw is None or last <= first or not hasattr(raw, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    try:
        raw.madvise(mmap.MADV_DONTNEED, first, last - first)
    except (OSError, ValueError):
        pass


def release_pages(t: GGUFTensor, end: int) -> None:
    """Tensor t's first `end` bytes leave the resident set (the loader calls it behind a copy it
    made in another layout), whole pages only."""
    _dontneed(t.data, t.offset, t.offset + min(end, t.nbytes))


def _drop_pages(mm: np.memmap, end: int) -> None:
    """The header's pages are parsed into Python objects and never read again: let them go from
    this process's resident set (SmolLM2's vocab and merges: ~6 MB). Only whole pages before
    `end`; tensor data may share the last one."""
    _dontneed(mm, 0, end)
