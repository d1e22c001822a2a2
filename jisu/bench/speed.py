"""Decode and prefill speed of jisu, llama.cpp (llama-cpp-python) and transformers, on the same
token ids, with medians over repeats and ratios. Each engine runs in a child process of its
own, so its peak RSS is its own; energy comes from RAPL where the machine exposes it."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jisu.bench import DECODE_CONTEXT

PROMPT_FILE = Path(__file__).resolve().parents[2] / "tests" / "data" / "gpl3_preamble.txt"
FALLBACK_TEXT = "The history of computing is a story of people, machines and ideas. " * 40


@dataclass
class SpeedResult:
    engine: str
    decode_tok_s: float       # generated tokens per second after the first
    prefill_tok_s: float      # prompt tokens per second (time to first token)
    load_s: float
    detail: str = ""
    ttft_s: float = 0.0       # median time from the prompt to its first token
    peak_rss_mb: float = 0.0  # the engine's process, model loaded and run
    joules_per_token: float | None = None   # RAPL package energy / tokens processed, if exposed
    runtime_rss_mb: float = 0.0   # the same process once its libraries were imported, before the model


RAPL = Path("/sys/class/powercap")


def rapl_joules() -> float | None:
    """Package energy counters summed, in joules; None where RAPL is not readable."""
    files = sorted(RAPL.glob("intel-rapl:[0-9]*/energy_uj")) if RAPL.is_dir() else []
    try:
        return sum(int(f.read_text()) for f in files) / 1e6 if files else None
    except (OSError, ValueError):
        return None


def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration, ValueError):
        return 0.0


def memory_budget_mb(path: str, tokens: int, value_bytes: int = 4) -> float:
    """Issue 4's memory target: 1.5x the GGUF file + the KV cache of `tokens` tokens, at
    value_bytes per key or value (4: float32, 2: float16)."""
    from jisu.config import ModelConfig
    from jisu.loader import read_gguf
    cfg = ModelConfig.from_gguf(read_gguf(path))
    kv = tokens * cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * value_bytes
    return (1.5 * Path(path).stat().st_size + kv) / 2**20


def _median_rate(n: int, times: list[float]) -> float:
    return n / statistics.median(times)


def prompt_path(llm) -> str:
    """How prompts' GEMMs run, for the notes column: AMX tiles (bf16 weights, or three products
    with JISU_AMX=exact) from some row count, or the int16 GEMM (empty where there is no AMX)."""
    from jisu.kernels import cpu
    ops = cpu.load() if llm.kernels else None
    if not getattr(ops, "amx", False):
        return ""
    rows, exact = ops.amx_settings()
    if rows == 0:
        return ", prompts on the int16 GEMM (JISU_AMX=0)"
    return f", prompts on AMX from {rows} rows ({'three products, JISU_AMX=exact' if exact else 'bf16 weights'})"


def bench_jisu(path: str, prompt_ids: list[int], decode_ids: list[int], n_decode: int, repeats: int, threads: int,
               activations: str = "int16") -> SpeedResult:
    from jisu import LLM, SamplingParams
    t0 = time.perf_counter()
    # no prefix caching: every repeat must prefill the same prompt from scratch
    llm = LLM(path, num_threads=threads, progress=False, enable_prefix_caching=False, activations=activations)
    load = time.perf_counter() - t0
    step = llm.engine.step
    prefill, decode = [], []
    greedy1 = SamplingParams(max_tokens=1, temperature=0)
    greedyN = SamplingParams(max_tokens=n_decode, temperature=0, ignore_eos=True)
    llm.generate(prompt_token_ids=[prompt_ids[:16]], params=greedy1)       # warm-up
    for _ in range(repeats):
        t = time.perf_counter()
        llm.generate(prompt_token_ids=[prompt_ids], params=greedy1)
        prefill.append(time.perf_counter() - t)
        llm.engine.add_request("bench", decode_ids, greedyN)
        while not llm.engine.sequences["bench"][0].num_output_tokens:
            step()                                                # prefill (in chunks) + first token
        t = time.perf_counter()
        while llm.engine.has_unfinished():
            step()
        decode.append(time.perf_counter() - t)
        seq = llm.engine.release("bench")[0]
        if seq.num_output_tokens != n_decode:       # the rate would be of fewer tokens than it says
            raise RuntimeError(f"decode stopped after {seq.num_output_tokens} of {n_decode} tokens "
                               f"({seq.finish_reason}): the context holds {llm.max_model_len} tokens")
    how = "GGUF blocks + C++ kernels" if llm.kernels else "dense fp32 (PyTorch path)"
    how += prompt_path(llm)
    return SpeedResult("jisu", _median_rate(n_decode - 1, decode), _median_rate(len(prompt_ids), prefill), load,
                       f"{how}, {activations} decode activations, {threads} threads", statistics.median(prefill))


def bench_llama_cpp(path: str, prompt_ids: list[int], decode_ids: list[int], n_decode: int, repeats: int,
                    threads: int) -> SpeedResult:
    import llama_cpp
    t0 = time.perf_counter()
    n_ctx = max(2048, len(prompt_ids) + 16, len(decode_ids) + n_decode + 16)
    llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    load = time.perf_counter() - t0
    # the last evaluated row's logits from the context: llama-cpp-python 0.3 no longer copies
    # them into `scores` unless every row's logits are kept (its rows there are uninitialized)
    n_vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:
        return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))

    prefill, decode = [], []
    llm.reset(); llm.eval(prompt_ids[:16])                          # warm-up
    for _ in range(repeats):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt_ids)
        prefill.append(time.perf_counter() - t)
        llm.reset()
        llm.eval(decode_ids)
        tok = int(np.argmax(last_logits()))
        t = time.perf_counter()
        for _ in range(n_decode - 1):
            llm.eval([tok])
            tok = int(np.argmax(last_logits()))
        decode.append(time.perf_counter() - t)
    return SpeedResult("llama.cpp", _median_rate(n_decode - 1, decode), _median_rate(len(prompt_ids), prefill), load,
                       f"llama-cpp-python {llama_cpp.__version__}, {threads} threads", statistics.median(prefill))


def bench_transformers(path: str, prompt_ids: list[int], decode_ids: list[int], n_decode: int, repeats: int,
                       threads: int) -> SpeedResult:
    import torch
    import transformers
    torch.set_num_threads(threads)
    p = Path(path)
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    load = time.perf_counter() - t0
    prefill, decode = [], []
    # transformers 5.x renamed past_key_values to cache
    cache_arg = "cache" if "cache" in transformers.modeling_outputs.CausalLMOutputWithPast.__dataclass_fields__ \
        else "past_key_values"
    with torch.inference_mode():
        model(torch.tensor([prompt_ids[:16]]))
        for _ in range(repeats):
            t = time.perf_counter()
            model(torch.tensor([prompt_ids]), logits_to_keep=1)
            prefill.append(time.perf_counter() - t)
            out = model(torch.tensor([decode_ids]), use_cache=True, logits_to_keep=1)
            tok = out.logits[0, -1].argmax()
            t = time.perf_counter()
            for _ in range(n_decode - 1):
                out = model(tok.view(1, 1), use_cache=True, **{cache_arg: getattr(out, cache_arg)})
                tok = out.logits[0, -1].argmax()
            decode.append(time.perf_counter() - t)
    return SpeedResult("transformers", _median_rate(n_decode - 1, decode), _median_rate(len(prompt_ids), prefill), load,
                       f"transformers {transformers.__version__}, fp32, {threads} threads", statistics.median(prefill))


BENCHES = {"jisu": bench_jisu, "llama.cpp": bench_llama_cpp, "transformers": bench_transformers}
MODULES = {"llama.cpp": "llama_cpp", "transformers": "transformers"}


RUNTIMES = {"jisu": ("jisu",), "llama.cpp": ("llama_cpp",), "transformers": ("torch", "transformers")}


def _child(name: str, args: tuple, out) -> None:
    import importlib
    import resource
    try:
        for module in RUNTIMES[name]:
            importlib.import_module(module)
        if name == "jisu":
            importlib.import_module("jisu.kernels.cpu").load()      # the compiled kernels' library
        runtime = _rss_mb()
        e0 = rapl_joules()
        res = BENCHES[name](*args)
        e1 = rapl_joules()
        _, ids, decode_ids, n_decode, repeats = args[:5]
        if e0 is not None and e1 is not None and e1 >= e0:   # every token computed, prompts included
            res.joules_per_token = (e1 - e0) / (min(16, len(ids)) + repeats * (len(ids) + len(decode_ids) + n_decode - 1))
        res.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        res.runtime_rss_mb = runtime
        out.put(res)
    except BaseException as e:   # reported by the parent
        out.put(f"{type(e).__name__}: {e}")


def _merge(rs: list[SpeedResult]) -> SpeedResult:
    """One engine's rounds: medians of the rates and times; memory from the round whose model
    took the most over its own runtime (peak and runtime from the same process: the largest peak
    less the median runtime read a round with a larger runtime as the model's memory)."""
    med = lambda f: statistics.median(getattr(r, f) for r in rs)   # noqa: E731
    joules = [r.joules_per_token for r in rs]
    worst = max(rs, key=lambda r: r.peak_rss_mb - r.runtime_rss_mb)
    return SpeedResult(rs[0].engine, med("decode_tok_s"), med("prefill_tok_s"), med("load_s"),
                       rs[0].detail + (f", median of {len(rs)} rounds" if len(rs) > 1 else ""),
                       med("ttft_s"), worst.peak_rss_mb,
                       None if None in joules else statistics.median(joules), worst.runtime_rss_mb)


def bench_prompts(tok, text: str, prompt_tokens: int, decode_context: int) -> tuple[list[int], list[int]]:
    """The prefill prompt (prompt_tokens ids) and the decode prompt (decode_context ids): the
    starts of one encoding of `text` repeated until it is long enough for both."""
    if not text:
        raise ValueError("bench_prompts: empty text")
    copies = 4
    ids = tok.encode(text * copies, add_special=True)
    while len(ids) < max(prompt_tokens, decode_context):
        longer = tok.encode(text * copies * 2, add_special=True)
        if len(longer) <= len(ids):
            raise ValueError("bench_prompts: the text encodes to no tokens")
        copies, ids = copies * 2, longer
    return ids[:prompt_tokens], ids[:decode_context]


def run(path: str, compare: list[str], prompt_tokens: int = 512, n_decode: int = 64, repeats: int = 5,
        threads: int = 2, echo=print, activations: str = "int16", rounds: int = 1,
        decode_context: int = DECODE_CONTEXT) -> list[SpeedResult]:
    """Prefill: a prompt_tokens prompt to its first token. Decode: n_decode greedy tokens after a
    decode_context-token prompt (8: a short chat turn; thousands: a long conversation, where
    every step's attention reads the whole context)."""
    import importlib.util
    import multiprocessing as mp

    from jisu.config import ModelConfig
    from jisu.loader import read_gguf
    from jisu.tokenizer import Tokenizer
    g = read_gguf(path)
    longest = ModelConfig.from_gguf(g).context_length
    if prompt_tokens + 1 > longest or decode_context + n_decode > longest:
        raise ValueError(f"the model's context holds {longest} tokens: a {prompt_tokens}-token prompt plus one, or "
                         f"{decode_context} tokens of context plus {n_decode} decoded, does not fit")
    text = PROMPT_FILE.read_text() if PROMPT_FILE.exists() else FALLBACK_TEXT
    tok = Tokenizer.from_gguf(g)
    ids, decode_ids = bench_prompts(tok, text, prompt_tokens, decode_context)
    ctx = mp.get_context("spawn")        # a fresh process per engine: its own memory, no shared threads
    names = []
    for name in ["jisu"] + [c for c in compare if c != "jisu"]:
        if name not in BENCHES:
            echo(f"skipping unknown comparator '{name}' (known: {', '.join(BENCHES)})")
        elif name in MODULES and importlib.util.find_spec(MODULES[name]) is None:
            echo(f"skipping {name}: python module '{MODULES[name]}' is not installed")
        else:
            names.append(name)
    # rounds: every engine once per round, in turn, so a slow spell of a shared machine lands on
    # all of them rather than on whichever ran then; each figure is the median over rounds
    runs: dict[str, list[SpeedResult]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names:
            if name != "jisu" and r and not runs[name]:
                continue                  # it failed in an earlier round
            echo(f"running {name}" + (f" (round {r + 1} of {rounds})" if rounds > 1 else "") + " ...")
            out = ctx.Queue()
            args = (path, ids, decode_ids, n_decode, repeats, threads) + ((activations,) if name == "jisu" else ())
            proc = ctx.Process(target=_child, args=(name, args, out))
            proc.start()
            res = out.get()
            proc.join()
            if isinstance(res, str):
                if name == "jisu":
                    raise RuntimeError(f"jisu benchmark failed: {res}")
                echo(f"skipping {name}: it failed: {res}")
                runs[name] = []
                continue
            runs[name].append(res)
    results = [_merge(rs) for rs in runs.values() if rs]
    if rapl_joules() is None:
        echo("energy: RAPL (/sys/class/powercap) is not exposed on this machine; J/token not measured")
    return results


def table(results: list[SpeedResult], title: str) -> str:
    base = results[0]
    lines = [f"### {title}", "",
             "| engine | decode tok/s | prefill tok/s | TTFT ms | peak RSS MB | over runtime MB | J/token | load s | "
             "jisu decode ratio | jisu prefill ratio | notes |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        energy = "n/a" if r.joules_per_token is None else f"{r.joules_per_token:.3f}"
        lines.append(f"| {r.engine} | {r.decode_tok_s:.1f} | {r.prefill_tok_s:.1f} | {r.ttft_s * 1e3:.0f} | "
                     f"{r.peak_rss_mb:.0f} | {r.peak_rss_mb - r.runtime_rss_mb:.0f} | {energy} | {r.load_s:.2f} | {base.decode_tok_s / r.decode_tok_s:.2f}x | "
                     f"{base.prefill_tok_s / r.prefill_tok_s:.2f}x | {r.detail} |")
    return "\n".join(lines)


def chart(results: list[SpeedResult], title: str, path: str) -> bool:
    """Bar charts of decode and prefill tok/s per engine, as a PNG. False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    names = [r.engine for r in results]
    for ax, attr, label in ((axes[0], "decode_tok_s", "decode tok/s"), (axes[1], "prefill_tok_s", "prefill tok/s")):
        vals = [getattr(r, attr) for r in results]
        bars = ax.bar(names, vals, color=["#c0392b"] + ["#7f8c8d"] * (len(vals) - 1))
        ax.bar_label(bars, fmt="%.0f")
        ax.set_title(label)
        ax.set_ylim(0, max(vals) * 1.2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
