"""Candidate scoring from a prefix cache (gptj.execution.inference.scoring, `prefix=`): the
numbers of scoring without it, the hits a hand count gives (within one call too), adapters
kept apart, a pool with no room, tensor parallelism, the classification pipeline's own cache
and the server's /v1/classify sharing the request engine's."""

from __future__ import annotations

import httpx
import pytest
import torch

import gptj.execution.inference.scoring as scoring
from gptj.execution.inference.prefix_cache import PrefixCache
from gptj.execution.runtime.distributed import init_distributed
from tests.fixtures.distributed import run_distributed
from tests.fixtures.generation import reference_pair
from tests.fixtures.server import metric, tiny_server

BLOCK = 8
DEMO = list(range(10, 37))  # 27 tokens every prompt below starts with: 3 full blocks and 3 more
PROMPTS = [DEMO + [5, 6, 7], DEMO + [9], DEMO[:24], DEMO[:25], DEMO + list(range(40, 53)), [3, 4], DEMO[:8]]
CANDIDATES = [[[9], [10, 11, 12]], [[7, 7]], [[1], [2, 3]], [[20, 21]], [[22], [23, 24, 25], [26]], [[8]], [[5, 6]]]
# Hits counted by hand. A prompt's last token always runs (it predicts the candidates' first
# tokens), so a prompt of whole blocks reuses all but that one token.
# Cold, one call: the first prompt runs alone (the others wait for its 3 blocks), then
# DEMO+[9]: 24, DEMO[:24]: 23, DEMO[:25]: 24, DEMO+13 tokens: 24, DEMO[:8]: 7; [3, 4] has no block.
COLD_HITS = 24 + 23 + 24 + 24 + 7
# Warm: every full block of every prompt is held; DEMO + 13 tokens is 5 whole blocks.
WARM_HITS = 24 + 24 + 23 + 24 + 39 + 0 + 7


@pytest.fixture(scope="module")
def model():
    return reference_pair(seed=5)[1]


def assert_same(got, want, atol=1e-5):
    for got_row, want_row in zip(got, want, strict=True):
        for g, w in zip(got_row, want_row, strict=True):
            torch.testing.assert_close(g.logprobs, w.logprobs, atol=atol, rtol=0)
            if w.top_ids is not None:
                assert torch.equal(g.top_ids, w.top_ids)


def test_cold_and_warm_scores_are_those_without_the_cache_and_the_hits_are_counted(model):
    want = scoring.score_candidates(model, PROMPTS, CANDIDATES, top_k=2)
    pool = PrefixCache(BLOCK)
    cold = scoring.score_candidates(model, PROMPTS, CANDIDATES, top_k=2, prefix=scoring.PrefixReuse(pool))
    assert_same(cold, want)
    assert pool.hit_tokens == COLD_HITS and pool.prompt_tokens == sum(map(len, PROMPTS))
    assert len(pool) == 3 + 2  # DEMO's 3 blocks, and the 2 after them of the longest prompt
    warm = scoring.score_candidates(model, PROMPTS, CANDIDATES, top_k=2, max_rows=3,
                                    prefix=scoring.PrefixReuse(pool))
    assert_same(warm, want)
    assert pool.hit_tokens - COLD_HITS == WARM_HITS


def test_rows_go_in_groups_whose_kv_fits_the_limit_with_the_same_scores_and_hits(model, monkeypatch):
    made = []
    for_model = scoring.StaticKVCache.for_model

    def counting(m, batch_size, max_length, **kwargs):
        made.append((batch_size, max_length))
        return for_model(m, batch_size, max_length, **kwargs)

    monkeypatch.setattr(scoring.StaticKVCache, "for_model", counting)
    per_token = scoring.kv_bytes_per_token(model)
    longest = max(len(p) + sum(map(len, c)) for p, c in zip(PROMPTS, CANDIDATES))
    limit = 2 * longest * per_token  # two of the longest rows, three shorter ones
    monkeypatch.setattr(scoring, "PREFIX_SCORING_KV_BYTES", limit)
    want = scoring.score_candidates(model, PROMPTS, CANDIDATES)
    pool = PrefixCache(BLOCK)
    assert_same(scoring.score_candidates(model, PROMPTS, CANDIDATES, prefix=scoring.PrefixReuse(pool)), want)
    assert pool.hit_tokens == COLD_HITS
    assert len(made) > 2 and sum(rows for rows, _ in made) == len(PROMPTS)
    assert all(rows * length * per_token <= limit for rows, length in made)


def test_prompts_shorter_than_a_block_run_without_a_cache_row(model, monkeypatch):
    def no_cache(*args, **kwargs):
        raise AssertionError("no prompt holds a full block: nothing to take or keep")

    monkeypatch.setattr(scoring.StaticKVCache, "for_model", no_cache)
    pool = PrefixCache(BLOCK)
    got = scoring.score_candidates(model, [[3, 4], [5]], [[[8]], [[1, 2]]], prefix=scoring.PrefixReuse(pool))
    assert_same(got, scoring.score_candidates(model, [[3, 4], [5]], [[[8]], [[1, 2]]]))
    assert len(pool) == 0 and pool.hit_tokens == 0


