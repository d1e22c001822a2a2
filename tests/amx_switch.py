"""amx_from(rows, exact): the kernels' AMX switches, set for a block and restored after (tests only)."""

import contextlib

from jisu.kernels import cpu


@contextlib.contextmanager
def amx_from(rows: int, exact: bool | None = None):
    """The GEMM and prompt attention take AMX from `rows` rows (0: never) inside the block, where
    the CPU has AMX, with the GEMM's third product (the weights' lo tiles) on or off where `exact`
    says (None: as it was); elsewhere nothing changes (there is no AMX path to leave)."""
    ops = cpu.load()
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
