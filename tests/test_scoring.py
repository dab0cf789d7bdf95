"""gptj.execution.inference.scoring and the request engine's prompt scores against transformers' GPT-J."""

from __future__ import annotations

import pytest
import torch

import gptj.execution.inference.scoring as scoring
from gptj.execution.inference.request_engine import Request, RequestEngine
from tests.fixtures.generation import reference_pair
from tests.fixtures.reference import TINY

ROWS = [[5, 17, 300 % TINY.vocab_size, 2, 99, 41, 8], [3, 3, 7], [60, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]


@pytest.fixture(scope="module")
def pair():
    return reference_pair(seed=3)


def reference(hf, row: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([row])).logits[0, :-1].log_softmax(-1)


def test_score_rows_are_transformers_log_probabilities_in_any_chunking(pair, monkeypatch):
    hf, ours = pair
    starts = [1, 2, 5]
    whole = scoring.score_rows(ours, ROWS, starts, top_k=4)
    monkeypatch.setattr(scoring, "SCORE_CHUNK_ELEMENTS", 3 * TINY.vocab_size)  # 3 positions a chunk
    chunked = scoring.score_rows(ours, ROWS, starts, top_k=4)
    for row, start, a, b in zip(ROWS, starts, whole, chunked):
        ref = reference(hf, row)[start - 1:]
        target = torch.tensor(row[start:])
        torch.testing.assert_close(a.logprobs, ref.gather(-1, target[:, None])[:, 0], atol=1e-4, rtol=0)
        best = torch.topk(ref, 4)
        assert torch.equal(a.top_ids, best.indices)
        torch.testing.assert_close(a.top_logprobs, best.values, atol=1e-4, rtol=0)
        torch.testing.assert_close(b.logprobs, a.logprobs, atol=1e-6, rtol=0)
        assert torch.equal(b.top_ids, a.top_ids)
        assert a.greedy() == bool((ref.argmax(-1) == target).all())


def test_continuation_logprobs_and_bad_input(pair):
    hf, ours = pair
    sums = scoring.continuation_logprobs(ours, [[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], max_rows=1)
    for (p, c), got in zip((([5, 6, 7], [9, 10]), ([8], [11, 12, 13])), sums):
        ref = reference(hf, p + c)[len(p) - 1:]
        assert got.item() == pytest.approx(ref.gather(-1, torch.tensor(c)[:, None]).sum().item(), abs=1e-4)
    with pytest.raises(ValueError, match="pair 1: the continuation is empty"):
        scoring.continuation_logprobs(ours, [[1], [2]], [[3], []])
    with pytest.raises(ValueError, match="row 0: scoring starts at token 0"):
        scoring.score_rows(ours, [[1, 2]], [0])


def test_engine_scores_prompts_in_the_prefill_it_shares_with_generation(pair):
    _, ours = pair
    engine = RequestEngine(ours, max_batch_size=4, eos_token_id=None)
    alone = RequestEngine(ours, max_batch_size=4, eos_token_id=None)
    generating = Request("gen", ROWS[2], max_new_tokens=5)
    alone.add(Request("gen", ROWS[2], max_new_tokens=5))
    engine.add(generating)
    engine.add(Request("score", ROWS[0], max_new_tokens=0, prompt_logprobs=2))
    engine.add(Request("score+1", ROWS[1], max_new_tokens=1, prompt_logprobs=0, logprobs=0))
    events = []
    while engine.has_work:
        events += engine.step()
    expected_tokens = []
    while alone.has_work:
        expected_tokens += [e.token for e in alone.step() if e.token is not None]
    by_id = {}
    for event in events:
        by_id.setdefault(event.request_id, []).append(event)
    assert [e.token for e in by_id["gen"] if e.token is not None] == expected_tokens
    (scored,) = by_id["score"]  # one event: scored, nothing generated
    assert scored.finish_reason == "length" and scored.token is None
    want = scoring.score_rows(ours, [ROWS[0], ROWS[1]], [1, 1], top_k=2)
    assert [v for v, _ in scored.prompt_logprobs] == pytest.approx(want[0].logprobs.tolist(), abs=1e-5)
    assert [[t for t, _ in top] for _, top in scored.prompt_logprobs] == want[0].top_ids.tolist()
    first = by_id["score+1"][0]
    assert first.token is not None and [top for _, top in first.prompt_logprobs] == [[], []]
    assert [v for v, _ in first.prompt_logprobs] == pytest.approx(want[1].logprobs.tolist(), abs=1e-5)
    assert by_id["gen"][0].prompt_logprobs is None


def test_engine_checks_scoring_requests(pair):
    _, ours = pair
    engine = RequestEngine(ours, max_batch_size=1, eos_token_id=None, max_length=16)
    with pytest.raises(ValueError, match=r"max_new_tokens must be >= 1 \(0 only to score the prompt\), got 0"):
        engine.add(Request("a", [1, 2], max_new_tokens=0))
    with pytest.raises(ValueError, match="the prompt has 17 tokens and max_new_tokens is 0"):
        engine.add(Request("b", list(range(1, 18)), max_new_tokens=0, prompt_logprobs=1))
    with pytest.raises(ValueError, match="prompt_logprobs must be in"):
        engine.add(Request("c", [1, 2], max_new_tokens=0, prompt_logprobs=50))
    engine.add(Request("full", list(range(1, 17)), max_new_tokens=0, prompt_logprobs=1))  # fills the row
    (event,) = engine.step()
    assert event.finish_reason == "length" and len(event.prompt_logprobs) == 15


def test_a_large_admission_is_prefilled_in_groups_within_the_token_budget(pair, monkeypatch):
    _, ours = pair
    prompts = [[(7 * i + j) % TINY.vocab_size for j in range(10 + 3 * i)] for i in range(5)]  # 10..22 tokens

    def run(budget):
        engine = RequestEngine(ours, max_batch_size=5, eos_token_id=None)
        engine.prefill_token_budget = budget
        widths = []
        prefill = engine.runner.prefill

        def counting(cache, rows, batch, multiple):
            widths.append(len(rows) * max(len(p) for p in batch))
            return prefill(cache, rows, batch, multiple)

        monkeypatch.setattr(engine.runner, "prefill", counting)
        for i, p in enumerate(prompts):
            engine.add(Request(f"r{i}", p, max_new_tokens=3, prompt_logprobs=1))
        events = []
        while engine.has_work:
            events += engine.step()
        return widths, [(e.request_id, e.token, e.prompt_logprobs) for e in events]

    whole_widths, whole = run(10_000)
    grouped_widths, grouped = run(40)
    assert whole_widths == [5 * 22]
    assert len(grouped_widths) > 1 and max(grouped_widths) <= 40
    assert [(r, t) for r, t, _ in grouped] == [(r, t) for r, t, _ in whole]
    for (_, _, a), (_, _, b) in zip(grouped, whole):
        assert (a is None) == (b is None)
        if a is not None:
            assert [v for v, _ in a] == pytest.approx([v for v, _ in b], abs=1e-5)
