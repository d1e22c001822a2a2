"""amx_from(rows): the kernels' AMX switch, set for a block and restored after (tests only)."""

import contextlib

from jisu.kernels import cpu


@contextlib.contextmanager
def amx_from(rows: int):
    """The GEMM and prompt attention take AMX from `rows` rows (0: never) inside the block, where
    the CPU has AMX; elsewhere nothing changes (there is no AMX path to leave)."""
    ops = cpu.load()
    previous = ops.set_amx_min_rows(rows) if getattr(ops, "amx", False) else None
    try:
        yield
    finally:
        if previous is not None:
            ops.set_amx_min_rows(previous)
