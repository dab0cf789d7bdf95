"""Every candidate of a prompt scored from one prefill (gptj.execution.inference.scoring
.score_candidates) against scoring each candidate alone after its prompt, and the choice
probabilities among candidates against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

import gptj.execution.inference.scoring as scoring
from gptj.execution.runtime.distributed import init_distributed
from gptj.model import GPTJ
from tests.fixtures.distributed import run_distributed
from tests.fixtures.generation import reference_pair
from tests.fixtures.reference import TINY, state_reader

# Prompts of different lengths, each with its own candidates: several, one, multi-token,
# different lengths. The last prompt's row (prompt + all candidates) is longer than the
# model's 64 positions while each prompt + candidate fits: positions restart per candidate.
PROMPTS = [[5, 17, 30, 2, 99, 41, 8], [3], [60, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], list(range(11, 51))]
CANDIDATES = [
    [[9], [10, 11, 12], [9, 13], [14, 15]],
    [[7, 7, 7, 7]],
    [[20], [21], [22]],
    [[70 + i, 80 + i] + [90] * (i % 5) for i in range(12)],
]


@pytest.fixture(scope="module")
def model():
    return reference_pair(seed=5)[1]


def alone(model, prompts, candidates, top_k=0):
    """score_rows of prompt + candidate, one candidate per forward."""
    return [[scoring.score_rows(model, [p + c], [len(p)], top_k=top_k)[0] for c in cands]
            for p, cands in zip(prompts, candidates)]


def test_a_prompt_is_prefilled_once_for_all_its_candidates(model, monkeypatch):
    calls = []
    hidden_states = model.hidden_states

    def counting(ids, **kwargs):
        calls.append(tuple(ids.shape))
        return hidden_states(ids, **kwargs)

    monkeypatch.setattr(model, "hidden_states", counting)
    together = scoring.score_candidates(model, PROMPTS, CANDIDATES, top_k=3)
    width = max(len(p) + sum(map(len, c)) for p, c in zip(PROMPTS, CANDIDATES))
    assert calls == [(len(PROMPTS), width)]  # one forward, one row per prompt
    monkeypatch.undo()
    reference = alone(model, PROMPTS, CANDIDATES, top_k=3)
    for got_row, want_row in zip(together, reference):
        assert len(got_row) == len(want_row)
        for got, want in zip(got_row, want_row):
            torch.testing.assert_close(got.logprobs, want.logprobs, atol=1e-5, rtol=0)
            torch.testing.assert_close(got.top_logprobs, want.top_logprobs, atol=1e-5, rtol=0)
            assert torch.equal(got.top_ids, want.top_ids)


def test_rows_per_forward_and_the_summed_and_paired_forms_agree(model):
    sums = [[s.logprobs.sum().item() for s in row] for row in alone(model, PROMPTS, CANDIDATES)]
    one_row_each = scoring.score_candidates(model, PROMPTS, CANDIDATES, max_rows=1)
    assert [[s.logprobs.sum().item() for s in row] for row in one_row_each] == [
        pytest.approx(row, abs=1e-4) for row in sums]
    shared = scoring.candidate_logprobs(model, PROMPTS[:3], [[9], [10, 11, 12], [4, 4]], max_rows=2)
    want = [[s.logprobs.sum().item() for s in row] for row in alone(model, PROMPTS[:3], [[[9], [10, 11, 12], [4, 4]]] * 3)]
    torch.testing.assert_close(shared, torch.tensor(want), atol=1e-4, rtol=0)
    # Pairs: the same prompt twice becomes one row with two candidates.
    pairs = scoring.continuation_logprobs(model, [PROMPTS[0], PROMPTS[1], PROMPTS[0]], [[9], [7, 7], [14, 15]])
    torch.testing.assert_close(pairs, torch.tensor([sums[0][0], scoring.score_rows(
        model, [PROMPTS[1] + [7, 7]], [1])[0].logprobs.sum().item(), sums[0][3]]), atol=1e-4, rtol=0)


def test_bf16_candidates_together_equal_alone_within_bf16_accuracy():
    hf, _ = reference_pair(seed=5)
    ours = GPTJ(TINY, dtype=torch.bfloat16)
    ours.load_shards(state_reader(hf.state_dict()))
    together = scoring.score_candidates(ours, PROMPTS, CANDIDATES)
    for got_row, want_row in zip(together, alone(ours, PROMPTS, CANDIDATES)):
        for got, want in zip(got_row, want_row):
            # bf16 activations (8 bits of mantissa): a log-prob of a few nats moves by ~0.05.
            torch.testing.assert_close(got.logprobs, want.logprobs, atol=0.1, rtol=0.02)


def test_bad_candidates_are_refused_naming_the_problem(model):
    with pytest.raises(ValueError, match="prompt 1 has no candidates"):
        scoring.score_candidates(model, [[1], [2]], [[[3]], []])
    with pytest.raises(ValueError, match="prompt 0: candidate 1 is empty"):
        scoring.score_candidates(model, [[1]], [[[3], []]])
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        scoring.score_candidates(model, [[]], [[[3]]])
    with pytest.raises(ValueError, match="prompt 0 with candidate 0 takes 65 tokens but the model context is 64"):
        scoring.score_candidates(model, [list(range(60))], [[[1] * 5]])
    with pytest.raises(ValueError, match="2 prompts but 1 candidate lists"):
        scoring.score_candidates(model, [[1], [2]], [[[3]]])


def _tp_worker(rank, world_size):
    ctx, _ = init_distributed(tensor_parallel=world_size)
    _, model = reference_pair(seed=5, ctx=ctx)
    return [[s.logprobs for s in row] for row in scoring.score_candidates(model, PROMPTS, CANDIDATES, max_rows=3)]


def test_tensor_parallel_candidates_equal_a_single_process_alone(model):
    reference = alone(model, PROMPTS, CANDIDATES)
    for rank in run_distributed(_tp_worker, 2):
        for got_row, want_row in zip(rank, reference):
            for got, want in zip(got_row, want_row):
                torch.testing.assert_close(got, want.logprobs, atol=1e-4, rtol=0)


def scores_of(*logprobs):
    return [scoring.TokenScores(torch.tensor(values)) for values in logprobs]


def test_choice_probabilities_walk_the_candidates_token_by_token():
    # A model that spreads its probability: " negat" "ive" <eos> against " positive" <eos>.
    negative, positive = [864, 672, 0], [696, 0]
    scores = scores_of([-4.23, -4.47, -4.68], [-6.86, -4.68])
    summed = [sum(s.logprobs.tolist()) for s in scores]
    assert summed[1] > summed[0]  # the shorter label wins by its summed log-likelihood
    got = scoring.choice_logprobs([negative, positive], scores)
    # The first tokens differ: renormalised over {" negat", " positive"}; after that each
    # candidate has one allowed token, which it takes with probability 1.
    first = math.log(math.exp(-4.23) + math.exp(-6.86))
    assert got.tolist() == pytest.approx([-4.23 - first, -6.86 - first], abs=1e-6)
    # A shared prefix: [1, 2, 0], [1, 3, 0], [4, 0]. Step 0 over {1, 4}; after [1], over {2, 3}.
    cands = [[1, 2, 0], [1, 3, 0], [4, 0]]
    scores = scores_of([-1.0, -2.0, -0.5], [-1.0, -0.7, -0.1], [-3.0, -0.2])
    got = scoring.choice_logprobs(cands, scores)
    step0 = math.log(math.exp(-1.0) + math.exp(-3.0))
    step1 = math.log(math.exp(-2.0) + math.exp(-0.7))
    assert got.tolist() == pytest.approx([-1.0 - step0 - 2.0 - step1, -1.0 - step0 - 0.7 - step1, -3.0 - step0],
                                         abs=1e-6)
    assert got.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="the same tokens twice"):
        scoring.choice_logprobs([[1, 0], [1, 0]], scores_of([-1.0, -1.0], [-1.0, -1.0]))


def test_choose_picks_by_choice_probability_from_one_scoring(model):
    cands = [[9, 0], [10, 11, 12], [9, 13], [14, 15]]  # none a prefix of another: they sum to 1
    (choice,) = scoring.choose(model, [PROMPTS[0]], [cands])
    scores = alone(model, [PROMPTS[0]], [cands])[0]
    torch.testing.assert_close(choice.log_likelihoods, torch.stack([s.logprobs.sum() for s in scores]),
                               atol=1e-4, rtol=0)
    want = scoring.choice_logprobs(cands, scores)
    torch.testing.assert_close(choice.logprobs, want, atol=1e-4, rtol=0)
    assert choice.best == int(want.argmax())
    assert choice.logprobs.exp().sum().item() == pytest.approx(1.0, abs=1e-5)