def test_another_adapters_blocks_are_never_taken_and_a_pool_without_room_changes_nothing(model):
    pool = PrefixCache(BLOCK)
    prompt, cands = [DEMO + [5]], [[[9], [10, 11]]]
    want = scoring.score_candidates(model, prompt, cands)
    scoring.score_candidates(model, prompt, cands, prefix=scoring.PrefixReuse(pool, "alpha"))
    assert_same(scoring.score_candidates(model, prompt, cands, prefix=scoring.PrefixReuse(pool, "beta")), want)
    assert pool.hit_tokens == 0 and len(pool) == 2 * 3
    assert_same(scoring.score_candidates(model, prompt, cands, prefix=scoring.PrefixReuse(pool, "alpha")), want)
    assert pool.hit_tokens == 24
    empty = PrefixCache(BLOCK)
    for _ in range(2):
        got = scoring.score_candidates(model, prompt, cands, prefix=scoring.PrefixReuse(empty, limit=lambda: 0))
        assert_same(got, want)
    assert len(empty) == 0 and empty.hit_tokens == 0


def _tp_worker(rank, world_size):
    ctx, _ = init_distributed(tensor_parallel=world_size)
    _, model = reference_pair(seed=5, ctx=ctx)
    pool = PrefixCache(BLOCK)
    runs = [scoring.score_candidates(model, PROMPTS, CANDIDATES, max_rows=4, prefix=scoring.PrefixReuse(pool))
            for _ in range(2)]
    return {"logprobs": [[[s.logprobs for s in row] for row in run] for run in runs], "hits": pool.hit_tokens,
            "heads": next(iter(pool._blocks.values())).shape[1]}


def test_tensor_parallel_scores_from_the_cache_equal_a_single_process(model):
    want = scoring.score_candidates(model, PROMPTS, CANDIDATES)
    for rank in run_distributed(_tp_worker, 2):
        for run in rank["logprobs"]:
            for got_row, want_row in zip(run, want):
                for got, w in zip(got_row, want_row):
                    torch.testing.assert_close(got, w.logprobs, atol=1e-4, rtol=0)
        # max_rows=4: the last 3 prompts run after the first 4 stored DEMO's blocks: the same hits.
        assert rank["hits"] == COLD_HITS + WARM_HITS
        assert rank["heads"] == model.blocks[0].attn.local_heads // 2


# ---- the pipeline and the server: a few-shot task, its demonstrations in the prompt ------------
FEW_SHOT = {"prompt": "review: a dull film sentiment: negative\nreview: a great one sentiment: positive\n"
                      "review: {text} sentiment:",
            "target": " {label}", "labels": ["negative", "positive"]}
ROWS = [{"text": "fine"}, {"text": "long and loud"}, {"text": "moving"}]


def few_shot_task():
    from gptj.data.tasks import _make_task

    return _make_task("request", {**FEW_SHOT, "fields": {"text": "text", "label": "label"}}, "test")


def test_the_pipeline_reuses_its_demonstrations_and_answers_as_without():
    from gptj.execution.inference.classification import ClassificationPipeline
    from gptj.execution.inference.pipelines import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("random:tiny", "bundled:tiny")
    cached = ClassificationPipeline(model, tok, task=few_shot_task())
    plain = ClassificationPipeline(model, tok, task=few_shot_task(), prefix_cache=False)
    assert plain.prefix_cache is None
    want = plain(ROWS)
    for _ in range(2):
        got = cached(ROWS)
        assert [g["label"] for g in got] == [w["label"] for w in want]
        for g, w in zip(got, want):
            assert g["probabilities"] == pytest.approx(w["probabilities"], abs=1e-5)
            assert g["log_likelihoods"] == pytest.approx(w["log_likelihoods"], abs=1e-4)
    shared = len(tok.encode([FEW_SHOT["prompt"].split("review: {text}")[0]])[0]) // 16 * 16
    assert shared >= 16 and cached.prefix_cache.hit_tokens >= (2 * len(ROWS) - 1) * shared


def test_the_servers_classify_shares_the_engines_prefix_cache():
    with tiny_server() as server:
        engine = server.state.loop.engine

        def classify():
            resp = httpx.post(f"{server.url}/v1/classify", json={"task": FEW_SHOT, "inputs": ROWS}, timeout=60)
            assert resp.status_code == 200, resp.text
            return resp.json()["results"]

        first = classify()
        hits = engine.prefix_cache.hit_tokens
        second = classify()
        assert engine.prefix_cache.hit_tokens >= hits + len(ROWS) * 16
        assert [r["label"] for r in second] == [r["label"] for r in first]
        for a, b in zip(second, first):
            assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)
        httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=60)  # a step: metrics
        assert metric(server.url, "gptj_prefix_cache_hit_tokens_total") == engine.prefix_cache.hit_tokens
