"""Build a model from a GGUF file: architecture class + weights.

With the C++ kernels, matrices in block formats the kernels know stay quantized (QLinear,
QEmbedding); everything else is dequantized to dense float32 (or `dtype`).
"""

from __future__ import annotations

import re
import warnings

import torch
from gguf import GGMLQuantizationType as Q
from torch import nn

from jisu.config import ModelConfig
from jisu.kernels.dequant import dequantize
from jisu.kernels.memory import empty_huge
from jisu.loader.gguf import GGUFError, GGUFFile, GGUFTensor, release_pages
from jisu.model.gemma3 import Gemma3, Gemma3Block
from jisu.model.layers import Attention, PanelLinear, QEmbedding, QLinear, RMSNorm, Rotary
from jisu.model.llama import Llama, LlamaBlock

ARCHITECTURES: dict[str, type[nn.Module]] = {"llama": Llama, "gemma3": Gemma3}
KERNEL_QTYPES = {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q6_K}

_ATTN = re.compile(r"^(blk\.\d+\.)(attn_(?:q|k|v|output|q_norm|k_norm)\.weight)$")


def _module_name(gguf_name: str) -> str:
    """GGUF tensor name -> our parameter name (attention projections live under `.attn`)."""
    return _ATTN.sub(r"\1attn.\2", gguf_name)


def _qlinear(t: GGUFTensor, ops) -> QLinear:
    # the blocks stay in the file's read-only mmap: no copy, and the page cache holds them once
    # (a copy doubled the resident size: file pages touched while copying + the copy). Nothing
    # ever writes to a weight.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        blocks = torch.from_numpy(t.data)
    return QLinear(blocks.view(t.shape[0], -1), int(t.qtype), t.shape[1], ops)


def _panel_linear(t: GGUFTensor, ops, slice_panels: int = 256) -> PanelLinear:
    """The output matrix repacked into the kernels' panels (PanelLinear), a slice of panels at a
    time, each slice's file pages let go once read: the panels take the file's bytes again, so
    the process never holds both copies (Gemma's 178 MB embedding)."""
    n, k = t.shape
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        blocks = torch.from_numpy(t.data).view(n, -1)
    rows = ops.PANEL_ROWS
    count, width = (n + rows - 1) // rows, k // 32 * ops.PANEL_BLOCK_BYTES
    panels = empty_huge(count * width).view(count, width)     # read whole every step: huge pages
    norms = torch.empty(panels.shape[0], ops.PANEL_NORMS)
    for p0 in range(0, panels.shape[0], slice_panels):
        p1 = min(p0 + slice_panels, panels.shape[0])
        ops.pack_panels(blocks, k, p0, p1, panels, norms)
        release_pages(t, min(p1 * rows, n) * blocks.shape[1])
    return PanelLinear(panels, norms, n, k, ops)


def _panels_apply(name: str, t: GGUFTensor, tied: bool, digits: int, ops) -> bool:
    """Panels for the output matrix (the embedding table too where they are tied) when it is Q8_0
    and the kernels take int16 activations on AVX-512 (the panels' only GEMM is integer)."""
    output = name == "output.weight" or (tied and name == "token_embd.weight")
    return output and t.qtype == Q.Q8_0 and digits == 2 and hasattr(ops, "pack_panels")


ACTIVATIONS = {"float32": 0, "int8": 1, "int16": 2}   # -> the kernels' digits


def activation_digits(activations: str) -> int:
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")
    return ACTIVATIONS[activations]


def load_model(g: GGUFFile, cfg: ModelConfig, max_len: int, dtype: torch.dtype = torch.float32,
               ops=None, activations: str = "float32") -> nn.Module:
    """`ops`: the compiled kernel module, or None for dense weights only. `activations`: how
    one-row (decode) calls to quantized matrices see their input:
    "int16" or "int8" round it per 32 values and dot it in integers (faster), "float32" keeps it
    exact (see kernels/cpu/qmatmul.cpp, XQ)."""
    digits = activation_digits(activations)
    with torch.device("meta"):
        model = ARCHITECTURES[cfg.arch](cfg, max_len)
    expected = {n: p.shape for n, p in model.named_parameters()}
    tied = "output.weight" not in g.tensors
    if tied:
        expected.pop("output.weight")

    state, quantized = {}, {}
    for name, t in g.tensors.items():
        ours = _module_name(name)
        if ours not in expected:
            raise GGUFError(f"{g.path}: unexpected tensor '{name}' for architecture '{cfg.arch}'")
        if tuple(expected[ours]) != t.shape:
            raise GGUFError(f"{g.path}: tensor '{name}' has shape {list(t.shape)}, "
                            f"expected {list(expected[ours])}")
        if ops is not None and t.qtype in KERNEL_QTYPES and len(t.shape) == 2:
            quantized[ours.removesuffix(".weight")] = (_panel_linear(t, ops) if _panels_apply(name, t, tied, digits, ops)
                                                      else _qlinear(t, ops))
            continue
        w = dequantize(t)
        # dense matrices are kept column-major (a transposed view of W^T): MKL's x @ W^T with
        # W^T contiguous is up to 1.6x faster for one-token decode here than with W row-major
        state[ours] = w.to(dtype).t().contiguous().t() if w.ndim == 2 else w
    missing = sorted(set(expected) - set(state) - {f"{m}.weight" for m in quantized})
    if missing:
        raise GGUFError(f"{g.path}: missing tensor(s) {', '.join(missing[:5])}"
                        + (" ..." if len(missing) > 5 else ""))

    for path, qlinear in quantized.items():
        parent, _, attr = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, attr, QEmbedding(qlinear) if attr == "token_embd" else qlinear)
        qlinear.act_digits = digits
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        if isinstance(model.token_embd, QEmbedding):
            model.output = model.token_embd.table
        else:
            model.output.weight = model.token_embd.weight
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, (RMSNorm, Attention, Rotary, LlamaBlock, Gemma3Block)):
            m.ops = ops
    if ops is not None and hasattr(ops, "decode_layers"):
        from jisu.model.fused import attach
        attach(model, ops)
    assert not any(p.is_meta for p in model.parameters()), "a parameter was left unloaded"
    return model.eval()
