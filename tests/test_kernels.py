"""The C++ CPU kernels against the reference dequantize + matmul, on fresh random data each run."""

import math

import numpy as np

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize, quantize

from gguf_factory import random_quant_bytes
from jisu.kernels import cpu
from jisu.kernels.cpu import amx_from
from jisu.model.layers import QLinear

ops = cpu.load()
if ops is None:
    # the kernels are part of the product on any x86 CPU with AVX2; only a CPU without it, or a
    # run that turned them off (JISU_KERNELS=torch: the PyTorch path's own tests), may skip
    assert cpu.load_error and ("CPU lacks" in cpu.load_error or "JISU_KERNELS=torch" in cpu.load_error), \
        f"kernels failed to build: {cpu.load_error}"
    pytest.skip(f"CPU kernels unavailable: {cpu.load_error}", allow_module_level=True)

KERNEL_TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q6_K]


def random_weight(qtype, n=24, k=512):
    raw = random_quant_bytes((n, k), qtype, np.random.default_rng())
    ref = np.asarray(gguf_dequantize(raw, qtype), dtype=np.float32).reshape(n, k)
    return torch.from_numpy(np.ascontiguousarray(raw)).view(n, -1), torch.from_numpy(ref)


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
def test_dequantize_equals_gguf(qtype):
    q, ref = random_weight(qtype)
    ours = ops.dequantize(q, int(qtype), 512)
    # same formula, same float32 operations: exact, except a fused multiply-add may round once
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 33])
@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
def test_qmatmul_equals_dequant_then_matmul(qtype, m):
    q, ref_w = random_weight(qtype)
    x = torch.randn(m, 512)
    want = x.double() @ ref_w.double().t()
    got = QLinear(q, int(qtype), 512, ops)(x)
    assert got.shape == (m, 24) and got.dtype == torch.float32
    # float32 accumulation over 512 products, in a different order than float64
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("m", [1, 7, 8, 9, 13, 33, 70])
@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
def test_qmatmul_kernel_every_row_count(qtype, m):
    # the kernel itself (QLinear hands large m to MKL): one-row, 4-row and panel paths, with
    # 50 weight rows so panels (24 rows) and tiles (4 x 3) end part-full
    q, ref_w = random_weight(qtype, n=50)
    x = torch.randn(m, 512)
    want = x.double() @ ref_w.double().t()
    got = ops.qmatmul(x, q, int(qtype), 512)
    assert got.shape == (m, 50)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("k", [512, 608, 672, 2048, 480, 1216])
@pytest.mark.parametrize("digits", [1, 2])
@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
def test_integer_activations_within_their_rounding_bound(qtype, digits, k, m):
    """One or two rows with activations rounded per 32 values to int8 (digits 1) or int16 (2).

    Rounding moves each x_i by at most amax(block of i) / (2 * 127) for int8, and by at most
    amax / (2 * 127 * 254) for int16; y_n then moves by at most sum_i |w_ni| of that. The test
    allows exactly that bound plus float32 accumulation noise, so a wrong scale, a wrong nibble
    order or a dropped offset term fails it. K = 608 and 672 leave the 512-bit kernel a tail of
    one or two block pairs and one block (super-block types: 768, an odd number of super-blocks);
    480 and 1216 a part-full group of seven and of three pairs, whose scales are read from a
    span that ends inside the row (the last row's: at the end of the tensor)."""
    if qtype in (Q.Q4_K, Q.Q6_K):
        k = -(-k // 256) * 256
    q, ref_w = random_weight(qtype, n=50, k=k)
    x = torch.randn(m, k)
    x[0, 32:64] = 0.0                          # an all-zero block: scale 0
    x[-1, 100] = 40.0                          # an outlier dominating its block
    wants = x.double() @ ref_w.double().t()
    gots = ops.qmatmul(x, q, int(qtype), k, digits).double()
    for xr, want, got in zip(x, wants, gots):
        amax = xr.abs().view(-1, 32).amax(1).repeat_interleave(32).double()
        step = amax / (2 * 127 * (254 if digits == 2 else 1))
        bound = ref_w.double().abs() @ step + 1e-5 * (ref_w.double().abs() @ xr.double().abs())
        assert torch.all((got - want).abs() <= bound), float(((got - want).abs() / bound).max())
        if digits == 2:    # int16 is close to float32 in practice, not just within the bound
            assert (got - want).norm() <= 1e-4 * want.norm()


def test_integer_activations_by_row_count_and_isa():
    """One or two rows: integer activations on any build. Three or more: the int16 GEMM on
    AVX-512 builds, float32 on AVX2 ones."""
    # an AMX build is an AVX-512 build whose GEMM can take bf16 tiles (tests/test_amx.py)
    assert ops.isa == {"amx": "avx512"}.get(cpu.isa(), cpu.isa()) and ops.isa in ("avx2", "avx512")
    assert ops.amx == (cpu.isa() == "amx")
    q, _ = random_weight(Q.Q4_1, n=50)
    x = torch.randn(3, 512)
    many_int = not torch.equal(ops.qmatmul(x, q, int(Q.Q4_1), 512, 2), ops.qmatmul(x, q, int(Q.Q4_1), 512, 0))
    assert many_int == (ops.isa == "avx512")
    for m in (1, 2):
        assert not torch.equal(ops.qmatmul(x[:m], q, int(Q.Q4_1), 512, 2), ops.qmatmul(x[:m], q, int(Q.Q4_1), 512, 0))
    with pytest.raises(RuntimeError, match="digits"):
        ops.qmatmul(x[:1], q, int(Q.Q4_1), 512, 3)


def pow2_steps(x: torch.Tensor, qmax: float) -> torch.Tensor:
    """The int16 rounding's step for each 32-value block of the row x: 2^e, e = frexp's exponent
    of amax / qmax (amax / qmax < 2^e <= 2 amax / qmax; the ratio as the kernel forms it, amax
    times the float32 1 / qmax), at least 2^-126."""
    amax = x.abs().view(-1, 32).amax(1).float()
    _, e = torch.frexp(amax * torch.tensor(1 / qmax, dtype=torch.float32))
    return torch.ldexp(torch.ones_like(amax, dtype=torch.float64), e.clamp(min=-126).double())


@pytest.mark.parametrize("m", [3, 4, 5, 17, 64, 130])
@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
@amx_from(0)     # 64 rows and more take AMX by default where the CPU has it: tests/test_amx.py
def test_int16_gemm_within_its_rounding_bound(qtype, m):
    """Many rows with integer activations (AVX-512 builds: the int16 GEMM; AVX2: float32).

    int16 rounding moves x_i by at most half its block's step: the power of two 2^e with
    amax(block) / qmax < 2^e <= 2 amax / qmax, qmax 32767 (16383 for Q6_K, whose panels carry
    its 16-value scales in the weights); y_n then moves by at most sum_i |w_ni| of that, plus
    float32 accumulation noise. 45 weight rows: one full panel of 32 and a part-full one (13
    columns: its second vector of 16 empty; 29: part-full); m not a multiple of the 4-row tile."""
    k = 2048 if qtype in (Q.Q4_K, Q.Q6_K) else 640
    qmax = 16383 if qtype == Q.Q6_K and ops.isa == "avx512" else 32767
    n = 45 if m % 2 else 61
    q, ref_w = random_weight(qtype, n=n, k=k)
    x = torch.randn(m, k)
    x[0, 32:64] = 0.0                          # an all-zero block: scale 0
    x[-1, 100] = 40.0                          # an outlier dominating its block
    wants = x.double() @ ref_w.double().t()
    for digits in (1, 2):
        gots = ops.qmatmul(x, q, int(qtype), k, digits).double()
        assert gots.shape == (m, n)
        for xr, want, got in zip(x, wants, gots):
            step = pow2_steps(xr, qmax).repeat_interleave(32)
            bound = ref_w.double().abs() @ (step / 2) + 1e-5 * (ref_w.double().abs() @ xr.double().abs())
            assert torch.all((got - want).abs() <= bound), float(((got - want).abs() / bound).max())
            # in proportion to the step (a power of two: up to twice amax / qmax)
            assert (got - want).norm() <= 2e-4 * (32767 / qmax) * want.norm()


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q5_0, Q.Q6_K], ids=lambda q: q.name)
def test_int16_gemm_blocks_far_from_one(qtype):
    """The GEMM scales a block's sums by its power of two with vscalefps: blocks of 1e-12, rows of
    1e-12 and 1e25 keep their relative precision (the step follows each block), within half a step
    of the exact product per value, and a row's outputs do not depend on the other rows."""
    if ops.isa != "avx512":
        return
    k, n, m = 512, 40, 7
    qmax = 16383 if qtype == Q.Q6_K else 32767
    q, ref_w = random_weight(qtype, n=n, k=k)
    x = torch.randn(m, k).double()
    x[1, 64:96] *= 1e-12
    x[2] *= 1e-12
    x[4, 128:160] *= 1e25
    x[5] *= 1e25
    x = x.float()
    want = x.double() @ ref_w.double().t()
    got = ops.qmatmul(x, q, int(qtype), k, 2).double()
    assert torch.isfinite(got).all()
    for r in range(m):
        step = pow2_steps(x[r], qmax)
        bound = ref_w.double().abs() @ (step.repeat_interleave(32) / 2) + 1e-5 * (ref_w.double().abs() @ x[r].double().abs())
        assert torch.all((got[r] - want[r]).abs() <= bound), r
        alone = ops.qmatmul(x[[r, r, r]], q, int(qtype), k, 2)[0].double()     # 3 rows: the GEMM too
        assert torch.equal(alone, got[r]), r


