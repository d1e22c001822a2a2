"""The real models against the references: transformers (fp32 logits, perplexity) and llama.cpp
(perplexity recorded in tests/data/llama_cpp_reference.json), plus end-to-end generation."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import DATA
from jisu import SamplingParams
from jisu.kernels.cpu import amx_from

TEXT = (DATA / "gpl3_preamble.txt").read_text()
REFERENCE = json.loads((DATA / "llama_cpp_reference.json").read_text())["models"]
NAMES = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma3-270m"}
GREEDY_PROMPTS = ["The capital of France is", "def quicksort(arr):", "In 1492, Columbus"]


@pytest.fixture(scope="module", params=list(NAMES))
def ours_and_reference(request):
    """Our LLM, the token ids of TEXT, and transformers' fp32 logits for them."""
    transformers = pytest.importorskip("transformers")
    llm = request.getfixturevalue(request.param)
    path = request.getfixturevalue(f"{request.param}_path")
    ids = llm.tokenizer.encode(TEXT, add_special=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with torch.inference_mode():
        ref = model(torch.tensor([ids])).logits[0].float()
        greedy = {}
        for prompt in GREEDY_PROMPTS:
            prompt_ids = llm.tokenizer.encode(prompt, add_special=True)
            out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                                 max_new_tokens=16, min_new_tokens=16, do_sample=False)
            greedy[prompt] = out[0, len(prompt_ids):].tolist()
    del model
    return request.param, llm, ids, ref, greedy


def test_logits_match_transformers(ours_and_reference):
    name, llm, ids, ref, _ = ours_and_reference
    assert len(ids) > 600
    ours = torch.from_numpy(llm.logits(ids))
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    ref_lp, our_lp = ref.log_softmax(-1), ours.log_softmax(-1)
    kl = (ref_lp.exp() * (ref_lp - our_lp)).sum(-1)
    top1 = (ref.argmax(-1) == ours.argmax(-1)).float().mean().item()
    print(f"{name}: mean KL {kl.mean().item():.2e}, top-1 agreement {top1:.4f}")
    assert top1 >= 0.99
    assert kl.mean().item() <= 0.005


def test_one_row_steps_match_transformers(ours_and_reference):
    """Decode-shaped steps (one row each) go through the integer-activation kernels (the default,
    int16): fed the text one token at a time, the logits must still meet the same bars."""
    from jisu import LLM
    name, llm, ids, ref, _ = ours_and_reference
    one = LLM(llm.path, max_num_batched_tokens=1, enable_prefix_caching=False, progress=False)
    # the int16 activations where the kernels are on (JISU_KERNELS=torch: dense float32 there)
    assert getattr(one.model.output, "act_digits", 0) == (2 if hasattr(one.model.output, "ops") else 0)
    n = 200
    ours = torch.from_numpy(one.logits(ids[:n]))
    ref_lp, our_lp = ref[:n].log_softmax(-1), ours.log_softmax(-1)
    kl = (ref_lp.exp() * (ref_lp - our_lp)).sum(-1)
    top1 = (ref[:n].argmax(-1) == ours.argmax(-1)).float().mean().item()
    print(f"{name} one row at a time: mean KL {kl.mean().item():.2e}, top-1 agreement {top1:.4f}")
    assert top1 >= 0.99
    assert kl.mean().item() <= 0.005


def _logits_with_amx_rows(ours_and_reference, rows: int, label: str, exact: bool | None = None,
                          max_kl: float = 1e-5) -> None:
    """A fresh LLM's logits of the text with the AMX GEMM from `rows` rows (0: off, the int16
    GEMM), exact or not (None: as JISU_AMX says): the same bars, and KL below max_kl (the int16
    GEMM and JISU_AMX=exact are near 1e-6)."""
    from jisu import LLM
    name, llm, ids, ref, _ = ours_and_reference
    fresh = LLM(llm.path, enable_prefix_caching=False, progress=False)
    with amx_from(rows, exact):
        ours = torch.from_numpy(fresh.logits(ids))
    ref_lp, our_lp = ref.log_softmax(-1), ours.log_softmax(-1)
    kl = (ref_lp.exp() * (ref_lp - our_lp)).sum(-1)
    top1 = (ref.argmax(-1) == ours.argmax(-1)).float().mean().item()
    print(f"{name} with {label}: mean KL {kl.mean().item():.2e}, top-1 agreement {top1:.4f}")
    assert top1 >= 0.99
    assert kl.mean().item() <= max_kl


def _amx_ops():
    from jisu.kernels import cpu
    ops = cpu.load()
    return ops if ops is not None and ops.amx else None


