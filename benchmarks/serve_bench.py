"""Serving benchmark: N concurrent streaming clients against `jisu serve`, and against
llama.cpp's `llama-server -np N` run the same way when its binary is given.

    python benchmarks/serve_bench.py -m smollm2-135m-instruct --concurrency 1,8,32,64 \
        --llama-server /path/to/llama-server

Every client sends `--rounds` requests one after another: a real prompt (a question in the
model's chat template), `--max-tokens` tokens with EOS ignored so every engine generates the
same number. Per level it reports aggregate output tok/s (all tokens / wall time), TTFT and
inter-token latency (ITL) p50/p99. Then, on jisu, the TTFT of a request whose ~1k-token
prefix is cached against one whose prefix is not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
LOG_DIR = Path(os.environ.get("TMPDIR", "/tmp"))      # the servers' logs, for when a run fails
QUESTIONS = [
    "Explain how a rainbow forms.", "Write a haiku about autumn leaves.", "What is a prime number?",
    "Give three tips for learning a new language.", "Describe the water cycle.", "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet.", "How do vaccines work?", "What is machine learning?",
    "Write a short story about a lost key.", "List the planets of the solar system.",
    "How does a bicycle stay upright?", "What causes earthquakes?", "Explain photosynthesis simply.",
    "Suggest a name for a bakery.", "What is the difference between weather and climate?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def one_request(cl: httpx.AsyncClient, base: str, prompt: str, max_tokens: int, model: str) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, tokens = [], None
    async with cl.stream("POST", base + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                times.append(time.perf_counter())
    return {"ttft": times[0] - t0 if times else float("nan"), "itl": [b - a for a, b in zip(times, times[1:])],
            "tokens": len(times) if tokens is None else tokens}


async def load_level(base: str, prompts: list[str], concurrency: int, rounds: int, max_tokens: int,
                     model: str) -> dict:
    # a fresh connection per request, for both servers: llama-server (0.3.36's) closed kept-alive
    # connections after a streamed response, and the next request on one failed
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=None, limits=limits) as cl:
        await one_request(cl, base, prompts[0], 4, model)             # warm-up
        t0 = time.perf_counter()

        async def client(i: int):
            return [await one_request(cl, base, prompts[(i * rounds + k) % len(prompts)], max_tokens, model)
                    for k in range(rounds)]
        results = [r for rs in await asyncio.gather(*(client(i) for i in range(concurrency))) for r in rs]
        wall = time.perf_counter() - t0
    n = sum(r["tokens"] for r in results)
    itl = [x for r in results for x in r["itl"]]
    ttft = [r["ttft"] for r in results]
    return {"tok_s": n / wall, "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
            "itl_p50": percentile(itl, 50), "itl_p99": percentile(itl, 99), "wall": wall,
            "short": sum(r["tokens"] < max_tokens for r in results)}


def chat_prompts(model_path: str) -> tuple[list[str], object]:
    from jisu.loader.gguf import read_gguf
    from jisu.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(read_gguf(model_path))
    return [tok.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS], tok


async def prefix_ttft(base: str, tok, model: str, repeats: int = 3) -> dict:
    """TTFT with a ~1k-token document prefix: cold (a fresh nonce in front, nothing cached) and
    warm (the same document again with another question)."""
    doc = (ROOT / "tests" / "data" / "gpl3_preamble.txt").read_text()
    while len(tok.encode(doc)) < 1000:
        doc += "\n\n" + doc
    doc_ids = tok.encode(doc)[:1000]
    doc = tok.decode(doc_ids)
    cold, warm = [], []
    async with httpx.AsyncClient(timeout=None) as cl:
        for k in range(repeats):
            nonce = f"Document {k} {time.time_ns()}:\n"
            r = await one_request(cl, base, nonce + doc + "\nQuestion: what is this about?", 2, model)
            cold.append(r["ttft"])
            r = await one_request(cl, base, nonce + doc + "\nQuestion: who wrote it?", 2, model)
            warm.append(r["ttft"])
    return {"prefix_tokens": len(doc_ids), "cold": statistics.median(cold), "warm": statistics.median(warm)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"),
                    help="path to llama.cpp's llama-server binary (skipped when absent)")
    ap.add_argument("--jisu-args", default="", help="extra arguments for jisu serve")
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]

    from jisu.registry import resolve
    path = str(resolve(args.model, progress=True))
    prompts, tok = chat_prompts(path)
    rows: dict[str, dict[int, dict]] = {}

    def run_server(name: str, cmd: list[str]) -> dict | None:
        """Starts one server (its log in LOG_DIR/NAME.log), runs every level against it into
        rows[name], stops it. For jisu it also measures prefix-cache TTFT and returns it."""
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(cmd + ["--port", str(port)], stdout=open(LOG_DIR / f"{name}.log", "w"),
                                stderr=subprocess.STDOUT)
        try:
            wait_up(base + "/health", proc)
            rows[name] = {}
            for c in levels:
                rows[name][c] = asyncio.run(load_level(base, prompts, c, args.rounds, args.max_tokens, "m"))
                print(f"{name:12s} c={c:3d}: {rows[name][c]['tok_s']:7.1f} tok/s", file=sys.stderr)
            return asyncio.run(prefix_ttft(base, tok, "m")) if name == "jisu" else None
        finally:
            stop(proc)

    prefix = run_server("jisu", [sys.executable, "-m", "jisu.cli", "serve", "-m", path, "--served-model-name", "m",
                                 "--max-num-seqs", str(max(levels)), "--kv-cache-gb", "2",
                                 "--threads", str(args.threads), *args.jisu_args.split()])
    if args.llama_server and Path(args.llama_server).exists():
        np_ = max(levels)
        run_server("llama-server", [args.llama_server, "-m", path, "-np", str(np_), "-c", str(np_ * 512),
                                    "-t", str(args.threads), "-tb", str(args.threads), "--no-webui"])
    else:
        print("llama-server not given (--llama-server or $LLAMA_SERVER): comparison skipped", file=sys.stderr)

    import torch
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads; "
          f"torch {torch.__version__}; model {Path(path).name}; {args.rounds} requests per client, "
          f"{args.max_tokens} tokens each (EOS ignored), greedy\n")
    print("| clients | engine | output tok/s | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | vs llama-server | vs jisu c=1 |")
    print("|---|---|---|---|---|---|---|")
    single = rows["jisu"][levels[0]]["tok_s"]
    for c in levels:
        for name, by_level in rows.items():
            r = by_level[c]
            ratio = (f"{r['tok_s'] / rows['llama-server'][c]['tok_s']:.2f}x"
                     if name == "jisu" and "llama-server" in rows else "")
            own = f"{r['tok_s'] / single:.2f}x" if name == "jisu" else ""
            warn = f" ({r['short']} short)" if r["short"] else ""
            print(f"| {c} | {name} | {r['tok_s']:.1f}{warn} | {r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} | "
                  f"{r['itl_p50'] * 1e3:.0f} / {r['itl_p99'] * 1e3:.0f} | {ratio} | {own} |")
    print(f"\nprefix cache (jisu): TTFT with a {prefix['prefix_tokens']}-token prefix, median of 3: "
          f"not cached {prefix['cold']:.3f} s, cached {prefix['warm']:.3f} s "
          f"({prefix['cold'] / prefix['warm']:.1f}x faster)")


if __name__ == "__main__":
    main()
