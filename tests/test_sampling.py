"""Sampler semantics on hand-made logits."""

import math

import pytest
import torch

from jisu import SamplingParams
from jisu.engine.sampler import apply_penalties, filter_logits, sample
from jisu.engine.sequence import Sequence

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()


def kept(logits):
    return torch.isfinite(logits).nonzero().flatten().tolist()


def test_top_k():
    assert kept(filter_logits(LOGITS.clone(), 2, 1.0, 0.0)) == [0, 1]
    assert kept(filter_logits(LOGITS.clone(), -1, 1.0, 0.0)) == [0, 1, 2, 3]


@pytest.mark.parametrize("top_p,want", [(0.5, [0]), (0.79, [0, 1]), (0.8, [0, 1]), (0.81, [0, 1, 2]), (1.0, [0, 1, 2, 3])])
def test_top_p_keeps_smallest_set_reaching_p(top_p, want):
    assert kept(filter_logits(LOGITS.clone(), -1, top_p, 0.0)) == want


def test_min_p():
    # keep tokens with p >= min_p * p_max = 0.4 * 0.5 = 0.2
    assert kept(filter_logits(LOGITS.clone(), -1, 1.0, 0.4)) == [0, 1]


def seq_with(tokens, prompt_len, **kw):
    s = Sequence(tokens[:prompt_len], SamplingParams(**kw))
    s.token_ids = list(tokens)
    return s


def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = torch.tensor([2.0, -2.0, 2.0, -2.0])
    out = apply_penalties(logits.clone(), seq_with([0, 1], 1, repetition_penalty=2.0))
    assert out.tolist() == [1.0, -4.0, 2.0, -2.0]


def test_presence_and_frequency_penalties_count_output_only():
    logits = torch.zeros(4)
    s = seq_with([3, 1, 1, 2], 1, presence_penalty=0.5, frequency_penalty=0.25)  # outputs: 1, 1, 2
    out = apply_penalties(logits.clone(), s)
    assert out.tolist() == [0.0, -(0.5 + 0.5), -(0.5 + 0.25), 0.0]


def test_samples_follow_distribution_and_seed():
    seqs = [seq_with([0], 1, temperature=1.0, seed=11)]
    counts = torch.zeros(4)
    for _ in range(3000):
        counts[sample(LOGITS[None].clone(), seqs)[0][0]] += 1
    assert torch.allclose(counts / counts.sum(), PROBS, atol=0.03)

    def draw(seed):
        s = [seq_with([0], 1, temperature=1.0, seed=seed)]
        return [sample(LOGITS[None].clone(), s)[0][0] for _ in range(50)]
    assert draw(5) == draw(5) and draw(5) != draw(6)


def test_temperature_sharpens():
    s = [seq_with([0], 1, temperature=0.05, seed=0)]
    assert all(sample(LOGITS[None].clone(), s)[0][0] == 0 for _ in range(200))


def test_greedy_logprobs():
    s = [seq_with([0], 1, temperature=0.0, logprobs=2)]
    token, info = sample(LOGITS[None].clone(), s)[0]
    assert token == 0 and info["logprob"] == pytest.approx(math.log(0.5), abs=1e-6)
    assert [t for t, _ in info["top"]] == [0, 1]


def test_batch_mixing_greedy_penalties_sampling_and_logprobs():
    # plain greedy rows are decided in one batched call; the others row by row: each row must get
    # what it gets alone
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 5000, generator=g)
    logits[2, 10] = logits[2, 4000] = 50.0                      # a tie: the first index
    logits[4, 7] = float("nan")                                 # NaN: torch's answer
    seqs = [seq_with([1, 2, 3], 1, temperature=0.0), seq_with([0], 1, temperature=1.0, seed=7),
            seq_with([1, 2], 1, temperature=0.0), seq_with([int(logits[3].argmax())], 1, temperature=0.0,
                                                           repetition_penalty=1e4),
            seq_with([0], 1, temperature=0.0), seq_with([5], 1, temperature=0.0, logprobs=1)]
    together = sample(logits.clone(), seqs)
    alone = [sample(logits[b:b + 1].clone(), [seq_with(s.token_ids, 1, **{
        k: getattr(s.params, k) for k in ("temperature", "seed", "repetition_penalty", "logprobs")})])[0]
        for b, s in enumerate(seqs)]
    assert [t for t, _ in together] == [t for t, _ in alone]
    assert together[2][0] == 10 and together[4][0] == int(logits[4].argmax())
    assert together[3][0] != int(logits[3].argmax())             # the penalty was applied
    assert together[5][1] is not None and together[5][1]["token"] == together[5][0]
    assert all(info is None for _, info in together[:5])


@pytest.mark.parametrize("kw", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5),
                                dict(top_k=-2), dict(min_p=2), dict(repetition_penalty=0), dict(n=0),
                                dict(stop=[""]), dict(logprobs=50), dict(presence_penalty=3)])
def test_invalid_params_rejected(kw):
    with pytest.raises(ValueError, match="SamplingParams"):
        SamplingParams(**kw)


def test_stop_accepts_a_string():
    assert SamplingParams(stop="###").stop == ["###"]