def test_amx_logits_match_transformers(ours_and_reference):
    """The AMX GEMM (the default for prompts where the CPU has AMX, tests/test_amx.py), switched
    on whatever JISU_AMX says, with its default two products (bf16 weights): KL below 1e-4
    (measured 2.8e-5 / 2.7e-5; llama.cpp's logits are at 3.2e-3 / 4.4e-3). Only a CPU without
    AMX skips this."""
    ops = _amx_ops()
    if ops is None:
        pytest.skip("no AMX here")
    _logits_with_amx_rows(ours_and_reference, ops.AMX_MIN_ROWS, "AMX", exact=False, max_kl=1e-4)


def test_exact_amx_logits_match_transformers(ours_and_reference):
    """JISU_AMX=exact (three products, the weights' 16 bits): KL below 1e-5, as the int16 GEMM."""
    ops = _amx_ops()
    if ops is None:
        pytest.skip("no AMX here")
    _logits_with_amx_rows(ours_and_reference, ops.AMX_MIN_ROWS, "exact AMX", exact=True)


def test_int16_gemm_logits_match_transformers(ours_and_reference):
    """The int16 GEMM for prompts, which AMX replaces where the CPU has it (JISU_AMX=0 keeps it):
    still checked on such a CPU. Elsewhere it is the default, checked by test_logits_match_transformers."""
    if _amx_ops() is None:
        pytest.skip("the int16 GEMM is the default here: test_logits_match_transformers checks it")
    _logits_with_amx_rows(ours_and_reference, 0, "the int16 GEMM")


def test_perplexity_vs_transformers_and_llama_cpp(ours_and_reference):
    name, llm, ids, ref, _ = ours_and_reference
    lp = ref.log_softmax(-1)
    ref_ppl = float(torch.exp(-lp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).mean()))
    ppl = llm.perplexity(TEXT)
    cpp = REFERENCE[NAMES[name]]
    assert cpp["perplexity_tokens"] == ids            # same tokens as llama.cpp scored
    print(f"{name}: perplexity jisu {ppl:.4f}, transformers {ref_ppl:.4f}, llama.cpp {cpp['perplexity']:.4f}")
    assert abs(ppl - ref_ppl) / ref_ppl <= 0.02
    assert ppl <= cpp["perplexity"] * 1.02


def test_cli_run_says_paris(smollm2_path, tmp_path):
    env = {"JISU_HOME": str(smollm2_path.parents[2]), "PATH": ""}
    res = subprocess.run([sys.executable, "-m", "jisu.cli", "run", "The capital of France is",
                          "--max-tokens", "8", "--temperature", "0"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout


def test_greedy_generation_matches_transformers(ours_and_reference):
    _, llm, _, _, greedy = ours_and_reference
    p = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    outs = llm.generate(GREEDY_PROMPTS, p)
    assert {prompt: o.token_ids for prompt, o in zip(GREEDY_PROMPTS, outs)} == greedy


def test_chat_uses_template_and_stops_at_end_of_turn(smollm2):
    # (the Gemma 3 270M file is the base model, not instruction-tuned: no chat test for it)
    out = smollm2.chat([{"role": "user", "content": "What is the capital of France? Answer in one word."}],
                       SamplingParams(max_tokens=40, temperature=0))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop" and out.token_ids[-1] in smollm2.tokenizer.eog_ids
    assert "<|im_end|>" not in out.text


def test_batch_of_32_equals_alone(real_llm):
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time",
               "The three primary colors are"]
    p = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    alone = [real_llm.generate(x, p)[0].token_ids for x in prompts]
    batched = real_llm.generate(prompts * 8, p, use_tqdm=False)
    assert [o.token_ids for o in batched] == alone * 8


def test_screened_greedy_equals_full_logits(real_llm):
    """32 greedy streams: their tokens come from the screened output projection (Q8_0 on both
    files); the same run with every logit computed must give the same tokens."""
    prompts = [f"Question {i}: tell me about {w}." for i, w in enumerate(["cats", "the sea", "rust", "paris"] * 8)]
    p = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    screened = [o.token_ids for o in real_llm.generate(prompts, p, use_tqdm=False)]
    real_llm.model.greedy = lambda h, vocab: None
    try:
        full = [o.token_ids for o in real_llm.generate(prompts, p, use_tqdm=False)]
    finally:
        del real_llm.model.greedy              # the class's method again
    assert screened == full


def test_sampling_seed_reproducible(real_llm):
    p = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=7, ignore_eos=True)
    a = real_llm.generate("Write a sentence about the sea.", p)[0].text
    b = real_llm.generate("Write a sentence about the sea.", p)[0].text
    assert a == b and len(a) > 10
