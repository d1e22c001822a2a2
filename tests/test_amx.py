"""The AMX GEMM (bf16 tiles, two products per pair of values, or three with JISU_AMX=exact) and
prompt attention (three products) against float64 references.

Both are on by default where the CPU has AMX (JISU_AMX=0 turns them off; see README, "Prompts of
64 rows and more go through AMX tiles" and "Prompt attention goes through AMX tiles too"), and
the fixture below switches them on whatever the environment says. Only a CPU without AMX (or a
kernel that refuses the tile state) skips these: the int16 GEMM and attention they replace are
tested in test_kernels.py on every AVX-512 machine."""

import os

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from jisu.kernels import cpu
from jisu.kernels.cpu import amx_from
from test_kernels import KERNEL_TYPES, random_weight

ops = cpu.load()
if ops is None or not ops.amx:
    pytest.skip(f"no AMX here (kernels built for {cpu.isa()}{'' if ops else ', not loaded'})", allow_module_level=True)


ROWS = 64   # AMX from this many rows in these tests (the default, AMX_MIN_ROWS, is lower)


@pytest.fixture
def amx():
    with amx_from(ROWS):
        yield


@pytest.fixture
def exact_amx():
    with amx_from(ROWS, exact=True):
        yield


@pytest.fixture
def two_product_amx():
    with amx_from(ROWS, exact=False):
        yield


