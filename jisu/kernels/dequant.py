"""Dequantization of GGUF tensors to float32 torch tensors.

The first implementation uses the `gguf` package's numpy reference for every block format, so
our weights are bit-identical to what transformers builds from the same file. Fused quantized
kernels (weights kept quantized) come later and are tested against this.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf.quants import dequantize as _np_dequantize

from jisu.loader.gguf import GGUFError, GGUFTensor


def dequantize(t: GGUFTensor) -> torch.Tensor:
    try:
        arr = _np_dequantize(t.data, t.qtype)
    except NotImplementedError:
        raise GGUFError(f"tensor '{t.name}': quantization type {t.qtype.name} is not supported") from None
    arr = np.ascontiguousarray(arr, dtype=np.float32).reshape(t.shape)
    if not arr.flags.writeable:     # F32 tensors come straight from the read-only mmap
        arr = arr.copy()
    return torch.from_numpy(arr)
