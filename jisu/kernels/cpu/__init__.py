"""CPU kernels in C++ (qmatmul.cpp), compiled on first use and cached under $JISU_HOME.

`load()` returns the compiled module, or None where it cannot be used (no AVX2/FMA/F16C, no
compiler, JISU_KERNELS=torch); callers then fall back to the pure-PyTorch path.

The source is compiled for the CPU it runs on: AVX2 + FMA + F16C always, and AVX-512 (F, BW,
VL, DQ) with VNNI where the CPU has them, which adds the integer GEMM for many rows and VNNI dot
products for one or two. `JISU_ISA=avx2` builds the AVX2 variant on any CPU (tests compare the
two). The ISA is part of the cache key, so a home directory shared by machines keeps both.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from pathlib import Path

SOURCE = Path(__file__).with_name("qmatmul.cpp")
REQUIRED_FLAGS = ("avx2", "fma", "f16c")
AVX512_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")
AMX_FLAGS = AVX512_FLAGS + ("avx512_bf16", "amx_tile", "amx_bf16")
_AVX512 = ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"]
ISA_CFLAGS = {"avx2": ["-mavx2", "-mfma", "-mf16c"],
              "avx512": _AVX512,
              "amx": _AVX512 + ["-mavx512bf16", "-mamx-tile", "-mamx-bf16"]}
_module = None
_tried = False
load_error: str | None = None


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa() -> str:
    """The instruction set the kernels are built for here: "amx" (AVX-512 with VNNI, BF16 and
    AMX tiles), "avx512" (with VNNI) or "avx2"; JISU_ISA picks a lower one."""
    forced = os.environ.get("JISU_ISA", "auto")
    if forced not in ("auto", "avx2", "avx512", "amx"):
        raise ValueError(f"JISU_ISA must be auto, avx2, avx512 or amx, got {forced!r}")
    flags = cpu_flags()
    for name, needed in (("amx", AMX_FLAGS), ("avx512", AVX512_FLAGS)):
        if forced == name and not all(f in flags for f in needed):
            raise RuntimeError(f"JISU_ISA={name}, but this CPU lacks {', '.join(f for f in needed if f not in flags)}")
    if forced != "auto":
        return forced
    if all(f in flags for f in AMX_FLAGS):
        return "amx"
    return "avx512" if all(f in flags for f in AVX512_FLAGS) else "avx2"


def load():
    global _module, _tried, load_error
    if _tried:
        return _module
    _tried = True
    if os.environ.get("JISU_KERNELS", "auto") == "torch":
        load_error = "disabled by JISU_KERNELS=torch"
        return None
    missing = [f for f in REQUIRED_FLAGS if f not in cpu_flags()]
    if missing:
        load_error = f"CPU lacks {', '.join(missing)}"
        return None
    import torch

    from jisu.registry import jisu_home
    src = SOURCE.read_text()
    target = isa()
    tag = hashlib.sha256((src + torch.__version__ + sys.version + target).encode()).hexdigest()[:16]
    build_dir = jisu_home() / "kernels" / f"qmatmul-{target}-{tag}"
    build_dir.mkdir(parents=True, exist_ok=True)
    built = build_dir / "jisu_qmatmul.so"
    if built.is_file():
        # already compiled for this source, torch and Python: import it directly, which skips
        # cpp_extension's imports and ninja check (~1.5 s of cold start)
        try:
            import importlib.util
            spec = importlib.util.spec_from_file_location("jisu_qmatmul", built)
            _module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(_module)
            return _module
        except ImportError:
            _module = None
    print(f"jisu: compiling CPU kernels for {target} (first use only, ~40 s) ...", file=sys.stderr, flush=True)
    try:
        from torch.utils import cpp_extension
        _module = cpp_extension.load(
            name="jisu_qmatmul", sources=[str(SOURCE)], build_directory=str(build_dir),
            extra_cflags=["-O3", *ISA_CFLAGS[target], "-fopenmp"], extra_ldflags=["-fopenmp"],
            verbose=False)
    except Exception as e:   # no compiler, no ninja, ...: the torch path still works
        lines = str(e).strip().splitlines() or [""]
        first_error = next((ln for ln in lines if "error:" in ln), lines[-1])
        load_error = f"{type(e).__name__}: {first_error.strip()}"
        print(f"jisu: CPU kernels unavailable ({load_error}); using the PyTorch path", file=sys.stderr)
        _module = None
    return _module


@contextlib.contextmanager
def amx_from(rows: int, exact: bool | None = None):
    """The GEMM and prompt attention take AMX from `rows` rows (0: never) inside the block, where
    the CPU has AMX, with the GEMM's third product (the weights' lo tiles) on or off where `exact`
    says (None: as it was); the switches are process-wide and restored after. Elsewhere nothing
    changes (there is no AMX path to leave)."""
    ops = load()
    on = getattr(ops, "amx", False)
    previous = ops.set_amx_min_rows(rows) if on else None
    was_exact = ops.set_amx_exact(exact) if on and exact is not None else None
    try:
        yield
    finally:
        if previous is not None:
            ops.set_amx_min_rows(previous)
        if was_exact is not None:
            ops.set_amx_exact(was_exact)
