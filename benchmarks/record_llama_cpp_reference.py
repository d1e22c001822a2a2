"""Records llama.cpp's token ids and perplexity on our test corpus into
tests/data/llama_cpp_reference.json, which the test suite compares against.

    pip install llama-cpp-python   # see README: build flags for this CPU
    python benchmarks/record_llama_cpp_reference.py

Token ids: llama-cpp-python `Llama.tokenize(text, add_bos=False, special=False)`.
Perplexity: one window over tests/data/gpl3_preamble.txt, tokenized with BOS as the model's
metadata says (`add_bos=True` lets llama.cpp decide), from llama.cpp's own logits.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
sys.path.insert(0, str(ROOT))


def main() -> None:
    import llama_cpp
    from jisu.registry import MODELS, pull

    corpus = json.loads((DATA / "tokenizer_corpus.json").read_text())
    text = (DATA / "gpl3_preamble.txt").read_text()
    out = {"llama_cpp_python": llama_cpp.__version__, "models": {}}
    for name in MODELS:
        path = pull(name, progress=False)
        llm = llama_cpp.Llama(str(path), n_ctx=2048, n_threads=2, logits_all=True, verbose=False)
        ids = [llm.tokenize(s.encode("utf-8"), add_bos=False, special=False) for s in corpus]
        ppl_ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        llm.reset()
        llm.eval(ppl_ids)
        logits = np.asarray(llm.scores[: len(ppl_ids)], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll = -np.mean([logp[i - 1, t] for i, t in enumerate(ppl_ids) if i > 0])
        out["models"][name] = {"token_ids": ids, "perplexity_tokens": ppl_ids,
                               "perplexity": math.exp(nll)}
        print(f"{name}: {sum(map(len, ids))} corpus tokens, perplexity {math.exp(nll):.4f} "
              f"over {len(ppl_ids)} tokens")
    (DATA / "llama_cpp_reference.json").write_text(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