def test_int16_gemm_zero_sums_are_zero_for_every_reader():
    """Columns whose weight codes are all zero (scales -1 and +1) give exactly 0 from the GEMM, so
    its argmax is the first column, as the greedy screen's recompute (which multiplies by the
    activation scale instead of scaling the sums) answers: a scaled zero sum once came out as
    +-1e-42 there and the two disagreed."""
    if ops.isa != "avx512":
        return
    k = 64
    block = lambda d: np.float16(d).tobytes() + bytes(32)
    w = torch.from_numpy(np.frombuffer(block(-1.0) * 2 + block(1.0) * 2, dtype=np.uint8).copy().reshape(2, -1))
    x = torch.randn(4, k)
    y = ops.qmatmul(x, w, int(Q.Q8_0), k, 2)
    assert torch.equal(y, torch.zeros(4, 2))
    assert ops.greedy_rows(x, w, int(Q.Q8_0), k).tolist() == [0, 0, 0, 0]


def q6k_extreme_rows(n, k, sign=1):
    """Q6_K rows whose every value is -128 x (0 - 32) = 4096 (d = sign): the largest int16
    weight the GEMM's panels hold (scale times code)."""
    block = np.zeros(210, dtype=np.uint8)             # ql = qh = 0: codes 0, less 32
    block[192:208] = np.uint8(0x80)                   # 16 scales of -128
    block[208:210] = np.frombuffer(np.float16(sign).tobytes(), dtype=np.uint8)
    return torch.from_numpy(np.tile(block, (n, k // 256)).copy())


@pytest.mark.parametrize("m", [3, 8])
def test_int16_gemm_q6k_extremes_stay_within_int32(m):
    """Largest Q6_K weights against activations that round to the largest code everywhere: a
    32-value block's integer sums reach 16 x 2 x 4096 x 16383 = 2^31 - 2^18, one step from int32's
    limit (codes up to 32767 would wrap). Checked exactly (every value a small integer)."""
    k, n = 512, 40
    for sign in (1, -1):
        q = q6k_extreme_rows(n, k, sign)
        ref = ops.dequantize(q, int(Q.Q6_K), k)
        assert torch.all(ref == 4096.0 * sign)
        x = torch.ones(m, k)
        x[1::2] = -1.0                                # both signs of the sums
        got = ops.qmatmul(x, q, int(Q.Q6_K), k, 2)
        want = (x.double() @ ref.double().t()).float()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)


def test_avx2_build_gives_the_same_numbers(tmp_path):
    """The AVX2 variant (JISU_ISA=avx2, built in a child process) against this build: float32
    paths equal to rounding; integer two-row paths equal bit for bit, one-row paths equal to float32
    summation order (the integer sums are the same; AVX-512 adds two blocks per vector)."""
    if ops.isa != "avx512":
        pytest.skip("this build is the AVX2 one: nothing to compare it with on this CPU")
    import os
    import subprocess
    import sys
    rng_inputs = {}
    for qtype in KERNEL_TYPES:
        q, _ = random_weight(qtype, n=40, k=512)
        rng_inputs[qtype.name] = (q, torch.randn(5, 512))
    attn = (torch.randn(40, 6, 64), torch.randn(300, 2, 64), torch.randn(300, 2, 64), torch.randperm(300)[:50])
    # decode attention: three sequences, 5 query heads per KV head (a 4-head tile and a single
    # head), lengths in whole and part vectors; and act_mul_ with a vector tail
    dec = (torch.randn(3, 10, 64), torch.stack([torch.randperm(300)[:200] for _ in range(3)]), torch.tensor([200, 37, 1]),
           torch.randn(1000), torch.randn(1000))
    torch.save((rng_inputs, attn, dec), tmp_path / "in.pt")
    code = (
        "import sys, torch\n"
        "from gguf import GGMLQuantizationType as Q\n"
        "from jisu.kernels import cpu\n"
        "ops = cpu.load(); assert ops.isa == 'avx2', ops\n"
        "inp, (q, kc, vc, sl), (dq, ds, dl, g, u) = torch.load(sys.argv[1])\n"
        "out = {n: [ops.qmatmul(x[:m], q, int(Q[n]), 512, d) for m in (1, 2, 5) for d in (0, 1, 2)] for n, (q, x) in inp.items()}\n"
        "out['attention'] = ops.paged_attention_prefill(q, kc, vc, sl, torch.arange(10, 50), 0.125, 16)\n"
        "out['decode'] = ops.paged_attention_decode(dq, kc, vc, ds, dl, 0.125, 0)\n"
        "out['act'] = [g.clone(), g.clone()]\n"
        "ops.act_mul_(out['act'][0], u, False); ops.act_mul_(out['act'][1], u, True)\n"
        "torch.save(out, sys.argv[2])\n")
    env = {**os.environ, "JISU_ISA": "avx2"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")], env=env, check=True)
    theirs = torch.load(tmp_path / "out.pt")
    q, kc, vc, sl = attn
    torch.testing.assert_close(ops.paged_attention_prefill(q, kc, vc, sl, torch.arange(10, 50), 0.125, 16),
                               theirs["attention"], rtol=1e-5, atol=1e-6)
    dq, ds, dl, g, u = dec
    torch.testing.assert_close(ops.paged_attention_decode(dq, kc, vc, ds, dl, 0.125, 0), theirs["decode"],
                               rtol=1e-5, atol=1e-6)
    for gelu, want in zip((False, True), theirs["act"]):
        got = g.clone()
        ops.act_mul_(got, u, gelu)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for name, (q, x) in rng_inputs.items():
        ours = [ops.qmatmul(x[:m], q, int(Q[name]), 512, d) for m in (1, 2, 5) for d in (0, 1, 2)]
        for i, (a, b) in enumerate(zip(ours, theirs[name])):
            m, d = (1, 2, 5)[i // 3], i % 3
            if d and m == 2:   # the two-row kernel: same integer sums, same float order
                torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} m={m} digits={d}")
            elif d and m == 1:   # same integer sums; AVX-512 adds the blocks' float terms in another order
                torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6 * b.abs().max().item(), msg=f"{name} m={m} digits={d}")
            else:   # float32 kernels (summation order may differ), and 5 rows int16 vs float32
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item(), msg=f"{name} m={m} digits={d}")


def test_qmatmul_rejects_bad_shapes():
    q, _ = random_weight(Q.Q4_0)
    with pytest.raises(RuntimeError, match="expected"):
        ops.qmatmul(torch.randn(1, 288), q[:, :72].contiguous(), int(Q.Q4_0), 288)
    with pytest.raises(RuntimeError, match="unsupported ggml type"):
        ops.qmatmul(torch.randn(1, 512), q, 99, 512)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_kernel_path_equals_torch_path(tmp_path, arch):
    from gguf_factory import write_tiny_gemma3, write_tiny_llama
    from jisu import LLM, SamplingParams
    writer = write_tiny_llama if arch == "llama" else write_tiny_gemma3
    path = writer(tmp_path / "m.gguf", qtype=Q.Q4_K)
    fast = LLM(str(path), progress=False, kernels=True, activations="float32")   # exact: same numbers
    slow = LLM(str(path), progress=False, kernels=False)
    assert any(isinstance(m, QLinear) for m in fast.model.modules())
    assert not any(isinstance(m, QLinear) for m in slow.model.modules())
    ids = list(range(40, 70))
    np.testing.assert_allclose(fast.logits(ids), slow.logits(ids), rtol=1e-4, atol=1e-4)
    p = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    assert fast.generate("the cat", p)[0].token_ids == slow.generate("the cat", p)[0].token_ids


@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 7, 640), (5, 256), (2, 13)])
def test_rms_norm(shape):
    x, w = torch.randn(shape) * 3, torch.randn(shape[-1])
    want = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    got = ops.rms_norm(x, w, 1e-6)
    assert got.shape == x.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads", [(8, 2, 64), (9, 3, 64), (4, 1, 256), (2, 2, 16)], ids=str)
