"""empty_huge: the buffers the kernels stream every step (the output matrix's panels) in huge pages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from jisu.kernels.memory import HUGE_PAGE, empty_huge

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def vm_flags(addr: int) -> list[str]:
    """VmFlags of the mapping holding addr, from /proc/self/smaps."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


def test_empty_huge_is_aligned_writable_and_sized():
    n = 3 * HUGE_PAGE + 12345
    t = empty_huge(n)
    assert t.dtype == torch.uint8 and t.shape == (n,) and t.is_contiguous()
    assert t.data_ptr() % HUGE_PAGE == 0
    t.fill_(7)
    t[-1] = 9
    assert int(t[:-1].sum()) == 7 * (n - 1) and int(t[-1]) == 9
    small = empty_huge(1000)
    assert small.shape == (1000,)


def test_empty_huge_advises_whole_huge_pages_only(monkeypatch):
    from jisu.kernels import memory
    calls = []
    monkeypatch.setattr(memory, "_madvise_huge", lambda addr, length: calls.append((addr, length)) or True)
    whole = empty_huge(4 * HUGE_PAGE)
    part = empty_huge(2 * HUGE_PAGE + 4096)           # the partial last page stays small
    empty_huge(HUGE_PAGE - 1)                         # under one huge page: not advised at all
    assert calls == [(whole.data_ptr(), 4 * HUGE_PAGE), (part.data_ptr(), 2 * HUGE_PAGE)]


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(),
                    reason="this kernel offers no transparent huge pages")
def test_empty_huge_asks_for_huge_pages():
    # the advice reaches the kernel: the mapping carries the hg flag (absence is not checked,
    # since freed memory that was advised before may come back in a later allocation)
    t = empty_huge(4 * HUGE_PAGE)
    assert "hg" in vm_flags(t.data_ptr())             # MADV_HUGEPAGE on its mapping
    assert "hg" in vm_flags(t.data_ptr() + 4 * HUGE_PAGE - 1)


def test_output_panels_are_huge_page_buffers(real_llm):
    """Both real models' output matrices (Q8_0) are kept as panels: in an empty_huge buffer. The
    panels' only GEMM is the AVX-512 integer one: AVX2 builds keep the file's blocks."""
    from jisu.kernels import cpu
    from jisu.model.layers import PanelLinear
    out = real_llm.model.output
    ops = cpu.load()
    assert isinstance(out, PanelLinear) == (ops is not None and ops.isa == "avx512")
    if not isinstance(out, PanelLinear):
        return
    assert out.qweight.data_ptr() % HUGE_PAGE == 0
    if THP.exists() and "[never]" not in THP.read_text():
        assert "hg" in vm_flags(out.qweight.data_ptr())
