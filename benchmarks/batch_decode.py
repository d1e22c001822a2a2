"""Aggregate decode speed of the engine in one process, by batch size: B sequences are
prefilled, then each decodes --tokens greedy tokens; prints tok/s per batch size.

    python benchmarks/batch_decode.py -m smollm2-135m-instruct --batch 1,8,32,64
"""

from __future__ import annotations

import argparse
import time

from jisu import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", default="1,8,32,64")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--activations", default="int16", choices=["int16", "int8", "float32"])
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float16", "float32"])
    ap.add_argument("--full-logits", action="store_true",
                    help="compute every logit of greedy rows (no screened argmax): the before of that change")
    args = ap.parse_args()
    sizes = [int(b) for b in args.batch.split(",")]
    llm = LLM(args.model, progress=False, max_num_seqs=max(sizes), activations=args.activations,
              kv_cache_dtype=args.kv_cache_dtype)
    eng = llm.engine
    if args.full_logits:
        llm.model.greedy = lambda h, vocab: None
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": f"Question {i}: why is the sky blue?"}])
               for i in range(max(sizes))]
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)    # warm-up
    print(f"| sequences | decode tok/s (aggregate, {args.activations} activations, "
          f"{llm.engine_config.kv_cache_dtype} KV) |\n|---|---|")
    for b in sizes:
        rids = [f"{b}-{i}" for i in range(b)]
        for rid, prompt in zip(rids, prompts):
            eng.add_request(rid, llm._encode_prompt(prompt), params)
        while any(s.num_output_tokens == 0 for rid in rids for s in eng.sequences[rid]):
            eng.step()                                   # prefill (and first tokens)
        n, t0 = 0, time.perf_counter()
        while eng.has_unfinished():
            n += len(eng.step())
        rate = n / (time.perf_counter() - t0)
        for rid in rids:
            eng.release(rid)
        print(f"| {b} | {rate:.1f} |", flush=True)


if __name__ == "__main__":
    main()
