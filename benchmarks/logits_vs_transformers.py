"""Mean KL and top-1 agreement of prompt logits against transformers' float32 logits of the same
GGUF (dequantized), for jisu's prompt paths and, where it is installed, llama.cpp.

    python benchmarks/logits_vs_transformers.py -m smollm2-135m-instruct -m gemma3-270m

Text: tests/data/gpl3_preamble.txt, one window, BOS as the file's metadata says (the tests' text).
jisu rows: the default; on a CPU with AMX also JISU_AMX=exact (three tile products) and the int16
GEMM (AMX off). llama.cpp: llama-cpp-python with logits_all, the same token ids.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

TEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "gpl3_preamble.txt"


def reference_logits(path: Path, ids: list[int]) -> torch.Tensor:
    """transformers' float32 logits [len(ids), vocab] of the GGUF at path (dequantized); the
    other accuracy scripts in benchmarks/ import this and divergence."""
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


def divergence(ref: torch.Tensor, ours: torch.Tensor) -> tuple[torch.Tensor, float]:
    """KL(ref || ours) at every position, and the share of positions whose top tokens agree."""
    ref_lp, lp = ref.log_softmax(-1), ours.log_softmax(-1)
    return (ref_lp.exp() * (ref_lp - lp)).sum(-1), (ref.argmax(-1) == ours.argmax(-1)).float().mean().item()


def jisu_rows(llm, ids: list[int]) -> list[tuple[str, torch.Tensor]]:
    from jisu.kernels import cpu
    ops = cpu.load()
    rows = [(f"jisu (JISU_AMX={os.environ.get('JISU_AMX', 'unset')})", torch.from_numpy(llm.logits(ids)))]
    if getattr(ops, "amx", False):
        for label, min_rows, exact in (("jisu, JISU_AMX=exact", ops.AMX_MIN_ROWS, True),
                                       ("jisu, int16 GEMM (JISU_AMX=0)", 0, None)):
            with cpu.amx_from(min_rows, exact):
                rows.append((label, torch.from_numpy(llm.logits(ids))))
    return rows


def llama_cpp_row(path: str, ids: list[int], threads: int) -> list[tuple[str, torch.Tensor]]:
    try:
        import llama_cpp
    except ImportError:
        print("llama.cpp: llama-cpp-python is not installed, skipped")
        return []
    ll = llama_cpp.Llama(path, n_ctx=2048, n_batch=1024, logits_all=True, n_threads=threads, verbose=False)
    ll.eval(ids)
    return [("llama.cpp", torch.from_numpy(np.array(ll.scores[:len(ids)], dtype=np.float32)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", action="append", default=None, help="model name or GGUF path (repeatable)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp's threads")
    args = ap.parse_args()
    from jisu import LLM
    text = TEXT.read_text()
    print("| model | engine | tokens | mean KL vs transformers fp32 | top-1 agreement |\n|---|---|---|---|---|")
    for name in args.model or ["smollm2-135m-instruct"]:
        llm = LLM(name, enable_prefix_caching=False, progress=False)
        path = Path(llm.path)
        ids = llm.tokenizer.encode(text, add_special=True)
        ref = reference_logits(path, ids)
        for label, logits in jisu_rows(llm, ids) + llama_cpp_row(str(path), ids, args.threads):
            kl, top1 = divergence(ref, logits)
            print(f"| {name} | {label} | {len(ids)} | {kl.mean().item():.2e} | {100 * top1:.2f}% |", flush=True)


if __name__ == "__main__":
    main()
