"""Command line: `jisu run | chat | serve | pull | perplexity | models | bench`."""

from __future__ import annotations

import time

import click

from jisu.bench import DECODE_CONTEXT
from jisu.registry import DEFAULT_MODEL, MODELS

MODEL_HELP = f"registry name ({', '.join(MODELS)}) or path to a .gguf file [default: {DEFAULT_MODEL}]"


def activations_option(f):
    return click.option(
        "--activations", type=click.Choice(["int16", "int8", "float32"]), default="int16", show_default=True,
        help="how decode steps feed activations to the quantized kernels: int16 (fast, matches float32 "
             "to ~1e-5), int8 (fastest, as llama.cpp; top-1 moves a few %), float32 (exact)")(f)


def kv_dtype_option(f):
    return click.option(
        "--kv-cache-dtype", type=click.Choice(["auto", "float16", "float32"]), default="auto", show_default=True,
        help="keys and values in the KV cache: auto is float16 with integer activations (half the memory "
             "and the attention's reads) and float32 with --activations float32")(f)


def sampling_options(f):
    opts = [
        click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True),
        click.option("--temperature", type=click.FloatRange(min=0), default=0.8, show_default=True),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True),
        click.option("--top-k", type=int, default=40, show_default=True),
        click.option("--min-p", type=click.FloatRange(0, 1), default=0.05, show_default=True),
        click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True),
        click.option("--seed", type=int, default=None),
        click.option("--stop", multiple=True, help="stop string (repeatable)"),
        click.option("--ignore-eos", is_flag=True),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _params(kw):
    from jisu import SamplingParams
    try:
        return SamplingParams(max_tokens=kw["max_tokens"], temperature=kw["temperature"], top_p=kw["top_p"],
                              top_k=kw["top_k"], min_p=kw["min_p"], repetition_penalty=kw["repetition_penalty"],
                              seed=kw["seed"], stop=list(kw["stop"]), ignore_eos=kw["ignore_eos"])
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


# what a bad model name, file or option raises while loading: shown as a one-line error
LOAD_ERRORS = (FileNotFoundError, ValueError, RuntimeError)


def _load(model: str | None, threads: int | None, max_model_len: int | None = None, activations: str = "int16",
          kv_cache_dtype: str = "auto"):
    from jisu import LLM
    try:
        return LLM(model, num_threads=threads, max_model_len=max_model_len, activations=activations,
                   kv_cache_dtype=kv_cache_dtype)
    except LOAD_ERRORS as e:
        raise click.ClickException(str(e)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="jisu")
def main():
    """jisu (极速): fast LLM inference on your machine."""


@main.command()
@click.argument("prompt")
@click.option("-m", "--model", default=None, help=MODEL_HELP)
@click.option("--threads", type=int, default=None, help="CPU threads [default: all cores]")
@click.option("--stats", is_flag=True, help="print tokens/s to stderr")
@activations_option
@kv_dtype_option
@sampling_options
def run(prompt, model, threads, stats, activations, kv_cache_dtype, **kw):
    """Complete PROMPT and print the completion as it is generated."""
    params = _params(kw)
    llm = _load(model, threads, activations=activations, kv_cache_dtype=kv_cache_dtype)
    t0 = time.perf_counter()
    n = 0
    try:
        for piece in llm.stream(prompt, params):
            n += 1
            click.echo(piece, nl=False)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo()
    if stats:
        dt = time.perf_counter() - t0
        click.echo(f"[{n} pieces in {dt:.2f}s, model loaded in {llm.load_seconds:.2f}s]", err=True)