def bound(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Each product x w is computed as xh wh + xh wl + xl wh with v = vh + vl, vh = bf16(v),
    vl = bf16(v - vh): |v - vh - vl| <= 2^-17 |v|, so a product is off by at most ~2^-15.4 of
    |x w|, plus float32 accumulation over K. The same holds for the two products xh wh + xl wh
    against x times the bf16 weights wh."""
    k = x.shape[1]
    return (2 ** -15 + k * 2 ** -24) * (x.double().abs() @ w.double().abs().t()) + 1e-30


def amx_case(qtype, m):
    k = 2048 if qtype in (Q.Q4_K, Q.Q6_K) else 640
    n = 45 if m % 2 else 61
    q, ref_w = random_weight(qtype, n=n, k=k)
    return q, ref_w, torch.randn(m, k), k


@pytest.mark.parametrize("m", [64, 65, 100, 200])
@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
def test_exact_amx_gemm_within_its_bound(exact_amx, qtype, m):
    """JISU_AMX=exact, every type, rows in whole and part 32-row blocks, a full panel of 32 columns
    and a part-full one: within the split's bound of the float64 product, and 4-10x closer to it
    than the int16 GEMM (whose activations keep ~15 bits per 32-value block)."""
    q, ref_w, x, k = amx_case(qtype, m)
    want = x.double() @ ref_w.double().t()
    got = ops.qmatmul(x, q, int(qtype), k, 2).double()
    assert torch.all((got - want).abs() <= bound(ref_w, x))
    err = (got - want).norm() / want.norm()
    assert err <= 1e-5
    ops.set_amx_min_rows(0)
    int16 = ops.qmatmul(x, q, int(qtype), k, 2).double()
    assert err * 2 <= (int16 - want).norm() / want.norm()


@pytest.mark.parametrize("m", [64, 65, 100, 200])
@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
def test_amx_gemm_is_x_times_bf16_weights(two_product_amx, qtype, m):
    """The default, two products: the float64 product of x with the dequantized weights rounded
    to bf16 (round to nearest even), within the split's bound; so within 2^-8 of the exact product
    (each weight's rounding is at most 2^-8 of it, ~2^-9 RMS), which JISU_AMX=exact computes
    closer."""
    q, ref_w, x, k = amx_case(qtype, m)
    w16 = ops.dequantize(q, int(qtype), k).to(torch.bfloat16).double()
    got = ops.qmatmul(x, q, int(qtype), k, 2).double()
    assert torch.all((got - x.double() @ w16.t()).abs() <= bound(ref_w, x))
    want = x.double() @ ref_w.double().t()
    err = (got - want).norm() / want.norm()
    assert 1e-5 < err <= 2 ** -8
    ops.set_amx_exact(True)
    try:
        exact = ops.qmatmul(x, q, int(qtype), k, 2).double()
    finally:
        ops.set_amx_exact(False)
    assert (exact - want).norm() / want.norm() * 20 <= err


def test_amx_is_on_by_default_from_amx_min_rows():
    """Unless JISU_AMX=0, the GEMM takes AMX from AMX_MIN_ROWS rows (the measured crossover with
    the int16 GEMM: a 32-stream decode step takes AMX, a 16-row one does not), with two products
    unless JISU_AMX=exact."""
    current = ops.set_amx_min_rows(0)
    ops.set_amx_min_rows(current)
    assert current == (0 if os.environ.get("JISU_AMX") == "0" else ops.AMX_MIN_ROWS)
    assert 16 < ops.AMX_MIN_ROWS <= 32
    exact = ops.set_amx_exact(False)
    ops.set_amx_exact(exact)
    assert exact == (os.environ.get("JISU_AMX") == "exact")


def test_amx_from_its_row_count(amx):
    """Fewer rows than set keep the int16 GEMM (the same numbers as with AMX off); from that many
    rows on, AMX (other numbers)."""
    q, _ = random_weight(Q.Q4_1, n=40, k=512)
    x = torch.randn(ROWS, 512)
    below, at = ops.qmatmul(x[:-1], q, int(Q.Q4_1), 512, 2), ops.qmatmul(x, q, int(Q.Q4_1), 512, 2)
    ops.set_amx_min_rows(0)
    assert torch.equal(below, ops.qmatmul(x[:-1], q, int(Q.Q4_1), 512, 2))
    assert not torch.equal(at, ops.qmatmul(x, q, int(Q.Q4_1), 512, 2))
    with pytest.raises(RuntimeError, match="rows must be"):
        ops.set_amx_min_rows(-1)


@pytest.mark.parametrize("exact", [False, True], ids=["two_products", "exact"])
def test_amx_rows_do_not_depend_on_each_other_or_on_threads(exact):
    """A row's outputs are the same bits whatever rows surround it (tile rows are independent) and
    whether one thread packs and multiplies every panel or two take groups of panels in turn
    (each thread's scratch: packed panels with or without lo tiles)."""
    with amx_from(ROWS, exact):
        _rows_and_threads_independent()


def _rows_and_threads_independent():
    q, _ = random_weight(Q.Q4_K, n=300, k=512)
    x = torch.randn(150, 512)
    y = ops.qmatmul(x, q, int(Q.Q4_K), 512, 2)
    perm = torch.randperm(150)
    assert torch.equal(ops.qmatmul(x[perm], q, int(Q.Q4_K), 512, 2), y[perm])
    assert torch.equal(ops.qmatmul(x[:70], q, int(Q.Q4_K), 512, 2), y[:70])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.qmatmul(x, q, int(Q.Q4_K), 512, 2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, y)


def test_amx_non_finite_rows_stay_in_their_row(amx):
    """A NaN or an infinity in one row makes that row's outputs NaN and leaves the others as they
    were."""
    q, _ = random_weight(Q.Q8_0, n=50, k=256)
    x = torch.randn(80, 256)
    clean = ops.qmatmul(x, q, int(Q.Q8_0), 256, 2)
    x[3, 17] = float("nan")
    x[40, 0] = float("inf")
    got = ops.qmatmul(x, q, int(Q.Q8_0), 256, 2)
    assert torch.isnan(got[3]).all() and torch.isnan(got[40]).all()
    keep = [r for r in range(80) if r not in (3, 40)]
    assert torch.equal(got[keep], clean[keep])


@pytest.mark.parametrize("gelu", [False, True])
def test_amx_gated_ffn_and_many_equal_single_calls(amx, gelu):
    """gate and up in one call (act applied as up's tiles are stored) and q/k/v in one call give
    the bits of separate calls (act_mul_ after)."""
    k = 512
    wg, _ = random_weight(Q.Q4_K, n=100, k=k)
    wu, _ = random_weight(Q.Q6_K, n=100, k=k)
    h = torch.randn(96, k)
    g = ops.qmatmul(h, wg, int(Q.Q4_K), k, 2)
    ops.act_mul_(g, ops.qmatmul(h, wu, int(Q.Q6_K), k, 2), gelu)
    assert torch.equal(ops.gated_ffn_i16(h, wg, wu, int(Q.Q4_K), int(Q.Q6_K), k, gelu), g)
    ws = [random_weight(t, n=n, k=k)[0] for t, n in ((Q.Q4_1, 64), (Q.Q4_1, 20), (Q.Q8_0, 33))]
    types = [int(Q.Q4_1), int(Q.Q4_1), int(Q.Q8_0)]
    for y, w, t in zip(ops.qmatmul_many(h, ws, types, k, 2), ws, types):
        assert torch.equal(y, ops.qmatmul(h, w, t, k, 2))


def test_amx_prefill_logits(amx, tiny_llama_path):
    """A tiny model's prompt through AMX (float32 caches, so that the GEMMs make the difference):
    with JISU_AMX=exact the logits within 1e-4 of the float32 path's, at least twice as close as
    the int16 GEMM's; by default (bf16 weights, each within 2^-8 of its value, through every layer
    of a random model) within 1.5e-2."""
    from jisu import LLM
    ids = list(range(3, 100))
    logits = {}
    for label, rows, acts, exact in (("exact", ROWS, "int16", True), ("amx", ROWS, "int16", False),
                                     ("int16", 0, "int16", None), ("float32", 0, "float32", None)):
        with amx_from(rows, exact):
            llm = LLM(str(tiny_llama_path), activations=acts, kv_cache_dtype="float32", enable_prefix_caching=False,
                      progress=False)
            logits[label] = torch.from_numpy(llm.logits(ids)).double()
    ref = logits["float32"]
    err = {k: ((v - ref).norm() / ref.norm()).item() for k, v in logits.items() if k != "float32"}
    assert err["exact"] <= 1e-4 and 2 * err["exact"] <= err["int16"], err     # measured 3.4e-5 and 1.1e-4
    assert err["amx"] <= 1.5e-2, err                                          # measured 5.6e-3


def attention_reference(q, k_cache, v_cache, slots, pos, scale, window):
    """float64 causal attention of q [T, H, D] over the keys in `slots`, as the kernel sees them."""
    keys, values = k_cache[slots].double(), v_cache[slots].double()
    group = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    s = torch.einsum("thd,lhd->htl", q.double(), keys) * scale
    j, p = torch.arange(keys.shape[0])[None, :], pos[:, None]
    visible = (j <= p) & ((j > p - window) if window else True)
    return torch.einsum("htl,lhd->thd", s.masked_fill(~visible[None], float("-inf")).softmax(-1), values)


@pytest.mark.parametrize("t,h,kvh,d,window,past", [
    (96, 9, 3, 64, 0, 0), (100, 9, 3, 64, 0, 300), (77, 4, 2, 128, 50, 190), (40, 8, 8, 64, 0, 5),
    (50, 14, 2, 128, 0, 0), (45, 16, 1, 64, 20, 10), (64, 4, 1, 256, 0, 0), (150, 4, 1, 256, 64, 40)])
def test_amx_prefill_attention_within_1e4_of_float64(amx, t, h, kvh, d, window, past):
    """Prompt attention over float16 caches on AMX tiles (head dims 64 to 256, from 32 new
    tokens): keys in scattered slots, a window, keys from an earlier chunk, 1 to 16 query heads
    per KV head (a task's rows: 63 or 64 of 64), part-full blocks of rows and keys. Within 1e-4
    of float64 (measured <1e-4) where the int16 path is ~2e-3 off, and the same bits on one
    thread (tasks are taken from a shared counter)."""
    torch.manual_seed(t + past)
    length = past + t
    q = torch.randn(t, h, d) * 2
    k_cache = (torch.randn(length + 37, kvh, d) * 2).half()
    v_cache = torch.randn(length + 37, kvh, d).half()
    slots, pos = torch.randperm(length + 37)[:length], torch.arange(past, length)
    want = attention_reference(q, k_cache, v_cache, slots, pos, d ** -0.5, window)
    got = ops.paged_attention_prefill(q, k_cache, v_cache, slots, pos, d ** -0.5, window, True)
    with amx_from(0):
        int16 = ops.paged_attention_prefill(q, k_cache, v_cache, slots, pos, d ** -0.5, window, True)
    assert (got.double() - want).abs().max() < 1e-4
    assert (int16.double() - want).abs().max() > 5e-4       # so the two paths really differ here
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(ops.paged_attention_prefill(q, k_cache, v_cache, slots, pos, d ** -0.5, window, True), got)
    finally:
        torch.set_num_threads(threads)


def test_amx_prefill_attention_keeps_the_int16_path_below_32_tokens(amx):
    """31 new tokens (a decode-sized chunk): the int16 path's bits, AMX on or off."""
    q = torch.randn(31, 9, 64)
    k_cache, v_cache = torch.randn(80, 3, 64).half(), torch.randn(80, 3, 64).half()
    slots, pos = torch.arange(40), torch.arange(9, 40)
    got = ops.paged_attention_prefill(q, k_cache, v_cache, slots, pos, 0.125, 0, True)
    with amx_from(0):
        assert torch.equal(ops.paged_attention_prefill(q, k_cache, v_cache, slots, pos, 0.125, 0, True), got)

