"""The serving engine on a tiny model: prefix caching, chunked prefill mixed with decodes,
the block pool's eviction order."""

import numpy as np
import pytest
import torch

from jisu import LLM, SamplingParams
from jisu.engine.block_manager import CHUNK, NO_BLOCK, BlockManager
from jisu.engine.sampler import sample
from jisu.engine.sequence import Sequence


def greedy(n=12):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def no_cache(tiny_llama_path):
    return LLM(str(tiny_llama_path), progress=False, enable_prefix_caching=False)


# ---- block manager ---------------------------------------------------------------------------
def seq_of(tokens):
    return Sequence(list(tokens), greedy())


def computed(bm, seq):
    """Pretend the model computed all of seq's tokens."""
    bm.allocate(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.after_step(seq)


def test_prefix_hit_reuses_blocks_and_leaves_last_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq_of(range(10))                          # 2 full blocks + 2 tokens
    computed(bm, a)
    b = seq_of(list(range(8)) + [99, 98, 97])      # shares the 2 full blocks
    assert bm.match_prefix(b) == 8
    assert b.block_tables[0] == a.block_tables[0][:2]
    assert bm.blocks[a.block_tables[0][0]].ref_count == 2
    c = seq_of(range(8))                           # all cached, but its last token must be computed
    assert bm.match_prefix(c) == 4
    d = seq_of([0, 1, 2, 5, 4, 5, 6, 7, 8])        # differs inside block 0: no hit at all
    assert bm.match_prefix(d) == 0 and d.block_tables == [[]]
    for s in (a, b, c):
        bm.free(s)
    assert bm.num_free_blocks == 8


def test_cached_blocks_survive_free_and_evict_least_recent_first():
    bm = BlockManager(num_blocks=4, block_size=4)
    old, new = seq_of(range(100, 104)), seq_of(range(200, 204))
    for s in (old, new):
        computed(bm, s)
        bm.free(s)                                 # unreferenced but still cached
    assert bm.num_free_blocks == 4 and len(bm.cached) == 2
    filler = seq_of(range(3 * 4))                  # takes the 2 empty blocks, then evicts `old`
    bm.allocate(filler, filler.num_tokens)
    assert bm.match_prefix(seq_of(list(range(100, 104)) + [1])) == 0
    probe = seq_of(list(range(200, 204)) + [1])
    assert bm.match_prefix(probe) == 4


def test_hash_collision_is_not_a_hit(monkeypatch):
    bm = BlockManager(num_blocks=4, block_size=4)
    monkeypatch.setattr(bm, "_hash", lambda prev, tokens: 42)   # every block collides
    computed(bm, seq_of([1, 2, 3, 4, 5]))
    assert bm.match_prefix(seq_of([9, 9, 9, 9, 5])) == 0


def test_disabled_prefix_caching_never_hits():
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    computed(bm, seq_of(range(9)))
    assert bm.match_prefix(seq_of(range(9))) == 0 and not bm.cached


# ---- prefix caching end to end -----------------------------------------------------------------
SHARED = " ".join(f"word{i}" for i in range(40))          # ~100 tokens of common prefix


def test_prefix_cache_hits_and_output_is_unchanged(tiny_llama, no_cache):
    bm = tiny_llama.engine.block_manager
    prompts = [SHARED + " and then the cat", SHARED + " but the dog", SHARED + " so"]
    want = [o.token_ids for o in no_cache.generate(prompts, greedy(), use_tqdm=False)]
    first = tiny_llama.generate(prompts[0], greedy())[0].token_ids
    hits = bm.num_hit_tokens
    rest = [o.token_ids for o in tiny_llama.generate(prompts[1:], greedy(), use_tqdm=False)]
    shared_tokens = len(tiny_llama.tokenizer.encode(SHARED, add_special=True))
    assert bm.num_hit_tokens - hits >= 2 * (shared_tokens // bm.block_size) * bm.block_size
    assert [first] + rest == want
    assert bm.num_free_blocks == bm.num_blocks


def test_prompt_that_is_all_cached_still_gets_logits(tiny_llama, no_cache):
    bs = tiny_llama.engine.block_manager.block_size
    ids = [(7 * i) % 200 + 1 for i in range(3 * bs)]           # exactly 3 full blocks
    a = tiny_llama.generate(prompt_token_ids=[ids], params=greedy())[0].token_ids
    b = tiny_llama.generate(prompt_token_ids=[ids], params=greedy())[0].token_ids
    c = no_cache.generate(prompt_token_ids=[ids], params=greedy())[0].token_ids
    assert a == b == c


def test_n_samples_share_the_prompt(tiny_llama):
    bm = tiny_llama.engine.block_manager
    before = bm.num_hit_tokens
    out = tiny_llama.generate(SHARED, SamplingParams(max_tokens=4, n=3, temperature=0.8, seed=3))[0]
    assert len(out.outputs) == 3
    assert bm.num_hit_tokens > before       # samples after the first reuse its prompt blocks


# ---- chunked prefill ----------------------------------------------------------------------------
def test_chunked_prefill_matches_whole_prefill(tiny_llama_path, no_cache):
    chunked = LLM(str(tiny_llama_path), progress=False, max_num_batched_tokens=7, enable_prefix_caching=False)
    prompts = [SHARED, "the cat", SHARED[:50], "a b c d e f g h i j k l m n o p"]
    want = [o.token_ids for o in no_cache.generate(prompts, greedy(), use_tqdm=False)]
    got = [o.token_ids for o in chunked.generate(prompts, greedy(), use_tqdm=False)]
    assert got == want


def test_long_prompt_does_not_stall_running_decodes(tiny_llama_path):
    llm = LLM(str(tiny_llama_path), progress=False, max_num_batched_tokens=16)
    eng = llm.engine
    eng.add_request("short", llm.tokenizer.encode("the cat", add_special=True), greedy(30))
    eng.step()                                                  # short is now decoding
    long_ids = llm.tokenizer.encode(SHARED, add_special=True)
    assert len(long_ids) > 8 * 16
    eng.add_request("long", long_ids, greedy(2))
    steps_until_long_starts, short_tokens = 0, 0
    while True:
        outs = eng.step()
        if any(o.seq.request_id == "long" for o in outs):
            break
        steps_until_long_starts += 1
        short_tokens += sum(o.seq.request_id == "short" for o in outs)
    # the long prompt took several chunked steps, and short decoded in every one of them
    assert steps_until_long_starts >= len(long_ids) // 16 - 1
    assert short_tokens == steps_until_long_starts
    eng.abort("short")
    eng.abort("long")
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_sliding_window_model_chunked_equals_whole(tiny_gemma3_path):
    whole = LLM(str(tiny_gemma3_path), progress=False, enable_prefix_caching=False)
    chunked = LLM(str(tiny_gemma3_path), progress=False, max_num_batched_tokens=5)
    window = whole.config.sliding_window
    prompt = " ".join(["alpha beta gamma"] * (window // 2 + 4))
    assert len(whole.tokenizer.encode(prompt, add_special=True)) > window
    want = whole.generate([prompt, prompt[:40]], greedy(), use_tqdm=False)
    got = chunked.generate([prompt, prompt[:40]], greedy(), use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    # and again with the prompt's blocks cached
    again = chunked.generate(prompt, greedy())[0]
    assert again.token_ids == want[0].token_ids


@pytest.mark.parametrize("model", ["tiny_llama_path", "tiny_gemma3_path"])
def test_last_block_computes_only_the_rows_the_logits_read(model, request):
    """A prompt's earlier positions need keys and values from every block but no output from
    the last one: it takes only each ready sequence's last row (none for a chunk that does not
    end its prompt). Those rows' logits are the ones of the run that computes every position,
    within the rounding of a smaller batch (their MLP takes the one-row kernels)."""
    path = request.getfixturevalue(model)
    llm = LLM(str(path), progress=False, max_num_batched_tokens=16, enable_prefix_caching=False)
    eng, last = llm.engine, llm.model.blk[-1]
    seen = []
    forward = last.forward
    last.forward = lambda x, meta, rows=None: seen.append((x.shape[1], rows)) or forward(x, meta, rows)
    short, long = [3, 17, 40, 9, 21], [5 + (7 * i) % 50 for i in range(20)]
    eng.add_request("short", short, greedy(1))
    eng.add_request("long", long, greedy(1))

    def run(**kw):
        seqs = eng.scheduler.schedule()
        ready, logits, picked = eng.runner.run(seqs, **kw)
        for seq in seqs:
            eng.block_manager.after_step(seq)
        return ready, logits.clone(), picked           # the runner reuses its logits buffer
    ready, logits, _ = run()                  # short whole, long's first 11
    assert [s.request_id for s in ready] == ["short"] and logits.shape[0] == 1
    assert seen[-1][0] == 16 and seen[-1][1].tolist() == [4]
    ready, logits2, _ = run()                 # long's last 9
    assert [s.request_id for s in ready] == ["long"] and seen[-1][1].tolist() == [8]
    eng.abort("short")
    eng.abort("long")
    # a chunk that ends no prompt: the last block returns no rows
    eng.add_request("longer", long * 2, greedy(1))
    ready, empty, _ = run()
    assert ready == [] and empty.shape[0] == 0 and seen[-1][1].numel() == 0 and seen[-1][1].dtype == torch.long
    eng.abort("longer")
    # against every position computed (the perplexity path) for the same prompts
    for ids, got in ((short, logits[0]), (long, logits2[0])):
        eng.add_request("all", ids, greedy(1))
        full = None
        while full is None:
            before = len(seen)
            ready, every, _ = run(all_logits=True)
            # every row: the last block in Python with rows None, or with the others in one
            # prefill_layers call (a one-prompt step on the int16 GEMM)
            assert len(seen) == before or seen[-1][1] is None
            full = every[-1] if ready else None
        eng.abort("all")
        assert got.argmax() == full.argmax()
        assert torch.allclose(got, full, rtol=0, atol=1e-3 * float(full.abs().max()))


def test_one_token_prompt_chunk_beside_decodes(tiny_llama_path, no_cache):
    """A step of one-token rows (the fused decode path) where one row is a prompt's chunk of
    one token, not its last: the decode's row is the one the logits read."""
    from jisu.kernels import cpu
    llm = LLM(str(tiny_llama_path), progress=False, max_num_batched_tokens=2, enable_prefix_caching=False)
    assert (llm.model.fused is not None) == (cpu.load() is not None)     # the C++ decode block
    eng = llm.engine
    metas = []
    prepare = eng.runner.prepare
    eng.runner.prepare = lambda seqs, all_rows=False: (lambda r: metas.append(r[1]) or r)(prepare(seqs, all_rows))
    prompts, params = [[3, 17, 40, 9], [5, 12, 19, 26, 33]], [greedy(6), greedy(2)]
    eng.add_request("a", prompts[0], params[0])
    while not eng.sequences["a"][0].num_output_tokens:
        eng.step()
    eng.add_request("b", prompts[1], params[1])
    while eng.has_unfinished():
        eng.step()
    # a's decode beside b's first token, both one-token rows
    assert any(m.num_decode == 2 and m.out_rows is not None and m.out_rows.tolist() == [0] for m in metas)
    want = no_cache.generate(prompt_token_ids=prompts, params=params, use_tqdm=False)
    assert [eng.sequences[r][0].output_token_ids for r in ("a", "b")] == [o.outputs[0].token_ids for o in want]


def test_engine_config_rejects_nonsense(tiny_llama_path):
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        LLM(str(tiny_llama_path), progress=False, max_num_batched_tokens=0)
    with pytest.raises(ValueError, match="kv_cache_gb"):
        LLM(str(tiny_llama_path), progress=False, kv_cache_gb=-1)
    with pytest.raises(ValueError, match="activations must be one of float32, int8, int16"):
        LLM(str(tiny_llama_path), progress=False, activations="int4")
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of float32, float16"):
        LLM(str(tiny_llama_path), progress=False, kv_cache_dtype="bfloat16")


@pytest.mark.parametrize("kernels", [True, False])
def test_float16_kv_cache(tiny_llama_path, kernels):
    """float16 keys and values (the default with integer activations) in both attention paths:
    logits within float16's rounding of the float32-cache ones, half the bytes per page."""
    from jisu.kernels import cpu
    ids = list(range(3, 40))
    if kernels and cpu.load() is None:           # JISU_KERNELS=torch, or no compiler: a clear error
        with pytest.raises(RuntimeError, match="CPU kernels requested but unavailable"):
            LLM(str(tiny_llama_path), progress=False, activations="float32", kernels=kernels)
        return
    exact = LLM(str(tiny_llama_path), progress=False, activations="float32", kernels=kernels)
    half = LLM(str(tiny_llama_path), progress=False, activations="float32", kernels=kernels,
               kv_cache_dtype="float16")
    assert exact.engine_config.kv_cache_dtype == "float32" and half.engine.runner.kv_cache.dtype == torch.float16
    assert half.engine.block_manager.num_blocks >= 2 * exact.engine.block_manager.num_blocks - 2
    a, b = exact.logits(ids), half.logits(ids)
    assert 0 < np.abs(a - b).max() < 3e-3 * np.abs(a).max()      # measured ~3.4e-4


def test_kv_cache_from_free_memory(tiny_llama_path):
    llm = LLM(str(tiny_llama_path), progress=False, kv_cache_gb=None)
    assert llm.engine.block_manager.num_blocks > 16


# ---- sliding-window KV groups ---------------------------------------------------------------
def test_window_group_frees_pages_behind_the_window():
    from jisu.engine.block_manager import NO_BLOCK
    bm = BlockManager(num_blocks=32, block_size=4, windows=[None, 8])
    s = seq_of(range(40))
    computed(bm, s)
    full, local = s.block_tables
    assert NO_BLOCK not in full and len(full) == 10
    # the next query (position 40) sees keys 33..39: blocks 8 and 9
    assert local[:8] == [NO_BLOCK] * 8 and NO_BLOCK not in local[8:]
    assert bm.num_used_blocks == 12
    bm.free(s)
    assert bm.num_free_blocks == 32


def test_window_group_frees_each_page_the_step_it_leaves_the_window():
    # one token a step, as decoding goes: after each step exactly the blocks before the next
    # query's first visible key (position n - window + 1) are freed, no later and no sooner
    from jisu.engine.block_manager import NO_BLOCK
    for window, bs in ((8, 4), (5, 4), (4, 4), (9, 2)):
        bm = BlockManager(num_blocks=64, block_size=bs, windows=[None, window])
        s = seq_of([7])
        for n in range(1, 40):
            bm.allocate(s, n)
            s.num_computed_tokens = n
            bm.after_step(s)
            local = s.block_tables[1]
            gone = max(0, n - window + 1) // bs
            assert local[:gone] == [NO_BLOCK] * gone and NO_BLOCK not in local[gone:], (window, bs, n)
            s.token_ids.append(7)


def test_window_group_prefix_hit_needs_only_the_window():
    bm = BlockManager(num_blocks=32, block_size=4, windows=[None, 8])
    a = seq_of(range(40))
    computed(bm, a)
    b = seq_of(list(range(40)) + [7])
    assert bm.match_prefix(b) == 40
    assert b.block_tables[0] == a.block_tables[0]
    assert b.block_tables[1][8:] == a.block_tables[1][8:] and b.block_tables[1][0] == -1
    window_pages = b.block_tables[1][8:]
    bm.free(a)
    bm.free(b)
    # if the window group's last pages are gone, the hit falls back to a prefix whose window
    # pages are still cached
    for block_id in window_pages:
        block = bm.blocks[block_id]
        del bm.cached[block.key]
        block.key = None
    c = seq_of(list(range(40)) + [7])
    got = bm.match_prefix(c)
    assert 0 < got < 40
    assert all(b != -1 for b in c.block_tables[1][(got - 8 + 1) // 4:])
    bm.free(c)
    assert bm.num_free_blocks == 32


def test_window_model_uses_fewer_pages_and_longer_context(tiny_gemma3_path):
    from jisu.engine.block_manager import NO_BLOCK
    llm = LLM(str(tiny_gemma3_path), progress=False, kv_cache_gb=0.004, max_num_batched_tokens=32,
              kv_cache_dtype="float32")      # the page arithmetic below assumes 4-byte values
    eng = llm.engine
    groups = llm.config.kv_groups()
    assert len(groups) == 6 and sum(w is not None for _, w in groups) == 5     # 5 local layers, 1 global
    # alone, a sequence needs its full length only in the global group
    assert eng.max_model_len > eng.block_manager.num_blocks * eng.block_manager.block_size // len(groups)
    eng.add_request("r", llm.tokenizer.encode("alpha beta gamma " * 20, add_special=True), greedy(40))
    peak = 0
    while eng.has_unfinished():
        eng.step()
        seq = eng.sequences["r"][0]
        if seq.block_tables:
            live = [sum(b != NO_BLOCK for b in t) for t in seq.block_tables]
            peak = max(peak, max(live[1:]))
            assert live[0] == -(-seq.num_computed_tokens // 16) or seq.num_computed_tokens == 0
    window_blocks = -(-(llm.config.sliding_window + eng.cfg.max_num_batched_tokens) // 16) + 1
    assert 0 < peak <= window_blocks
    eng.release("r")
    assert eng.block_manager.num_used_blocks == 0


def test_decode_slots_equal_each_sequence_slots(tiny_gemma3_path):
    # the runner computes all decode rows' key slots in one go; they must be what each sequence's
    # block tables give alone, key by key (freed window blocks and the padding past a shorter
    # row: scratch)
    llm = LLM(str(tiny_gemma3_path), progress=False, kv_cache_gb=0.004, max_num_batched_tokens=32)
    eng, runner = llm.engine, llm.engine.runner
    for i, n in enumerate((3, 9, 20)):
        eng.add_request(str(i), llm.tokenizer.encode("alpha beta gamma " * n, add_special=True), greedy(30))
    checked = 0
    while eng.has_unfinished():
        seqs = runner.order(eng.scheduler.schedule())
        decodes = [s for s in seqs if s.num_scheduled_tokens == 1]
        if len(decodes) > 1:
            _, meta = runner.prepare(seqs)
            for b, seq in enumerate(decodes):
                end = seq.num_computed_tokens + 1
                bs = runner.block_size
                for g, group in enumerate(meta.groups):
                    table = seq.block_tables[g]
                    alone = [runner.scratch_slot if table[p // bs] == NO_BLOCK else table[p // bs] * bs + p % bs
                             for p in range(end)]
                    row = group.decode_slots[b]
                    assert row[:end].tolist() == alone and bool((row[end:] == runner.scratch_slot).all())
                    assert int(group.slot_mapping[b]) == alone[-1]
            checked += any(NO_BLOCK in t for s in decodes for t in s.block_tables)
        ready, logits, _ = runner.run(seqs)
        for seq in seqs:
            eng.block_manager.after_step(seq)
        for seq, (token, info) in zip(ready, sample(logits, ready)):
            eng._append(seq, token, info)
    assert checked            # some steps had freed window blocks


def decode_lockstep(bm, seqs, steps):
    """Each sequence gains a token a step, in order, as a decode batch does."""
    for _ in range(steps):
        for s in seqs:
            s.token_ids.append(7)
            bm.allocate(s, s.num_tokens)
            s.num_computed_tokens = s.num_tokens
            bm.after_step(s)


def runs(pages):
    """Maximal runs of consecutive page ids: [(first, length)]."""
    out = []
    for p in pages:
        if out and p == out[-1][0] + out[-1][1]:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out


def test_lone_sequence_pages_follow_each_other_per_group():
    # each group's pages come in runs that start a chunk and fill it before moving on
    bm = BlockManager(num_blocks=512, block_size=4, windows=[None, None, 16])
    s = seq_of(range(30))
    computed(bm, s)
    decode_lockstep(bm, [s], 150)
    for g, table in enumerate(s.block_tables[:2]):
        r = runs(table)
        assert all(first % CHUNK == 0 for first, _ in r), (g, r)
        assert all(n >= CHUNK for _, n in r[:-1]), (g, r)
    assert len(runs([b for b in s.block_tables[2] if b != NO_BLOCK])) <= 2     # the window's few pages


def test_lockstep_decode_pages_lie_side_by_side_per_group():
    # sequences crossing into a new page the same step get adjacent pages, group by group (the
    # groups taking turns would leave each group's pages len(groups) apart)
    bm = BlockManager(num_blocks=1024, block_size=4, windows=[None, None])
    seqs = [seq_of(range(100 * i, 100 * i + 8)) for i in range(5)]
    for s in seqs:
        computed(bm, s)
    decode_lockstep(bm, seqs, 12)                  # three new pages each
    for g in range(2):
        for i in range(2, 5):
            row = [s.block_tables[g][i] for s in seqs]
            assert len(runs(row)) <= 2, (g, i, row)     # one jump at most: a chunk's end
    chunks = [{b // CHUNK for s in seqs for b in s.block_tables[g]} for g in range(2)]
    assert not chunks[0] & chunks[1]


def test_released_pages_are_reused_before_untouched_ones():
    # one sequence after another (no prefix caching, as `jisu bench` runs): each must land on
    # the pages the one before released, not walk on into memory never touched (the pool is
    # mapped lazily: that would be resident memory growing with every request)
    bm = BlockManager(num_blocks=256, block_size=4, enable_prefix_caching=False, windows=[None, None])
    used = set()
    for i in range(6):
        s = seq_of(range(100 * i, 100 * i + 30))
        computed(bm, s)
        decode_lockstep(bm, [s], 9)
        pages = {b for t in s.block_tables for b in t}
        used |= pages
        bm.free(s)
    assert len(used) == len(pages)


def test_staggered_requests_stay_on_few_pages():
    # continuous batching without prefix caching: K slots, each running requests of L tokens
    # back to back, staggered. The pages ever touched must stay near the most in use at once
    # (the first version's runs grew from page to page, always held by some live sequence,
    # and marched through the whole pool: 5308 pages touched for 53 in use)
    for K, L, windows in ((4, 300, [None]), (8, 200, [None, None]), (4, 300, [None, 64])):
        bm = BlockManager(num_blocks=8192, block_size=16, enable_prefix_caching=False, windows=windows)
        touched, claim = set(), bm._claim
        bm._claim = lambda b: (touched.add(b), claim(b))[1]
        slots, age, peak = [None] * K, [(-i * L) // K for i in range(K)], 0
        for _ in range(6 * L):
            for i in range(K):
                if age[i] == 0:
                    slots[i] = seq_of([2] * 20)
                    computed(bm, slots[i])
                if slots[i] is not None:
                    decode_lockstep(bm, [slots[i]], 1)
                age[i] += 1
                if age[i] == L:
                    bm.free(slots[i])
                    slots[i], age[i] = None, 0
            peak = max(peak, bm.num_used_blocks)
        assert len(touched) <= 2 * peak + 2 * len(windows) * CHUNK, (K, L, windows, peak, len(touched))


class FirstFreePlacement(BlockManager):
    """The placement before: every page the first in eviction order."""

    def _place(self, last: int) -> int:
        return next(iter(self.free_blocks))


def test_placement_evicts_what_the_eviction_order_did_and_counts_stay_exact():
    # the same churn (sequences come and go, prefix hits among them, full pages stay cached,
    # the pool runs dry) through both placements: the same cached pages must be evicted in the
    # same order, and the same prefixes hit; the per-chunk counts match the pages themselves
    runs = []
    for cls in (BlockManager, FirstFreePlacement):
        rng = np.random.default_rng(0)
        bm = cls(num_blocks=64, block_size=4, windows=[None, 8])
        evicted, hits, claim = [], [], bm._claim
        bm._claim = lambda b: (evicted.append(bm.blocks[b].key), claim(b))[1]
        live = []
        for i in range(200):
            if live and (len(live) > 5 or rng.random() < 0.4):
                bm.free(live.pop(int(rng.integers(len(live)))))
            n = int(rng.integers(1, 30))
            base = 1000 * int(rng.integers(0, 6))          # shared prefixes: some hits
            s = seq_of(range(base, base + n))
            if bm.blocks_needed(s, n) > bm.num_free_blocks:
                continue
            hits.append(bm.match_prefix(s))
            if bm.blocks_needed(s, n) > bm.num_free_blocks:
                bm.free(s)
                continue
            computed(bm, s)
            live.append(s)
            if cls is BlockManager:
                for c, (have, size) in enumerate(zip(bm._chunk_empty, bm._chunk_size)):
                    assert have == sum(bm._is_empty(b) for b in range(c * CHUNK, c * CHUNK + size))
        for s in live:
            bm.free(s)
        assert bm.num_free_blocks == bm.num_blocks
        runs.append(([k for k in evicted if k is not None], hits))
        if cls is BlockManager:
            assert len(bm._vacant) <= 4 * len(bm._chunk_size)       # stale heap entries stay bounded
    assert runs[0] == runs[1]
    assert len(runs[0][0]) > 10 and sum(runs[0][1]) > 0         # it did evict, and did hit


def test_free_releases_tail_blocks_of_every_group_first():
    bm = BlockManager(num_blocks=16, block_size=4, windows=[None, None])
    s = seq_of(range(12))
    computed(bm, s)
    heads = {s.block_tables[0][0], s.block_tables[1][0]}
    bm.free(s)
    # the least recently freed are evicted first: the heads of both groups must be freed last
    assert set(list(bm.free_blocks)[-2:]) == heads


def test_all_window_model_chunked_on_the_pytorch_path(tmp_path):
    # every layer sliding: one KV group with a window, and freed pages must map to the
    # (zeroed) scratch slot, not wrap around the pool
    import numpy as np
    from gguf_factory import write_tiny_gemma3
    path = write_tiny_gemma3(tmp_path / "g4.gguf", n_layers=4)
    whole = LLM(str(path), progress=False, kernels=False, enable_prefix_caching=False)
    chunked = LLM(str(path), progress=False, kernels=False, max_num_batched_tokens=5)
    assert len(whole.config.kv_groups()) == 1 and whole.config.kv_groups()[0][1] == 4
    ids = list(range(20, 60))
    a, b = whole.logits(ids), chunked.logits(ids)
    assert np.isfinite(b).all()
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    prompt = " ".join(["alpha beta"] * 12)
    assert [o.token_ids for o in chunked.generate([prompt] * 2, greedy(), use_tqdm=False)] == \
           [whole.generate(prompt, greedy())[0].token_ids] * 2


def test_huge_seed_is_fine(tiny_llama):
    out = tiny_llama.generate("the", SamplingParams(max_tokens=3, temperature=1.0, seed=2**70))[0]
    assert len(out.token_ids) == 3
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed="7")


# ---- greedy rows screened instead of full logits ---------------------------------------------
def test_screened_greedy_equals_full_logits_in_a_mixed_batch(tiny_llama_path):
    """Plain greedy sequences get their token from model.greedy (the output projection
    screened); greedy with logprobs or a penalty, and sampled ones, still get logits. Every
    sequence's output equals the run where every row's logits are computed in full (three
    rows are left to logits, so they take the same int16 GEMM as all seven did)."""
    llm = LLM(str(tiny_llama_path), progress=False, enable_prefix_caching=False)
    kinds = [greedy(10), greedy(10), SamplingParams(max_tokens=10, temperature=0, logprobs=2, ignore_eos=True),
             SamplingParams(max_tokens=10, temperature=0.8, seed=3, ignore_eos=True), greedy(10),
             SamplingParams(max_tokens=10, temperature=0, repetition_penalty=1.3, ignore_eos=True), greedy(10)]
    prompts = [[5 + i, 17, 30 + 2 * i, 9] for i in range(len(kinds))]
    picked = []
    screen = llm.model.greedy

    def spy(h, vocab):
        tokens = screen(h, vocab)
        picked.append(0 if tokens is None else int((tokens >= 0).sum()))
        return tokens
    llm.model.greedy = spy
    screened = llm.generate(prompt_token_ids=prompts, params=kinds, use_tqdm=False)
    llm.model.greedy = lambda h, vocab: None
    full = llm.generate(prompt_token_ids=prompts, params=kinds, use_tqdm=False)
    for a, b in zip(screened, full):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs
    # four plain greedy rows a step: the screen decided them (AVX-512 builds; none on AVX2)
    assert (max(picked) == 4) == (getattr(getattr(llm.model.output, "ops", None), "isa", None) == "avx512")


def test_rows_left_to_logits_are_a_batch_of_their_own(tiny_llama_path):
    """With one row left to logits, that row is computed alone (the one-row kernel), not in the
    int16 GEMM of the whole step: its logprobs move within integer rounding, as they do with
    the batch's size anyway; the screened rows' tokens are unchanged."""
    llm = LLM(str(tiny_llama_path), progress=False, enable_prefix_caching=False)
    kinds = [greedy(10)] * 4 + [SamplingParams(max_tokens=10, temperature=0, logprobs=2, ignore_eos=True)]
    prompts = [[5 + i, 17, 30 + 2 * i, 9] for i in range(len(kinds))]
    screened = llm.generate(prompt_token_ids=prompts, params=kinds, use_tqdm=False)
    llm.model.greedy = lambda h, vocab: None
    full = llm.generate(prompt_token_ids=prompts, params=kinds, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in screened] == [o.outputs[0].token_ids for o in full]
    got = [step["logprob"] for step in screened[-1].outputs[0].logprobs]
    want = [step["logprob"] for step in full[-1].outputs[0].logprobs]
    assert np.allclose(got, want, rtol=0, atol=1e-3)


def test_screened_greedy_tokens_stay_below_the_vocabulary(tiny_llama_path):
    """The runner screens only the first greedy_vocab columns (a file's vocabulary can have
    padding rows past the tokenizer's); its tokens are the argmax of the logits there."""
    llm = LLM(str(tiny_llama_path), progress=False, enable_prefix_caching=False)
    eng = llm.engine
    calls = []
    screen = llm.model.greedy
    llm.model.greedy = lambda h, vocab: calls.append((h.clone(), vocab)) or screen(h, vocab)
    for i in range(5):
        eng.add_request(f"r{i}", [3 + i, 40, 7 * i + 1], greedy(4))
    eng.step()                                         # prefills (and first tokens)
    calls.clear()
    limit = llm.model.output.out_features // 3
    ready, logits, picked = eng.runner.run(eng.scheduler.schedule(), greedy_vocab=limit)
    assert len(ready) == 5
    if getattr(getattr(llm.model.output, "ops", None), "isa", None) != "avx512":
        assert picked == {} and logits.shape[0] == 5
        return
    (h, vocab), = calls
    assert vocab == limit and sorted(picked) == list(range(5)) and logits.shape[0] == 0
    want = llm.model.compute_logits(h)[:, :limit].argmax(-1).tolist()
    assert [picked[i] for i in range(5)] == want and max(want) < limit