@pytest.mark.parametrize("window", [0, 5, 40])
@pytest.mark.parametrize("kv", [torch.float32, torch.float16], ids=str)
def test_paged_attention_decode_equals_sdpa(heads, window, kv):
    H, KVH, D = heads
    B, S, L = 5, 300, 70
    k16, v16 = torch.randn(S, KVH, D).to(kv), torch.randn(S, KVH, D).to(kv)    # float16: read as float32
    k_cache, v_cache = k16.float(), v16.float()
    lens = torch.tensor([7, 1, 70, 16, 33])                              # keys in whole and part vectors
    slots = torch.stack([torch.randperm(S)[:L] for _ in range(B)])      # scattered blocks
    q = torch.randn(B, H, D)
    got = ops.paged_attention_decode(q, k16, v16, slots, lens, 0.125, window)
    for b in range(B):
        n = int(lens[b])
        lo = max(0, n - window) if window else 0
        keys = k_cache[slots[b, lo:n]].repeat_interleave(H // KVH, dim=1).transpose(0, 1)   # [H, n, D]
        vals = v_cache[slots[b, lo:n]].repeat_interleave(H // KVH, dim=1).transpose(0, 1)
        want = torch.softmax((q[b][:, None] @ keys.transpose(1, 2)) * 0.125, -1) @ vals
        torch.testing.assert_close(got[b], want[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads", [(9, 3, 64), (4, 1, 256)], ids=str)
@pytest.mark.parametrize("window", [0, 300])
@pytest.mark.parametrize("kv", [torch.float32, torch.float16], ids=str)
def test_paged_attention_decode_long_context_split_over_threads(heads, window, kv):
    """One sequence with few KV heads: its keys are split into parts on several threads and the
    parts' softmaxes merged; the result is attention over all the keys."""
    H, KVH, D = heads
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        S, lens = 3000, torch.tensor([1000, 777])
        k16, v16 = torch.randn(S, KVH, D).to(kv), torch.randn(S, KVH, D).to(kv)
        k_cache, v_cache = k16.float(), v16.float()
        slots = torch.stack([torch.randperm(S)[:1000] for _ in range(2)])
        q = torch.randn(2, H, D)
        for b in (slice(0, 1), slice(0, 2)):
            got = ops.paged_attention_decode(q[b], k16, v16, slots[b], lens[b], D ** -0.5, window)
            for i in range(got.shape[0]):
                n = int(lens[i])
                lo = max(0, n - window) if window else 0
                keys = k_cache[slots[i, lo:n]].repeat_interleave(H // KVH, dim=1).transpose(0, 1)
                vals = v_cache[slots[i, lo:n]].repeat_interleave(H // KVH, dim=1).transpose(0, 1)
                want = torch.softmax((q[i][:, None] @ keys.transpose(1, 2)) * D ** -0.5, -1) @ vals
                torch.testing.assert_close(got[i], want[:, 0], rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


def sdpa_prefill(q, k_cache, v_cache, slots, positions, scale, window):
    """The PyTorch reference: keys gathered, a position mask, torch's attention."""
    H, KVH = q.shape[1], k_cache.shape[1]
    key_pos, q_pos = torch.arange(slots.numel())[None, :], positions[:, None]
    ok = key_pos <= q_pos
    if window:
        ok &= key_pos > q_pos - window
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k_cache[slots].transpose(0, 1)[None], v_cache[slots].transpose(0, 1)[None],
        attn_mask=ok, scale=scale, enable_gqa=H != KVH)
    return out[0].transpose(0, 1)


@pytest.mark.parametrize("heads", [(9, 3, 64), (4, 1, 256), (2, 2, 128)], ids=str)
@pytest.mark.parametrize("t,prior", [(1, 0), (5, 0), (17, 3), (64, 0), (100, 300), (300, 0)], ids=str)
@pytest.mark.parametrize("window", [0, 4, 100])
@pytest.mark.parametrize("kv", [torch.float32, torch.float16], ids=str)
def test_paged_attention_prefill_equals_sdpa(heads, t, prior, window, kv):
    """The float kernel (integer=False; float32 caches always take it) against torch's attention."""
    H, KVH, D = heads
    slots = torch.randperm(1000)[:prior + t]          # keys scattered over the cache
    k16, v16 = torch.randn(1000, KVH, D).to(kv), torch.randn(1000, KVH, D).to(kv)
    k_cache, v_cache = k16.float(), v16.float()
    q, positions = torch.randn(t, H, D), torch.arange(prior, prior + t)
    want = sdpa_prefill(q, k_cache, v_cache, slots, positions, D ** -0.5, window)
    got = ops.paged_attention_prefill(q, k16, v16, slots, positions, D ** -0.5, window, integer=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    if kv == torch.float32 or ops.isa != "avx512":    # integer products only for float16 caches on AVX-512
        got = ops.paged_attention_prefill(q, k16, v16, slots, positions, D ** -0.5, window)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    with pytest.raises(RuntimeError, match="has no key"):
        ops.paged_attention_prefill(q, k_cache, v_cache, slots[:prior + t - 1], positions, 0.1, window)
    with pytest.raises(RuntimeError, match="query heads per KV head"):   # more rows than a task holds
        ops.paged_attention_prefill(torch.randn(t, 80, D), k_cache[:, :1].contiguous(), v_cache[:, :1].contiguous(),
                                    slots, positions, 0.1, 0)
    with pytest.raises(RuntimeError, match="both be float32 or both float16"):
        ops.paged_attention_prefill(q, k16, v_cache.double(), slots, positions, 0.1, window)
    with pytest.raises(RuntimeError, match="both be float32 or both float16"):
        ops.paged_attention_decode(q[:1], k_cache.half(), v_cache, slots[None], torch.tensor([1]), 0.1, window)
    bad = slots.clone()
    bad[-1] = 1000
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.paged_attention_prefill(q, k16, v16, bad, positions, 0.1, window)


def rms(x):
    return float(x.double().pow(2).mean().sqrt())


@pytest.mark.parametrize("path", ["int16", "amx"])
@pytest.mark.parametrize("bad", ["key inf", "value inf", "value nan"])
def test_paged_attention_prefill_integer_non_finite_reaches_only_rows_that_see_it(path, bad):
    """An inf or NaN in one key or value (key 50 of 96, KV head 1), through the int16 path and
    (where the CPU has it) the AMX one: the query heads of that KV head are NaN from row 50 on (a
    float softmax gives inf or NaN there, except for a key whose scores all come out -inf), and
    every other output keeps the clean run's bits. Both paths hold the bad row as zeros: before,
    the int16 path rounded an inf value away (no output non-finite), and in the AMX tiles P = 0
    times inf made rows NaN whose key blocks only reached the bad key."""
    if ops.isa != "avx512":
        pytest.skip("no integer attention on AVX2 builds")
    if path == "amx" and not getattr(ops, "amx", False):
        pytest.skip("no AMX here")
    torch.manual_seed(5)
    q = torch.randn(96, 9, 64)
    k_cache, v_cache = torch.randn(101, 3, 64).half(), torch.randn(101, 3, 64).half()
    slots, pos = torch.arange(96), torch.arange(96)
    with amx_from(0 if path == "int16" else ops.AMX_MIN_ROWS):
        clean = ops.paged_attention_prefill(q, k_cache, v_cache, slots, pos, 0.125, 0)
        cache = k_cache if bad.startswith("key") else v_cache
        cache[50, 1, 3] = float("nan") if bad.endswith("nan") else float("inf")
        got = ops.paged_attention_prefill(q, k_cache, v_cache, slots, pos, 0.125, 0)
    assert torch.isnan(got[50:, 3:6]).all()
    keep = torch.ones(96, 9, dtype=torch.bool)
    keep[50:, 3:6] = False
    assert torch.equal(got[keep], clean[keep])


@pytest.mark.parametrize("heads", [(9, 3, 64), (4, 1, 256), (2, 2, 128)], ids=str)
@pytest.mark.parametrize("t,prior", [(1, 0), (5, 0), (17, 3), (64, 0), (100, 300), (300, 0)], ids=str)
@pytest.mark.parametrize("window", [0, 4, 100])
def test_paged_attention_prefill_integer_products_err_less_than_float16_storage(heads, t, prior, window):
    """AVX-512 builds take float16 caches through int16 products: queries, keys and values, and
    P per row and key block, rounded to integers with scales of their own. Against float64
    attention over the cached (float16) values, that adds less error than storing float32 keys
    and values as float16 did in the first place (measured: at most 0.95 of it, in RMS)."""
    if ops.isa != "avx512":
        pytest.skip("no integer attention on AVX2 builds (the float kernel is tested above)")
    H, KVH, D = heads
    slots = torch.randperm(1000)[:prior + t]
    k, v = torch.randn(1000, KVH, D), torch.randn(1000, KVH, D)
    q, positions = torch.randn(t, H, D), torch.arange(prior, prior + t)
    exact = sdpa_prefill(q.double(), k.double(), v.double(), slots, positions, D ** -0.5, window)
    stored = sdpa_prefill(q.double(), k.half().double(), v.half().double(), slots, positions, D ** -0.5, window)
    with amx_from(0):      # the AMX path: tests/test_amx.py
        got = ops.paged_attention_prefill(q, k.half(), v.half(), slots, positions, D ** -0.5, window)
    assert got.dtype == torch.float32 and got.shape == q.shape
    assert rms(got - stored) <= 1.25 * rms(stored - exact)
    assert float((got - stored).abs().max()) <= 2e-3


@pytest.mark.parametrize("D", [64, 256])
def test_paged_attention_prefill_integer_sums_stay_within_int32(D):
    """The largest codes everywhere: every query value c, every key and value +-1 (each rounds to
    the largest code of its row, 8191), so the integer sums of a score's 32 head dims and of P V's
    block of 32 keys reach 32 x 8191^2 = 2^31 - 524255.
    Scores +-1 (keys alternating in sign), values with their key's sign: the output is tanh(1) in
    every dim; with all keys +1, exactly 1. A wrapped sum would flip signs."""
    if ops.isa != "avx512":
        pytest.skip("no integer attention on AVX2 builds")
    n, c = 96, 3.0
    sign = torch.tensor([1.0, -1.0]).repeat(n // 2)
    for s, want in ((sign, math.tanh(1.0)), (torch.ones(n), 1.0)):
        keys = (s[:, None, None] * torch.ones(n, 1, D)).half()
        q = torch.full((1, 2, D), c)
        got = ops.paged_attention_prefill(q, keys, keys.clone(), torch.arange(n), torch.tensor([n - 1]), 1 / (D * c), 0)
        torch.testing.assert_close(got, torch.full_like(got, want), rtol=0, atol=1e-3)


@pytest.mark.parametrize("window", [0, 2200])
def test_paged_attention_prefill_long_float16_context(window):
    """Float16 keys and values: the float kernel converts them once per call, up to 16 MB of
    float32 copies; past that (here 2300 keys x 8 KV heads x 128: 18 MB) each task converts its
    own blocks. The integer kernel rounds them once per call, up to 32 MB of codes; past that
    (8300 keys with no window: 34 MB) the float kernel takes the call. Against torch's attention, queries not in
    position order."""
    H, KVH, D, prior, t = 8, 8, 128, 8290, 10
    slots = torch.randperm(8400)[:prior + t]
    k16, v16 = torch.randn(8400, KVH, D).half(), torch.randn(8400, KVH, D).half()
    q, positions = torch.randn(t, H, D), torch.arange(prior, prior + t).flip(0)
    for n, integer in ((2300, False), (1810, False), (2300, True), (8300, True)):
        keys = slots[:n]
        pos = positions - (prior - (n - t))
        got = ops.paged_attention_prefill(q, k16, v16, keys, pos, D ** -0.5, window, integer=integer)
        want = sdpa_prefill(q, k16.float(), v16.float(), keys, pos, D ** -0.5, window)
        # rounded to integers (see above) unless the keys in reach need more than 32 MB of codes
        if integer and ops.isa == "avx512" and (n == 2300 or window):
            assert rms(got - want) <= 1e-4 and float((got - want).abs().max()) <= 1e-3
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("n", [1, 7, 300])
@pytest.mark.parametrize("kv", [torch.float32, torch.float16])
def test_write_kv_equals_index_copy(kv, n):
    """New rows into their slots, converted as ATen converts (round to nearest even), the other
    slots untouched; a slot out of range is an error that writes nothing."""
    S, KVH, D = 1000, 3, 64
    k_cache, v_cache = torch.randn(S, KVH, D).to(kv), torch.randn(S, KVH, D).to(kv)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    slots = torch.randperm(S)[:n]
    k, v = torch.randn(n, KVH, D) * 300, torch.randn(1, n, KVH, D)      # values that round in float16
    ops.write_kv_(k_cache, v_cache, slots, k, v)
    want_k.index_copy_(0, slots, k.to(kv))
    want_v.index_copy_(0, slots, v.view(n, KVH, D).to(kv))
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    bad = slots.clone()
    bad[-1] = S
    with pytest.raises(RuntimeError, match="out of"):
        ops.write_kv_(k_cache, v_cache, bad, k + 1, v + 1)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    with pytest.raises(RuntimeError, match="float32"):
        ops.write_kv_(k_cache, v_cache, slots, k.double(), v)


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_equals_torch_path(interleaved):
    from jisu.model.layers import AttentionMetadata, Rotary
    rot = Rotary(64, 10000.0, 100, interleaved)
    positions = torch.randint(0, 100, (2, 3))
    meta = AttentionMetadata(positions, torch.zeros(6, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long),
                             torch.ones(2, dtype=torch.long))
    q, k = torch.randn(2, 3, 8, 64), torch.randn(2, 3, 2, 64)
    want_q, want_k = rot(q, meta), rot(k, meta)
    rot.ops = ops
    got_q, got_k = rot.apply(q.clone(), k.clone(), meta)
    torch.testing.assert_close(got_q, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_k, want_k, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="outside"):
        ops.rope_(q.clone(), k.clone(), torch.full((2, 3), 100), rot.cos, rot.sin, interleaved)


@pytest.mark.parametrize("activations", ["int16", "int8", "float32"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_fused_decode_block_equals_python_block(tmp_path, arch, activations):
    from gguf_factory import write_tiny_gemma3, write_tiny_llama
    from jisu import LLM, SamplingParams
    writer = write_tiny_llama if arch == "llama" else write_tiny_gemma3
    # no prefix caching: the second run must compute its prompts exactly as the first did
    llm = LLM(str(writer(tmp_path / "m.gguf", qtype=Q.Q4_1)), progress=False, kernels=True,
              enable_prefix_caching=False, activations=activations)
    fused = [b.fused for b in llm.model.blk]
    whole = llm.model.fused
    assert all(f is not None for f in fused) and whole is not None
    calls = []
    real = whole.ops
    for f in fused:                    # a block alone: decode_layers with one layer
        f.ops = type("Counting", (), {
            "decode_layer": lambda self, *a: real.decode_layer(*a),
            "decode_layers": lambda self, *a: (calls.append(1), real.decode_layers(*a))[1]})()
    whole.ops = type("Counting", (), {
        "decode_layer": lambda self, *a: real.decode_layer(*a),
        "prefill_layers": lambda self, *a: real.prefill_layers(*a),
        "decode_layers": lambda self, *a: (calls.append(len(fused)), real.decode_layers(*a))[1]})()
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=3)

    def run(prompts, blocks: bool, model: bool):
        calls.clear()
        for b, f in zip(llm.model.blk, fused):
            b.fused = f if blocks else None
        llm.model.fused = whole if model else None
        out = llm.generate(prompts, params, use_tqdm=False)
        return [o.token_ids for o in out], [[lp["logprob"] for lp in o.outputs[0].logprobs] for o in out]

    # three sequences decode together; one or two take the integer one-row / two-row paths; from
    # eight, decode_block runs its row-wise steps in parallel regions
    nine = [f"story {i}:" + " the cat" * i for i in range(9)]
    for prompts in (["the cat sat on the mat", "a b c", "hello there friend"], ["the dog"], ["a b", "the dog"], nine):
        one_call = run(prompts, True, True)
        assert sum(calls) >= 19 * len(fused) and len(calls) < 25     # a decode step = one decode_layers call
        per_block = run(prompts, True, False)
        assert len(calls) >= 19 * len(fused)                          # every block in a call of its own
        python = run(prompts, False, False)
        assert not calls
        # same kernels in the same order: the same tokens and the same numbers
        assert one_call == per_block == python


@pytest.mark.parametrize("activations", ["int16", "float32"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_fused_prefill_equals_python_blocks(tmp_path, arch, activations):
    """A step that is one prompt chunk runs its blocks through prefill_layers (one C++ call) on
    the int16 GEMM: the same kernels in the same order as the Python blocks, so the same logits to
    the bit. Chunks of 96 tokens, then 8 and 2 (the GEMM's slices of up, its short tiles, the two-row
    kernels), attending to earlier chunks' keys (Gemma's sliding window of 4 too); scoring takes
    every block fused, generation keeps the last block in Python for the rows it samples."""
    from gguf_factory import write_tiny_gemma3, write_tiny_llama
    from jisu import LLM, SamplingParams
    writer = write_tiny_llama if arch == "llama" else write_tiny_gemma3
    llm = LLM(str(writer(tmp_path / "m.gguf", qtype=Q.Q4_1)), progress=False, kernels=True,
              enable_prefix_caching=False, activations=activations, max_num_batched_tokens=96)
    whole = llm.model.fused
    real, calls = whole.ops, []
    whole.ops = type("Counting", (), {
        "decode_layer": lambda self, *a: real.decode_layer(*a),
        "decode_layers": lambda self, *a: real.decode_layers(*a),
        "prefill_layers": lambda self, *a: (calls.append(len(a[1])), real.prefill_layers(*a))[1]})()
    ids = [(7 * i) % 90 + 5 for i in range(194)]          # chunks of 96, 96 and 2 tokens
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=2)
    prompts = [ids[:104], ids[:40]]                        # 96 + 8 tokens, and 40

    def run(on: bool):
        calls.clear()
        llm.model.fused = whole if on else None
        try:
            out = llm.generate(None, params, prompt_token_ids=prompts, use_tqdm=False)
            return (llm.logits(ids), [o.token_ids for o in out],
                    [[lp["logprob"] for lp in o.outputs[0].logprobs] for o in out])
        finally:
            llm.model.fused = whole

    fused_logits, fused_tokens, fused_lps = run(True)
    n_blocks = len(llm.model.blk)
    if activations == "int16" and ops.isa == "avx512":
        # scoring: three chunks; generation: the first prompt's first chunk (then two prompts share a step)
        assert calls.count(n_blocks) == 3 and calls.count(n_blocks - 1) == 1
    else:
        assert not calls                                   # not on the int16 GEMM: the Python blocks
    python_logits, python_tokens, python_lps = run(False)
    assert not calls
    assert np.array_equal(fused_logits, python_logits)
    assert fused_tokens == python_tokens and fused_lps == python_lps


@pytest.mark.parametrize("n", [1, 15, 1536, 40000])
@pytest.mark.parametrize("gelu", [False, True])
def test_act_mul_equals_torch(n, gelu):
    g, u = torch.randn(n) * 4, torch.randn(n)
    g[0] = -100.0                      # far tails: exp clamps must still give 0 and x
    if n > 1:
        g[1] = 100.0
    x = g.double()                     # the reference in float64: ours and torch's float32 both round
    want = (torch.nn.functional.gelu(x, approximate="tanh") if gelu else torch.nn.functional.silu(x)) * u.double()
    got = g.clone()
    ops.act_mul_(got, u, gelu)
    torch.testing.assert_close(got.double(), want, rtol=4e-6, atol=1e-6)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 262144])
def test_argmax_equals_torch(n):
    x = torch.randn(n)
    assert ops.argmax(x) == int(x.argmax())
    x[n // 2] = x[n - 1] = x.max() + 1          # ties: the first one wins, as in torch
    assert ops.argmax(x) == int(x.argmax()) == n // 2
    x[-1] = float("nan")                         # NaN: -1, the caller asks torch
    assert ops.argmax(x) == -1
    from jisu.engine.sampler import argmax
    assert argmax(x) == int(x.argmax())


def test_argmax_rows_equals_torch():
    # many ties (small integers), rows of -inf, NaNs, lengths around the 8-lane vectors
    g = torch.Generator().manual_seed(1234)
    for n in (1, 7, 8, 9, 63, 1000, 4099):
        x = torch.randint(-3, 3, (6, n), generator=g).float()
        x[1] = float("-inf")
        x[2, n // 2] = float("nan")
        x[3, -1] = 100.0                         # the maximum in the scalar tail
        x[4, 0] = float("inf")
        rows = [5, 0, 1, 2, 3, 4, 0]            # any order, repeats
        got = ops.argmax_rows(x, rows).tolist()
        want = [-1 if torch.isnan(x[r]).any() else int(x[r].argmax()) for r in rows]
        assert got == want, n
    wide = torch.randn(4, 300)
    assert ops.argmax_rows(wide[:, ::2].contiguous(), [0]).tolist() == [int(wide[0, ::2].argmax())]
    with pytest.raises(RuntimeError, match="out of range"):
        ops.argmax_rows(wide, [4])
    with pytest.raises(RuntimeError, match="contiguous rows"):
        ops.argmax_rows(wide[:, ::2], [0])


@pytest.mark.parametrize("gelu", [False, True])
def test_gated_ffn_in_column_chunks_equals_whole(gelu):
    # without the int16 GEMM the prefill MLP takes up's output a slice of columns at a time
    # (act_mul_ on a column slice of the gate's output); with it, up's tiles apply the activation
    # as they store (act_mul_'s arithmetic): every column is the same dot product, the same bits
    from jisu.model.layers import gated_ffn
    (wg, _), (wu, _) = random_weight(Q.Q4_K, n=1100), random_weight(Q.Q4_K, n=1100)
    gate, up = QLinear(wg, int(Q.Q4_K), 512, ops), QLinear(wu, int(Q.Q4_K), 512, ops)
    for lin in (gate, up):
        lin.act_digits = 2
    for rows in (80, 5):          # AVX-512: gated_ffn_i16; AVX2: slices of 256 (80 rows), one (5)
        h = torch.randn(1, rows, 512)
        whole = gate(h)
        ops.act_mul_(whole, up(h), gelu)
        chunked = gated_ffn(gate, up, h, ops, gelu, chunk=256)    # 5 slices, the last 76 columns
        assert chunked.shape == (1, rows, 1100) and torch.equal(chunked, whole)
    with pytest.raises(RuntimeError, match="act_mul_"):
        ops.act_mul_(whole[:, :, :10].transpose(1, 2), torch.randn(1, 10, 80), gelu)


def test_gated_ffn_i16_rounds_for_both_types():
    """Gate Q6_K, up Q8_0: h rounded for each (Q6_K's codes stop at 16383), so the result is
    act(gate) * up from one call each, to the bit (up's tiles apply act_mul_'s arithmetic; 200
    columns: a last panel of 8); bad arguments are errors."""
    if ops.isa != "avx512":
        pytest.skip("the int16 GEMM is AVX-512 only (the AVX2 build computes gated_ffn in Python)")
    (wg, rg), (wu, ru) = random_weight(Q.Q6_K, n=200), random_weight(Q.Q8_0, n=200)
    h = torch.randn(40, 512)
    for gelu in (False, True):
        got = ops.gated_ffn_i16(h, wg, wu, int(Q.Q6_K), int(Q.Q8_0), 512, gelu)
        g = ops.qmatmul(h, wg, int(Q.Q6_K), 512, 2)
        ops.act_mul_(g, ops.qmatmul(h, wu, int(Q.Q8_0), 512, 2), gelu)
        assert torch.equal(got, g)
    # the gate's codes must be Q6_K's even though h is rounded for both: at the int32 edge
    extreme = q6k_extreme_rows(200, 512)
    ones = torch.ones(8, 512)
    got = ops.gated_ffn_i16(ones, extreme, wu, int(Q.Q6_K), int(Q.Q8_0), 512, False)
    want = (512 * 4096.0) * (ones.double() @ ru.double().t())          # silu(g) = g at g = 2^21
    assert (got.double() - want).norm() <= 1e-5 * want.norm()          # a wrapped sum is off by ~2^32 d
    with pytest.raises(RuntimeError, match="same rows"):
        ops.gated_ffn_i16(h, wg, wu[:100], int(Q.Q6_K), int(Q.Q8_0), 512, False)


@pytest.mark.parametrize("m", [1, 2, 5, 64])
def test_qmatmul_many_equals_one_call_each(m):
    """Matrices reading the same x in one call: x rounded once for all of them (once more for a
    Q6_K among them, whose codes stop at 16383), each result the single call's to the bit."""
    (w1, _), (w2, _), (w3, _) = random_weight(Q.Q4_K, n=70), random_weight(Q.Q8_0, n=33), random_weight(Q.Q6_K, n=40)
    x = torch.randn(1, m, 512)
    ys = ops.qmatmul_many(x, [w1, w2, w3], [int(Q.Q4_K), int(Q.Q8_0), int(Q.Q6_K)], 512, 2)
    assert [y.shape for y in ys] == [(1, m, 70), (1, m, 33), (1, m, 40)]
    for y, w, t in zip(ys, (w1, w2, w3), (Q.Q4_K, Q.Q8_0, Q.Q6_K)):
        assert torch.equal(y, ops.qmatmul(x, w, int(t), 512, 2))
    with pytest.raises(RuntimeError, match="one type per matrix"):
        ops.qmatmul_many(x, [w1, w2], [int(Q.Q4_K)], 512, 2)


@pytest.mark.parametrize("m", [1, 2, 7])
def test_qmatmul_into_a_callers_buffer(m):
    q, _ = random_weight(Q.Q8_0, n=40)
    x = torch.randn(m, 512)
    for digits in (0, 2):
        want = ops.qmatmul(x, q, int(Q.Q8_0), 512, digits)
        out = torch.full((m, 40), float("nan"))
        got = ops.qmatmul(x, q, int(Q.Q8_0), 512, digits, out)
        assert got.data_ptr() == out.data_ptr() and torch.equal(got, want) and torch.equal(out, want)
    with pytest.raises(RuntimeError, match="out must be contiguous float32"):
        ops.qmatmul(x, q, int(Q.Q8_0), 512, 2, torch.empty(m, 41))


GREEDY_TYPES = [Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.Q6_K]


def near_ties(qtype, n, k, rng):
    """x [m, k] and n weight rows whose logits for every row of x are nearly equal: row j is
    base + v_j with v_j orthogonal to x's common direction x0, so the rows differ as much as
    random rows do (their int8 rounding errors are independent) while their logits differ only
    by the weights' own rounding, about as much as int8 activations move them. The last row
    repeats one in the middle: an exact tie, where the first must win. Types the gguf package
    cannot quantize (K-quants) get random rows."""
    x0 = rng.standard_normal(k)
    x = torch.from_numpy(x0 + 0.01 * rng.standard_normal((7, k))).float()
    if qtype in (Q.Q4_K, Q.Q6_K):
        raw = random_quant_bytes((n, k), qtype, rng)
    else:
        v = rng.standard_normal((n, k))
        v -= np.outer(v @ x0 / (x0 @ x0), x0)
        raw = quantize((0.05 * (rng.standard_normal(k) + v)).astype(np.float32), qtype)
    raw[n - 1] = raw[n // 2]
    return x, torch.from_numpy(np.ascontiguousarray(raw)).view(n, -1)


@pytest.mark.parametrize("m", [3, 7, 33])
@pytest.mark.parametrize("qtype", GREEDY_TYPES, ids=lambda q: q.name)
def test_greedy_rows_equal_the_int16_gemm_argmax(qtype, m):
    """greedy_rows screens every column with int8 activations and a bound, then recomputes the
    candidates exactly: the answer must be the argmax of the int16 GEMM's own logits, ties to
    the first column, on random rows (1000 columns: part-full last panel) and on near-ties."""
    if ops.isa != "avx512":          # no int16 GEMM on AVX2 builds, so nothing to screen
        assert not hasattr(ops, "greedy_rows")
        return
    rng = np.random.default_rng()
    k = 768 if qtype == Q.Q6_K else 640
    q = torch.from_numpy(np.ascontiguousarray(random_quant_bytes((1000, k), qtype, rng))).view(1000, -1)
    x = torch.randn(m, k)
    x[0, :32] = 0.0                              # an all-zero block
    x[-1, 7] = 30.0                              # an outlier dominating its block
    xt, qt = near_ties(qtype, 300, k, rng)
    for x, q in ((x, q), (xt[:m], qt)):
        with amx_from(0):      # the int16 GEMM's logits: qmatmul takes AMX from AMX_MIN_ROWS rows
            want = ops.qmatmul(x, q, int(qtype), k, 2).argmax(-1)
        assert torch.equal(ops.greedy_rows(x, q, int(qtype), k), want)


def test_greedy_rows_near_ties_need_the_exact_pass():
    """The near ties above do separate the int8 ranking from the int16 one, so the equality
    test cannot pass on wide margins alone: argmax of logits from int8-rounded activations
    (computed here in float64) disagrees with the int16 GEMM's on some rows; greedy_rows not."""
    rng = np.random.default_rng(5)
    k, disagree = 640, 0
    for _ in range(6):
        x, q = near_ties(Q.Q8_0, 300, k, rng)
        w = ops.dequantize(q, int(Q.Q8_0), k).double()
        xb = x.view(len(x), -1, 32)
        d = xb.abs().amax(-1, keepdim=True) / 127
        x8 = (torch.round(xb / d) * d).view(len(x), k).double()
        want = ops.qmatmul(x, q, int(Q.Q8_0), k, 2).argmax(-1)
        disagree += int(((x8 @ w.t()).argmax(-1) != want).sum())
        if ops.isa == "avx512":
            assert torch.equal(ops.greedy_rows(x, q, int(Q.Q8_0), k), want)
    assert disagree >= 6, disagree


def test_greedy_rows_leaves_what_it_cannot_decide():
    if ops.isa != "avx512":
        assert not hasattr(ops, "greedy_rows")
        return
    q, _ = random_weight(Q.Q8_0, n=100, k=512)
    x = torch.randn(6, 512)
    x[1, 3] = float("nan")
    x[2, 300] = float("inf")
    x[4] = 0.0                                                       # every logit 0: all tie, the first wins
    x[5, 64:96] = 1e-30                  # a block so small the GEMM's scale products could be subnormal
    got = ops.greedy_rows(x, q, int(Q.Q8_0), 512).tolist()
    assert got[1] == got[2] == got[5] == -1                          # the caller computes those rows
    assert [got[0], got[3], got[4]] == ops.qmatmul(x[[0, 3, 4]], q, int(Q.Q8_0), 512, 2).argmax(-1).tolist()
    assert got[4] == 0
    for qtype in (Q.Q4_1, Q.Q4_K):                                   # block offsets: not screened
        qo, _ = random_weight(qtype, n=40)
        assert ops.greedy_rows(x, qo, int(qtype), 512).tolist() == [-1] * 6
    with pytest.raises(RuntimeError, match="greedy_rows"):
        ops.greedy_rows(x[:, :500], q, int(Q.Q8_0), 500)
    with pytest.raises(RuntimeError, match="weight row"):
        ops.greedy_rows(x, q[:, :-1].contiguous(), int(Q.Q8_0), 512)


def panels_of(q, k, slices=2, norms=False):
    """Q8_0 blocks q [n, k / 32 * 34] packed into panels, `slices` calls (as the loader does);
    with norms=True also the columns' norms."""
    n = q.shape[0]
    count = (n + ops.PANEL_ROWS - 1) // ops.PANEL_ROWS
    out = torch.full((count, k // 32 * ops.PANEL_BLOCK_BYTES), 7, dtype=torch.uint8)
    nrm = torch.full((count, ops.PANEL_NORMS), float("nan"))
    cuts = np.linspace(0, count, slices + 1).astype(int)
    for p0, p1 in zip(cuts[:-1], cuts[1:]):
        ops.pack_panels(q, k, int(p0), int(p1), out, nrm)
    return (out, nrm) if norms else out


def test_panels_hold_the_files_values():
    """Panels keep the file's bytes in another order: every row looked up from them equals the
    file's blocks dequantized, to the bit (1000 rows: a part-full last panel)."""
    if ops.isa != "avx512":
        assert not hasattr(ops, "pack_panels")
        return
    q, _ = random_weight(Q.Q8_0, n=1000, k=640)
    p, nrm = panels_of(q, 640, slices=3, norms=True)
    assert p.shape == (32, 20 * 1088)                      # as many bytes per row as the file's
    want = ops.dequantize(q, int(Q.Q8_0), 640)
    # each column's norm |W[n]| and the norm |R[n]| of what the six-bit screen leaves out (the
    # weight byte's two low bits less 1.5, times the scale), both rounded up (the screen's bound
    # relies on them), zero past the last row
    blocks = q.view(1000, 20, 34)
    scale = blocks[:, :, :2].contiguous().view(torch.float16).double()
    low = (blocks[:, :, 2:].contiguous().view(torch.int8).long() & 3).double() - 1.5
    for half, exact in ((0, want.double().norm(dim=1)), (1, (low * scale).reshape(1000, -1).norm(dim=1))):
        got = nrm.view(-1, 2, 32)[:, half].reshape(-1).double()
        assert (got[:1000] >= exact).all() and (got[:1000] <= exact * (1 + 1e-5)).all()
        assert (got[1000:] == 0).all()
    assert torch.equal(ops.panel_rows(p, torch.arange(1000), 1000, 640), want)
    ids = torch.tensor([999, 0, 31, 32, 500, 500])
    assert torch.equal(ops.panel_rows(p, ids, 1000, 640), want[ids])
    assert torch.equal(ops.panel_rows(p, ids.int(), 1000, 640), want[ids])      # int32 ids too
    with pytest.raises(RuntimeError, match="out of 0..999"):
        ops.panel_rows(p, torch.tensor([1000]), 1000, 640)
    with pytest.raises(RuntimeError, match="ids must be integers"):
        ops.panel_rows(p, ids.float(), 1000, 640)
    # a view that does not start on a 64-byte boundary: refused, not read with aligned loads
    shifted = torch.empty(p.numel() + 1, dtype=torch.uint8)[1:].view(p.shape)
    shifted.copy_(p)
    with pytest.raises(RuntimeError, match="64-byte boundary"):
        ops.panel_matmul(torch.randn(3, 640), shifted, 1000, 640, 0, 1000)
    with pytest.raises(RuntimeError, match="panels: expected"):
        ops.panel_rows(p[:, :-1].contiguous(), ids, 1000, 640)
    with pytest.raises(RuntimeError, match="panels: expected"):
        ops.panel_rows(p, ids, 1040, 640)                  # one panel more than p has


@pytest.mark.parametrize("m", [1, 2, 3, 7, 16, 33])
def test_panel_matmul_equals_dequant_then_matmul(m):
    """The panels' GEMM: below 16 rows p8_tile (the int16 codes split into two bytes for
    vpdpbusd), from 16 rows the int16 GEMM's own tile on widened panels. Both sum exact
    integers, so both are as close to float64 as the int16 GEMM, and within either a row's
    logits do not depend on which rows share its call (one row alone gives the same bits as
    that row among 15; among 16 the same as among 33)."""
    if ops.isa != "avx512":
        return
    q, ref_w = random_weight(Q.Q8_0, n=1000, k=640)
    p = panels_of(q, 640)
    x = torch.randn(m, 640)
    x[0, :32] = 0.0
    x[-1, 7] = 30.0
    want = x.double() @ ref_w.double().t()
    got = ops.panel_matmul(x, p, 1000, 640, 0, 1000)
    assert got.shape == (m, 1000)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    alone = m < 16
    for i in range(m):
        if alone:
            assert torch.equal(ops.panel_matmul(x[i:i + 1], p, 1000, 640, 0, 1000)[0], got[i])
        else:
            among = torch.cat([x[i:i + 1], torch.randn(15, 640)])
            assert torch.equal(ops.panel_matmul(among, p, 1000, 640, 0, 1000)[0], got[i])
    # a column range that starts and ends inside panels, into a caller's buffer
    out = torch.full((m, 1000 - 5 - 37), float("nan"))
    part = ops.panel_matmul(x, p, 1000, 640, 37, 995, out)
    assert part.data_ptr() == out.data_ptr() and torch.equal(out, got[:, 37:995])
    assert torch.equal(ops.panel_matmul(x.view(m, 1, 640), p, 1000, 640, 0, 1000), got.view(m, 1, 1000))
    with pytest.raises(RuntimeError, match="columns 0..1001 out of 0..1000"):
        ops.panel_matmul(x, p, 1000, 640, 0, 1001)
    with pytest.raises(RuntimeError, match="out must be contiguous float32"):
        ops.panel_matmul(x, p, 1000, 640, 0, 1000, torch.empty(m, 999))


@pytest.mark.parametrize("k", [32, 96])
@pytest.mark.parametrize("n", [1, 33])
def test_panels_of_any_block_count(k, n):
    """Split panels of one or three blocks and one or two panels: rows, logits and the screens'
    argmax (one to three rows the six-bit screen, more the eight-bit) as the file's blocks give."""
    if ops.isa != "avx512":
        return
    q, _ = random_weight(Q.Q8_0, n=n, k=k)
    p, nrm = panels_of(q, k, norms=True)
    want = ops.dequantize(q, int(Q.Q8_0), k)
    assert torch.equal(ops.panel_rows(p, torch.arange(n), n, k), want)
    for m in (1, 2, 3, 5, 17):
        x = torch.randn(m, k)
        y = ops.panel_matmul(x, p, n, k, 0, n)
        torch.testing.assert_close(y.double(), x.double() @ want.double().t(), rtol=1e-4, atol=1e-3)
        assert torch.equal(ops.panel_greedy(x, p, nrm, n, n, k, n), y.argmax(-1))


@pytest.mark.parametrize("m", [1, 2, 3, 7, 16, 33])
def test_panel_greedy_equals_the_panel_gemm_argmax(m):
    """The screen on panels: the argmax of panel_matmul's own logits, ties to the first column,
    on random rows and on near-ties, over all columns and over the first `vocab` of them."""
    if ops.isa != "avx512":
        return
    rng = np.random.default_rng()
    q = torch.from_numpy(np.ascontiguousarray(random_quant_bytes((1000, 640), Q.Q8_0, rng))).view(1000, -1)
    x = torch.randn(m, 640)
    x[0, :32] = 0.0
    x[-1, 7] = 30.0
    xt, qt = near_ties(Q.Q8_0, 300, 640, rng)
    for x, q in ((x, q), (xt[:m], qt)):
        n = q.shape[0]
        p, nrm = panels_of(q, 640, norms=True)
        logits = ops.panel_matmul(x, p, n, 640, 0, n)
        # random rows are flat (hundreds of candidates): every candidate computed here
        assert torch.equal(ops.panel_greedy(x, p, nrm, n, n, 640, n), logits.argmax(-1))
        assert torch.equal(ops.panel_greedy(x, p, nrm, n, n - 45, 640, n), logits[:, :n - 45].argmax(-1))
        # with the default cap (N / 64, at least 256) a row is that argmax or left to the caller
        got = ops.panel_greedy(x, p, nrm, n, n, 640)
        assert ((got == logits.argmax(-1)) | (got == -1)).all()


def screen_rounding(x, qmax16):
    """x8 - x16 for rows x as the screen's two roundings make them (quantize_x8s, quantize_x16;
    float32 steps as the kernels take them): float64 [m, k]."""
    xb = x.numpy().astype(np.float32).reshape(x.shape[0], -1, 32)
    amax = np.abs(xb).max(-1, keepdims=True)
    id16 = (np.float32(qmax16) / amax).astype(np.float32)
    x16 = np.rint(xb * id16) * (amax / np.float32(qmax16)).astype(np.float32).astype(np.float64)
    rmax = amax.max(1, keepdims=True)
    mant, e = np.frexp((amax / rmax).astype(np.float32))
    k = np.where(mant == 0.5, e - 1, e)
    d = np.ldexp((rmax / np.float32(127)).astype(np.float32), k)
    x8 = np.clip(np.rint(xb * (np.float32(1) / d).astype(np.float32)), -128, 127) * d.astype(np.float64)
    return (x8 - x16).reshape(x.shape[0], -1)


@pytest.mark.parametrize("m", [4, 16])
@pytest.mark.parametrize("panels", [True, False], ids=["panels", "blocks"])
def test_greedy_screen_bound_holds_where_it_is_tight(m, panels):
    """Columns built against the screen's own rounding: for row r, Q_r points along x8 - x16 (its
    int8 logit is too high by nearly the whole bound |W| |x8 - x16|) and P_r along the opposite,
    plus enough of x16 that P_r's exact logit wins by a fifth of that. The screen finds P_r only
    if its bound is at least ~0.9 of the Cauchy-Schwarz bound it claims: a bound scaled down, or
    an offset or scale in the int8 sums that is off, loses P_r."""
    if ops.isa != "avx512":
        return
    rng = np.random.default_rng()
    k, n = 640, 200
    x = torch.from_numpy((rng.standard_normal((m, k)) * np.repeat(np.exp(0.5 * rng.standard_normal((m, k // 32))), 32, 1)).astype(np.float32))
    qmax16 = 32639.0 if panels and m < 16 else 32767.0
    delta = screen_rounding(x, qmax16)
    w = 1e-3 * rng.standard_normal((n, k))                    # filler columns, far below
    x16 = x.numpy().astype(np.float64)                         # each row's int16 values, nearly
    dual = np.linalg.pinv(x16).T                               # dual[r] . x16[s] = (r == s)
    for r in range(m):
        u = delta[r] / np.linalg.norm(delta[r])
        gap = 0.5 * np.linalg.norm(delta[r])
        # Q = u + a, P = -u + a + c dual[r]: P's logit exceeds Q's by the gap on row r (the
        # weights' rounding moves the logits far less), and a (|a| about 0.4) lifts both above
        # every other column on row r without touching the other rows
        a = 0.4 * np.linalg.norm(x16[r]) * dual[r]
        c = 2 * u @ x16[r] + gap
        w[2 * r], w[2 * r + 1] = -u + a + c * dual[r], u + a
    q = torch.from_numpy(np.ascontiguousarray(quantize(w.astype(np.float32), Q.Q8_0))).view(n, -1)
    if panels:
        p, nrm = panels_of(q, k, norms=True)
        logits = ops.panel_matmul(x, p, n, k, 0, n)
        got = ops.panel_greedy(x, p, nrm, n, n, k)
    else:
        logits = ops.gemm_i16(x, [q], [int(Q.Q8_0)], k)[0] if hasattr(ops, "gemm_i16") else ops.qmatmul(x, q, int(Q.Q8_0), k, 2)
        got = ops.greedy_rows(x, q, int(Q.Q8_0), k)
    assert logits.argmax(-1).tolist() == [2 * r for r in range(m)]   # the construction holds
    assert got.tolist() == [2 * r for r in range(m)]


@pytest.mark.parametrize("m", [1, 2, 3])
def test_six_bit_screen_bound_holds_where_it_is_tight(m):
    """One to three rows screen the panels' six-bit part: each weight byte u taken as
    (u & ~3) + 1.5, with |R[n]| |x8| added to the bound. Columns built against it, on rows of
    +-1 (int8 and int16 codes exact): Q's two low bits are 3 where x > 0 and 0 where x < 0, so
    its residual is parallel to x and its screened logit is too low by the whole |R| |x|; P's are
    the opposite (too high by as much) and its six-bit codes add 456 of 640 signs, so P's
    screened value passes Q's by 4 * 456 against a bound of 2 * 1.5 * 640 while Q's exact
    logit still wins. A bound below 0.95 of |R| |x8| loses Q."""
    if ops.isa != "avx512":
        return
    rng = np.random.default_rng()
    k, n, nb = 640, 100, 20
    sign = rng.choice([-1, 1], k)
    x = torch.from_numpy(np.tile(sign.astype(np.float32), (m, 1)))
    codes = rng.integers(-3, 4, (n, k))                        # filler columns, far below
    hq = 32 + 8 * sign                                         # Q's six-bit codes: u >> 2
    lq = np.where(sign > 0, 3, 0)
    delta = np.zeros(k, dtype=np.int64)
    picked = rng.choice(k, 456, replace=False)
    delta[picked] = sign[picked]
    qi, pi = 61, 12                                            # P first: a tie would go to P
    codes[qi] = 4 * hq + lq - 128
    codes[pi] = 4 * (hq + delta) + (3 - lq) - 128
    scale = np.full((n, nb, 1), np.float16(2 ** -7)).view(np.uint8)
    blocks = np.concatenate([scale, codes.astype(np.int8).reshape(n, nb, 32).view(np.uint8)], axis=2)
    q = torch.from_numpy(np.ascontiguousarray(blocks.reshape(n, -1)))
    p, nrm = panels_of(q, k, norms=True)
    logits = ops.panel_matmul(x, p, n, k, 0, n)
    assert logits.argmax(-1).tolist() == [qi] * m               # the construction holds
    assert (logits[:, qi] - logits[:, pi]).min() > 0.5
    assert ops.panel_greedy(x, p, nrm, n, n, k).tolist() == [qi] * m


def test_panel_greedy_leaves_what_it_cannot_decide():
    if ops.isa != "avx512":
        return
    q, _ = random_weight(Q.Q8_0, n=100, k=512)
    p, nrm = panels_of(q, 512, norms=True)
    x = torch.randn(6, 512)
    x[1, 3] = float("nan")
    x[2, 300] = float("inf")
    x[4] = 0.0
    x[5, 64:96] = 1e-30
    got = ops.panel_greedy(x, p, nrm, 100, 100, 512).tolist()
    assert got[1] == got[2] == got[5] == -1
    assert [got[0], got[3], got[4]] == ops.panel_matmul(x[[0, 3, 4]], p, 100, 512, 0, 100).argmax(-1).tolist()
    assert got[4] == 0
    with pytest.raises(RuntimeError, match="N=101 columns out of 1..100"):
        ops.panel_greedy(x, p, nrm, 100, 101, 512)
    # a flat row: more candidates than the screen computes alone (N / 64) is left to the caller,
    # on both screens
    q, _ = random_weight(Q.Q8_0, n=8224, k=64)
    p, nrm = panels_of(q, 64, norms=True)
    rows = ops.panel_rows(p, torch.tensor([4000, 17, 8223, 555]), 8224, 64)
    for m in (1, 5):
        x = rows[:m].clone()                                       # peaked: each its own column wins
        x[-1] = 0.0                                                # every logit 0: all tie
        got = ops.panel_greedy(x, p, nrm, 8224, 8224, 64).tolist()
        assert got[-1] == -1
        assert got[:-1] == ops.panel_matmul(x[:-1], p, 8224, 64, 0, 8224).argmax(-1).tolist()


@pytest.mark.parametrize("m", [1, 2, 5, 33])
@pytest.mark.parametrize("digits", [0, 1, 2])
@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
def test_non_finite_activations_give_nan_rows(qtype, digits, m):
    """A NaN or an infinity in a row of x leaves none of that row's outputs finite on any path
    (float32, one- and two-row integer kernels, the int16 GEMM; the integer ones give NaN), as
    in a float matmul, and the other rows as they are. The integer paths once rounded such a
    block to finite codes and returned finite numbers."""
    q, _ = random_weight(qtype, n=40)
    x = torch.randn(m, 512)
    clean = ops.qmatmul(x, q, int(qtype), 512, digits)
    bad = [(0, 5, float("nan")), (m - 1, 300, float("inf")), (m // 2, 511, float("-inf"))]
    for r, c, v in bad:
        y = x.clone()
        y[r, c] = v
        got = ops.qmatmul(y, q, int(qtype), 512, digits)
        assert not torch.isfinite(got[r]).any()
        others = [i for i in range(m) if i != r]
        assert torch.equal(got[others], clean[others])


def test_non_finite_activations_give_nan_rows_on_panels():
    if ops.isa != "avx512":
        return
    q, _ = random_weight(Q.Q8_0, n=100, k=512)
    p = panels_of(q, 512)
    for m in (1, 3, 16, 20):
        x = torch.randn(m, 512)
        clean = ops.panel_matmul(x, p, 100, 512, 0, 100)
        y = x.clone()
        y[m - 1, 7] = float("nan")
        got = ops.panel_matmul(y, p, 100, 512, 0, 100)
        assert torch.isnan(got[m - 1]).all() and torch.equal(got[:m - 1], clean[:m - 1])