@main.command()
@click.option("-m", "--model", default=None, help=MODEL_HELP)
@click.option("--system", default=None, help="system prompt")
@click.option("--threads", type=int, default=None)
@activations_option
@kv_dtype_option
@sampling_options
def chat(model, system, threads, activations, kv_cache_dtype, **kw):
    """Interactive chat with the model's own template; replies stream. /reset clears, /exit quits."""
    params = _params(kw)
    llm = _load(model, threads, activations=activations, kv_cache_dtype=kv_cache_dtype)
    history = [{"role": "system", "content": system}] if system else []
    click.echo(f"jisu chat: {llm.config.name} (/reset, /exit, Ctrl-D)", err=True)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            click.echo()
            return
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history = history[:1] if system else []
            continue
        history.append({"role": "user", "content": line})
        prompt = llm.tokenizer.apply_chat_template(history, add_generation_prompt=True)
        reply = []
        try:
            for piece in llm.stream(prompt, params):
                reply.append(piece)
                click.echo(piece, nl=False)
        except KeyboardInterrupt:
            pass
        except ValueError as e:        # e.g. the conversation outgrew the context
            click.echo(f"\nerror: {e}", err=True)
            history.pop()
            continue
        click.echo()
        history.append({"role": "assistant", "content": "".join(reply)})


@main.command()
@click.option("-m", "--model", default=None, help=MODEL_HELP)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", default=None, envvar="JISU_API_KEY",
              help="require 'Authorization: Bearer KEY' on /v1 (also $JISU_API_KEY)")
@click.option("--served-model-name", default=None, help="model id clients use [default: the -m value]")
@click.option("--kv-cache-gb", type=click.FloatRange(min=0, min_open=True), default=None,
              help="KV-cache pool size [default: --kv-cache-fraction of free memory]")
@click.option("--kv-cache-fraction", type=click.FloatRange(0, 0.9, min_open=True), default=0.25, show_default=True)
@click.option("--max-num-seqs", type=click.IntRange(min=1), default=64, show_default=True,
              help="sequences decoded together")
@click.option("--max-num-batched-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="tokens per step (decodes plus prompt chunks)")
@click.option("--max-queue", type=click.IntRange(min=0), default=256, show_default=True,
              help="sequences that may wait beyond a full batch; more get 429")
@click.option("--max-model-len", type=click.IntRange(min=2), default=None)
@click.option("--no-prefix-caching", is_flag=True)
@click.option("--threads", type=int, default=None)
@click.option("--log-prompts", is_flag=True, help="log prompt text (off by default)")
@activations_option
@kv_dtype_option
def serve(model, host, port, api_key, served_model_name, kv_cache_gb, kv_cache_fraction, max_num_seqs,
          max_num_batched_tokens, max_queue, max_model_len, no_prefix_caching, threads, log_prompts, activations,
          kv_cache_dtype):
    """OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /metrics)."""
    import logging
    import threading

    import uvicorn

    from jisu import LLM
    from jisu.registry import DEFAULT_MODEL
    from jisu.server.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # Loaded on a thread that then exits, taking its OpenMP team with it: the engine thread's
    # parallel regions are then the only ones. With a second team alive (the main thread's,
    # from loading), libgomp counts more threads than cores and stops spinning between regions,
    # so every region of a decode step slept and woke (measured: 9.6 ms per token streamed at
    # one client against 3.8 ms in-process; 27% of samples in the kernel's task switching).
    built: dict = {}

    def load():
        try:
            built["llm"] = LLM(model, kv_cache_gb=kv_cache_gb, kv_cache_fraction=kv_cache_fraction,
                               num_threads=threads, max_num_seqs=max_num_seqs,
                               max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                               enable_prefix_caching=not no_prefix_caching, activations=activations,
                               kv_cache_dtype=kv_cache_dtype)
        except BaseException as e:       # re-raised on the main thread
            built["error"] = e

    loader = threading.Thread(target=load, name="jisu-load")
    loader.start()
    loader.join()
    if "error" in built:
        e = built["error"]
        if isinstance(e, LOAD_ERRORS):
            raise click.ClickException(str(e)) from None
        raise e
    llm = built["llm"]
    app = create_app(llm, served_model_name or model or DEFAULT_MODEL, api_key=api_key,
                     max_queue=max_queue, log_prompts=log_prompts)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=60)


@main.command()
@click.argument("model", type=click.Choice(list(MODELS)))
def pull(model):
    """Download MODEL into $JISU_HOME (default ~/.cache/jisu) and verify its sha256."""
    from jisu.registry import PullError, pull as do_pull
    try:
        click.echo(str(do_pull(model)))
    except PullError as e:
        raise click.ClickException(str(e)) from None


