"""The command line, run as a user would (subprocesses, real default model)."""

import subprocess
import sys

import pytest

from conftest import DATA


def jisu(args, home, stdin=None, timeout=300):
    env = {"JISU_HOME": str(home), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "jisu.cli", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def home(smollm2_path):
    return smollm2_path.parents[2]


def test_chat_streams_and_keeps_history(home):
    res = jisu(["chat", "--temperature", "0", "--max-tokens", "24"], home,
               stdin="What is the capital of France?\nWhat about Italy?\n/exit\n")
    assert res.returncode == 0, res.stderr
    first, second = res.stdout.split(">>> ")[1:3]
    assert "Paris" in first and "Rome" in second      # the second question needs the first turn
    assert "<|im_end|>" not in res.stdout


def test_perplexity_command(home, smollm2):
    from jisu.kernels import cpu
    res = jisu(["perplexity", str(DATA / "gpl3_preamble.txt")], home)
    assert res.returncode == 0, res.stderr
    value = float(res.stdout.split("perplexity:")[1].split()[0])
    # the shared model may reuse prefix blocks that earlier tests computed in other batches: the
    # AVX-512 integer GEMM's rows do not depend on the batch, AVX2's float32 kernels (chosen by
    # row count) move the values by ~1e-4
    ops = cpu.load()
    rel = 1e-4 if ops is not None and ops.isa == "avx512" else 1e-3
    assert value == pytest.approx(smollm2.perplexity((DATA / "gpl3_preamble.txt").read_text()), rel=rel)


def test_bad_model_is_a_clear_error(home, tmp_path):
    res = jisu(["run", "-m", str(tmp_path / "missing.gguf"), "hi"], home)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "neither a file nor a known name" in res.stderr
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    res = jisu(["run", "-m", str(bad), "hi"], home)
    assert res.returncode != 0 and "Traceback" not in res.stderr and "bad.gguf" in res.stderr


def test_bad_sampling_option(home):
    res = jisu(["run", "hi", "--top-p", "0"], home)
    assert res.returncode == 2 and "top-p" in res.stderr


def test_models_and_help(home):
    res = jisu(["models"], home)
    assert res.returncode == 0 and "smollm2-135m-instruct" in res.stdout and "gemma3-270m" in res.stdout
    for cmd in ["run", "chat", "pull", "perplexity", "bench", "models"]:
        assert jisu([cmd, "--help"], home).returncode == 0


def test_bench_reports_ttft_rss_and_writes_chart(tiny_llama_path, home, tmp_path):
    png = tmp_path / "bench.png"
    r = jisu(["bench", "-m", str(tiny_llama_path), "--compare", "", "--repeats", "1", "--prompt-tokens", "32",
              "--decode-tokens", "4", "--chart", str(png)], home)
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("| jisu |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    decode, prefill, ttft_ms, rss_mb, over_mb = (float(c) for c in cells[1:6])
    assert decode > 0 and prefill > 0 and ttft_ms > 0
    assert 50 < rss_mb < 4000                      # the child process's own peak, in MB
    assert 0 < over_mb < rss_mb - 50               # less the runtime (torch alone is > 50 MB)
    assert "Memory target: 1.5 x the GGUF file" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rounds_take_medians(tiny_llama_path, home):
    r = jisu(["bench", "-m", str(tiny_llama_path), "--compare", "", "--repeats", "1", "--prompt-tokens", "16",
              "--decode-tokens", "3", "--rounds", "2", "--no-chart", "--activations", "int8"], home)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("running jisu (round") == 2
    row = next(line for line in r.stdout.splitlines() if line.startswith("| jisu |"))
    assert "int8 decode activations" in row and "median of 2 rounds" in row
    assert "x 2 rounds" in r.stdout


def test_bench_memory_comes_from_one_round():
    """Over-runtime memory pairs each round's peak with that round's own runtime: the largest
    peak less the median runtime read a round with more runtime RSS as the model's memory."""
    from jisu.bench.speed import SpeedResult, _merge
    rounds = [SpeedResult("jisu", 300.0, 2700.0, 0.2, "d", 0.19, peak, None, runtime)
              for peak, runtime in ((370.0, 225.0), (377.0, 231.0), (365.0, 222.0))]
    merged = _merge(rounds)
    assert merged.peak_rss_mb - merged.runtime_rss_mb == 146.0     # round 2: 377 - 231, not 377 - 225
    assert merged.decode_tok_s == 300.0 and "median of 3 rounds" in merged.detail


def test_bench_decodes_after_a_long_context(tiny_llama_path, home):
    r = jisu(["bench", "-m", str(tiny_llama_path), "--compare", "", "--repeats", "1", "--prompt-tokens", "16",
              "--decode-tokens", "3", "--decode-context", "100", "--no-chart"], home)
    assert r.returncode == 0, r.stderr
    assert "3 decoded tokens after 100 tokens of context" in r.stdout
    row = next(line for line in r.stdout.splitlines() if line.startswith("| jisu |"))
    assert float(row.strip("|").split("|")[1]) > 0
    assert "the KV cache of 103 tokens" in r.stdout       # the longest sequence the run holds


def test_bench_prompts_repeat_the_text_until_long_enough(tiny_llama_path):
    from jisu.bench.speed import bench_prompts
    from jisu.loader import read_gguf
    from jisu.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(read_gguf(str(tiny_llama_path)))
    text = "a few words of text. "
    short = len(tok.encode(text * 4, add_special=True))
    prompt, decode = bench_prompts(tok, text, 16, 10 * short)
    assert len(prompt) == 16 and len(decode) == 10 * short
    assert decode[:16] == prompt                            # one encoding, two starts of it
    assert decode == tok.encode(text * 64, add_special=True)[:10 * short]


def test_bench_refuses_a_context_the_model_cannot_hold(tiny_llama_path, home):
    """A decode context plus the decoded tokens past the model's length would stop jisu early
    and report a rate for tokens it never decoded: refused before anything runs."""
    r = jisu(["bench", "-m", str(tiny_llama_path), "--compare", "", "--repeats", "1", "--prompt-tokens", "16",
              "--decode-tokens", "50", "--decode-context", "250", "--no-chart"], home)
    assert r.returncode != 0
    assert "the model's context holds 256 tokens" in r.stderr and "Traceback" not in r.stderr
    assert "running jisu" not in r.stderr


@pytest.mark.parametrize("enabled", [True, False])
def test_importing_llm_leaves_the_garbage_collector_as_it_was(enabled):
    """`jisu.LLM` imports torch with the collector paused (~0.2 s of cold start), and leaves it
    on or off as the caller had it, on or off during the import."""
    code = ("import gc, jisu\n"
            f"{'gc.enable()' if enabled else 'gc.disable()'}\n"
            "seen = []\n"
            "gc.callbacks.append(lambda phase, info: seen.append(phase))\n"
            "jisu.LLM\n"
            f"assert gc.isenabled() is {enabled}, gc.isenabled()\n"
            "assert not seen, seen\n"
            "import torch\n"
            "print(len(gc.get_objects()) > 10000)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_bench_names_the_prompt_path():
    """The notes column says how prompts' GEMMs ran: AMX with bf16 weights or three products, or
    the int16 GEMM; nothing where the CPU has no AMX."""
    import types

    from jisu.kernels.cpu import amx_from
    from jisu.bench.speed import prompt_path
    from jisu.kernels import cpu
    ops = cpu.load()
    llm = types.SimpleNamespace(kernels=ops is not None)
    if not getattr(ops, "amx", False):
        assert prompt_path(llm) == ""
        return
    with amx_from(64, exact=False):
        assert prompt_path(llm) == ", prompts on AMX from 64 rows (bf16 weights)"
    with amx_from(100, exact=True):
        assert prompt_path(llm) == ", prompts on AMX from 100 rows (three products, JISU_AMX=exact)"
    with amx_from(0):
        assert prompt_path(llm) == ", prompts on the int16 GEMM (JISU_AMX=0)"
