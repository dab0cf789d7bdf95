"""Sampling: the allowed support of top-k / top-p, and reproducibility from the seed."""

from __future__ import annotations

import math

import torch

from gptj.execution.inference.generation import generate
from gptj.execution.inference.sampling import SamplingParams, choose_tokens, filter_logits, prompt_generator
from tests.fixtures.generation import PROMPTS, reference_pair

LOGITS = [2.0, 1.0, 0.5, 0.0, -1.0, 1.0]


def allowed_by_hand(logits, top_k=0, top_p=1.0):
    """The support, computed the plain way: rank tokens, keep the k best, then the nucleus."""
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    if top_k:
        kth = logits[order[top_k - 1]]
        order = [i for i in order if logits[i] >= kth]
    total = sum(math.exp(logits[i]) for i in order)
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += math.exp(logits[i]) / total
        if mass >= top_p:
            break
    return set(kept)


def support(params):
    filtered = filter_logits(torch.tensor([LOGITS]), params)[0]
    return {i for i, v in enumerate(filtered.tolist()) if v != float("-inf")}


def test_top_k_and_top_p_keep_exactly_the_hand_computed_sets():
    cases = [(1, 1.0), (2, 1.0), (3, 1.0), (0, 0.5), (0, 0.8), (0, 0.95), (3, 0.6), (0, 1.0)]
    for top_k, top_p in cases:
        params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p)
        assert support(params) == allowed_by_hand(LOGITS, top_k, top_p), (top_k, top_p)
    # top-k ties at the k-th value are kept (tokens 1 and 5 share logit 1.0)
    assert support(SamplingParams(1.0, top_k=2)) == {0, 1, 5}


def test_samples_stay_in_the_support_and_cover_it():
    params = SamplingParams(temperature=1.0, top_k=0, top_p=0.8)
    allowed = allowed_by_hand(LOGITS, 0, 0.8)
    logits = torch.tensor([LOGITS] * 400)
    gens = [prompt_generator(7, i) for i in range(400)]
    drawn = choose_tokens(logits, params, gens).tolist()
    assert set(drawn) == allowed
    # Frequencies follow the renormalised softmax over the support (loose bound, 400 draws).
    weights = {i: math.exp(LOGITS[i]) for i in allowed}
    for token, w in weights.items():
        expected = w / sum(weights.values())
        assert abs(drawn.count(token) / 400 - expected) < 0.08


def test_same_seed_same_samples_and_greedy_ignores_the_seed():
    _, ours = reference_pair(seed=1)
    a = generate(ours, PROMPTS, 12, None, temperature=1.0, top_p=0.9, seed=5)
    b = generate(ours, PROMPTS, 12, None, temperature=1.0, top_p=0.9, seed=5)
    c = generate(ours, PROMPTS, 12, None, temperature=1.0, top_p=0.9, seed=6)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    greedy = [generate(ours, PROMPTS, 6, None, seed=s) for s in (0, 1)]
    assert [r.token_ids for r in greedy[0]] == [r.token_ids for r in greedy[1]]
    top1 = generate(ours, PROMPTS, 6, None, temperature=1.5, top_k=1, seed=9)
    assert [r.token_ids for r in top1] == [r.token_ids for r in greedy[0]]