@main.command()
def models():
    """List the models jisu can pull by name."""
    from jisu.registry import is_pulled, model_path
    for name, spec in MODELS.items():
        where = model_path(name) if is_pulled(name) else "(not pulled)"
        click.echo(f"{name:24s} {spec.size / 2**20:7.1f} MiB  {spec.description}  {where}")


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("-m", "--model", default=None, help=MODEL_HELP)
@click.option("--threads", type=int, default=None)
@click.option("--ctx", type=int, default=None, help="window length [default: the model's context]")
def perplexity(file, model, threads, ctx):
    """Perplexity of the model on the text in FILE."""
    llm = _load(model, threads, ctx)
    try:
        text = open(file, encoding="utf-8").read()
        t0 = time.perf_counter()
        ppl = llm.perplexity(text)
    except (FileNotFoundError, ValueError, UnicodeDecodeError) as e:
        raise click.ClickException(str(e)) from None
    n = len(llm.tokenizer.encode(text, add_special=True))
    click.echo(f"perplexity: {ppl:.4f}  ({n} tokens, {time.perf_counter() - t0:.1f}s)")


@main.command()
@click.option("-m", "--model", default=None, help=MODEL_HELP)
@click.option("--compare", default="llama.cpp,transformers", show_default=True,
              help="comma-separated comparators (llama.cpp, transformers); missing ones are skipped")
@click.option("--prompt-tokens", type=click.IntRange(min=8), default=512, show_default=True)
@click.option("--decode-tokens", type=click.IntRange(min=2), default=64, show_default=True)
@click.option("--decode-context", type=click.IntRange(min=1), default=DECODE_CONTEXT, show_default=True,
              help="prompt tokens before the decoded ones (thousands: decode deep in a long conversation)")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=1, show_default=True,
              help="run every engine this many times, in turn, and report medians over rounds")
@click.option("--chart", default=None, help="PNG chart path [default: bench-MODEL.png]")
@click.option("--no-chart", is_flag=True)
@activations_option
def bench(model, compare, prompt_tokens, decode_tokens, decode_context, repeats, threads, rounds, chart, no_chart,
          activations):
    """Decode and prefill tokens/s of jisu next to llama.cpp and transformers (medians, ratios)."""
    from jisu.bench import speed
    from jisu.registry import resolve
    path = str(resolve(model))
    chart = None if no_chart else chart or f"bench-{model or DEFAULT_MODEL}.png".replace("/", "_")
    try:
        results = speed.run(path, [c.strip() for c in compare.split(",") if c.strip()], prompt_tokens,
                            decode_tokens, repeats, threads, echo=lambda m: click.echo(m, err=True),
                            activations=activations, rounds=rounds, decode_context=decode_context)
    except (ValueError, RuntimeError) as e:     # a length that does not fit; jisu's run failing
        raise click.ClickException(str(e)) from None
    title = (f"{model or DEFAULT_MODEL}: {prompt_tokens}-token prompt, {decode_tokens} decoded tokens"
             + (f" after {decode_context} tokens of context" if decode_context != DECODE_CONTEXT else "")
             + f", median of {repeats}"
             + (f" x {rounds} rounds" if rounds > 1 else ""))
    click.echo(speed.table(results, title))
    n = max(prompt_tokens + 1, decode_context + decode_tokens)
    click.echo(f"\n\"over runtime\" is peak RSS less the RSS once the engine's libraries were imported "
               f"(torch and our kernels for jisu). Memory target: 1.5 x the GGUF file + the KV cache of {n} "
               f"tokens = {speed.memory_budget_mb(path, n, 4):.0f} MB with float32 values, "
               f"{speed.memory_budget_mb(path, n, 2):.0f} MB with float16 (jisu's default and llama.cpp's).")
    if chart:
        if speed.chart(results, title, chart):
            click.echo(f"chart written to {chart}", err=True)
        else:
            click.echo("matplotlib is not installed: no chart (pip install matplotlib)", err=True)


if __name__ == "__main__":
    main()
