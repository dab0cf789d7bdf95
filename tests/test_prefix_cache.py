"""Prefix caching in the request engine: the same tokens and log-probabilities as without it
(the engine with `prefix_cache=False` is the reference), hits across requests and within one
batch, prompts ending mid-block, LRU eviction under a tiny KV budget, no KV shared between
adapters, tensor parallel ranks holding the same blocks, and the server's flag and metrics."""

from __future__ import annotations

import httpx
import pytest

from gptj.execution.inference.kv_budget import CacheBudget
from gptj.execution.inference.prefix_cache import PrefixCache
from gptj.execution.inference.request_engine import Request, RequestEngine
from gptj.execution.inference.sampling import SamplingParams
from gptj.execution.runtime.distributed import init_distributed
from gptj.model.kv_cache import kv_bytes_per_token
from tests.fixtures.distributed import run_distributed
from tests.fixtures.generation import reference_pair
from tests.fixtures.lora import seeded_adapter_dirs
from tests.fixtures.reference import TINY
from tests.fixtures.server import metric, tiny_server

BLOCK = 4
BASE = list(range(10, 30))  # 20 tokens: 5 full blocks
LOGPROB_TOLERANCE = 1e-5  # fp32: a prefill over cached keys rounds like a full one, not bit for bit


@pytest.fixture(scope="module")
def model():
    return reference_pair(seed=0)[1]


def _run(engine: RequestEngine, arrivals: dict[int, list[Request]]) -> dict[str, dict]:
    """Step until idle (`arrivals`: step -> requests added before it); per request its tokens,
    log-probabilities, top-N, prompt scores and finish reason."""
    arrivals = dict(arrivals)
    out, steps = {}, 0
    while engine.has_work or arrivals:
        for request in arrivals.pop(steps, []):
            engine.add(request)
        for event in engine.step():
            assert event.error is None, event.error
            record = out.setdefault(event.request_id, {"tokens": [], "logprobs": [], "top": [], "prompt": None})
            if event.prompt_logprobs is not None:
                record["prompt"] = event.prompt_logprobs
            if event.token is not None:
                record["tokens"].append(event.token)
                record["logprobs"].append(event.logprob)
                record["top"].append(event.top_logprobs)
            if event.finish_reason is not None:
                record["finish"] = event.finish_reason
        steps += 1
        assert steps < 500
    return out


def _assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for rid in want:
        g, w = got[rid], want[rid]
        assert g["tokens"] == w["tokens"], rid
        assert g["finish"] == w["finish"], rid
        if w["logprobs"] and w["logprobs"][0] is not None:
            assert g["logprobs"] == pytest.approx(w["logprobs"], abs=LOGPROB_TOLERANCE), rid
            assert [[t for t, _ in top] for top in g["top"]] == [[t for t, _ in top] for top in w["top"]], rid
            for gt, wt in zip(g["top"], w["top"]):
                assert [p for _, p in gt] == pytest.approx([p for _, p in wt], abs=LOGPROB_TOLERANCE), rid
        if w["prompt"] is not None:
            assert [v for v, _ in g["prompt"]] == pytest.approx([v for v, _ in w["prompt"]], abs=LOGPROB_TOLERANCE)


def _requests() -> dict[int, list[Request]]:
    return {
        0: [Request("a", BASE + [50, 51, 52], 10, logprobs=3),
            Request("b", BASE + [60, 61], 10, logprobs=3),  # shares 5 blocks with "a", same batch
            Request("g", list(range(80, 89)), 10, logprobs=1)],
        2: [Request("mid", BASE[:13], 10, logprobs=2),  # 3 full blocks and one token
            Request("aligned", BASE[:12], 8, logprobs=2)],  # exactly 3 blocks: the last token runs again
        4: [Request("sampled", BASE + [50, 51, 52], 10, SamplingParams(0.9, 20, 1.0), seed=3, logprobs=1),
            Request("scored", BASE + [70], 4, prompt_logprobs=2)],  # needs every position: no lookup
    }


def _engine(model, prefix_cache: bool, **kwargs) -> RequestEngine:
    return RequestEngine(model, max_batch_size=3, eos_token_id=None, prefix_cache=prefix_cache,
                         prefix_block_size=BLOCK, **kwargs)


def test_block_keys_name_the_whole_prefix_and_the_adapter():
    pool = PrefixCache(4)
    keys = pool.block_keys(list(range(10)), None)
    assert len(keys) == 2  # full blocks only
    assert pool.block_keys(list(range(8)) + [99], None) == keys
    changed = pool.block_keys([0, 1, 2, 3, 4, 5, 6, 99], None)
    assert changed[0] == keys[0] and changed[1] != keys[1]
    assert pool.block_keys([99, 1, 2, 3, 4, 5, 6, 7], None)[1] != keys[1]  # block 1 is keyed by block 0 too
    named = [pool.block_keys(list(range(8)), name) for name in ("alpha", "beta", "")]
    assert all(not set(k) & set(keys) for k in named) and len({tuple(k) for k in named}) == 3


def test_tokens_and_logprobs_are_those_without_the_cache(model):
    want = _run(_engine(model, False), _requests())
    engine = _engine(model, True)
    got = _run(engine, _requests())
    _assert_same(got, want)
    pool = engine.prefix_cache
    # b: 20 (5 blocks, within the batch); mid: 12; aligned: min(12, 12 - 1); sampled: 20.
    assert pool.hit_tokens == 20 + 12 + 11 + 20
    assert pool.prompt_tokens == sum(len(r.prompt) for rs in _requests().values() for r in rs)
    assert pool.hit_rate == pytest.approx(pool.hit_tokens / pool.prompt_tokens)


def test_offline_runs_over_one_runner_share_its_blocks(model):
    """The blocks live on the ModelRunner: a second `generate` over it starts from the first's."""
    from gptj.execution.inference.generation import generate
    from gptj.execution.inference.model_runner import ModelRunner

    runner = ModelRunner(model, prefix_cache=PrefixCache(BLOCK))
    first = generate(model, [BASE + [1]], 6, None, runner=runner)[0].token_ids
    second = generate(model, [BASE + [2], BASE + [1]], 6, None, runner=runner)
    assert runner.prefix_cache.hit_tokens == 20 + 20
    plain = generate(model, [BASE + [1], BASE + [2]], 6, None)
    assert [first, second[0].token_ids, second[1].token_ids] == [plain[0].token_ids, plain[1].token_ids,
                                                                 plain[0].token_ids]


def test_a_hit_within_one_batch_runs_only_the_rest_of_the_later_prompt(model):
    engine = _engine(model, True)
    fed = []
    prefill = engine.runner.prefill

    def recording(cache, rows, prompts, pad_multiple=1, starts=None):
        fed.append([len(p) - (s or 0) for p, s in zip(prompts, starts or [0] * len(prompts))])
        return prefill(cache, rows, prompts, pad_multiple, starts)

    engine.runner.prefill = recording
    requests = {0: [Request("a", BASE + [50, 51, 52], 6, logprobs=2), Request("b", BASE + [60, 61], 6, logprobs=2)]}
    got = _run(engine, requests)
    assert fed == [[23], [2]]  # "b" waits for "a" to store its 5 blocks, then runs its last 2 tokens
    _assert_same(got, _run(_engine(model, False), requests))


def test_a_prompt_ending_mid_block_reuses_the_full_blocks_before_it(model):
    engine = _engine(model, True)
    requests = {0: [Request("long", BASE, 4)], 2: [Request("mid", BASE[:10], 8, logprobs=2)]}
    got = _run(engine, requests)
    assert engine.prefix_cache.hit_tokens == 8  # blocks 0 and 1; tokens 8 and 9 run
    assert len(engine.prefix_cache) == 5  # "mid" adds no partial block
    _assert_same(got, _run(_engine(model, False), requests))


def _one_row_budget(model, room_blocks: int) -> CacheBudget:
    """One row of 32 slots and room for `room_blocks` prefix blocks beside it."""
    per_token = kv_bytes_per_token(model)
    return CacheBudget(per_token, (32 + room_blocks * BLOCK) * per_token, max_rows=1, max_length=32, slot_step=8)


def test_eviction_keeps_the_budget_and_takes_the_tails_of_the_least_recently_used_first(model):
    prompts = {"A": list(range(30, 38)), "B": list(range(40, 48))}  # 2 blocks each, 32 slots with 24 new
    arrivals = {0: [Request("A", prompts["A"], 24, logprobs=1)], 1: [Request("B", prompts["B"], 24, logprobs=1)],
                2: [Request("A again", prompts["A"], 24, logprobs=1)]}
    budget = _one_row_budget(model, room_blocks=3)
    engine = RequestEngine(model, 1, None, cache_budget=budget, prefix_block_size=BLOCK)  # on: a budget
    assert engine.prefix_cache is not None
    pool = engine.prefix_cache
    block_bytes = BLOCK * budget.bytes_per_token
    seen, steps = {}, 0
    want = _run(RequestEngine(model, 1, None, cache_budget=budget, prefix_cache=False), arrivals)
    pending = dict(arrivals)
    while engine.has_work or pending:
        for request in pending.pop(steps, []):
            engine.add(request)
        for event in engine.step():
            record = seen.setdefault(event.request_id, {"tokens": [], "logprobs": [], "top": [], "prompt": None})
            if event.token is not None:
                record["tokens"].append(event.token)
                record["logprobs"].append(event.logprob)
                record["top"].append(event.top_logprobs)
            if event.finish_reason:
                record["finish"] = event.finish_reason
                if event.request_id == "B":
                    hits_before_again = pool.hit_tokens
        assert pool.nbytes + engine.cache.nbytes() <= budget.budget_bytes
        assert pool.nbytes <= 3 * block_bytes
        steps += 1
    _assert_same(seen, want)
    # After A: A1, A0 (the head touched last). B's second block evicts A's tail, not its head,
    # so A again finds one block.
    assert hits_before_again == 0
    assert pool.hit_tokens == BLOCK
    assert len(pool) == 3 and pool.nbytes == 3 * block_bytes


def test_a_budget_with_no_room_beside_the_rows_holds_no_blocks_and_changes_nothing(model):
    budget = _one_row_budget(model, room_blocks=0)
    arrivals = {0: [Request("A", BASE[:8], 24)], 1: [Request("A again", BASE[:8], 24)]}
    engine = RequestEngine(model, 1, None, cache_budget=budget, prefix_block_size=BLOCK)
    got = _run(engine, arrivals)
    assert len(engine.prefix_cache) == 0 and engine.prefix_cache.hit_tokens == 0
    assert got["A again"]["tokens"] == got["A"]["tokens"]


# ---- adapters ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    from gptj.model.lora import LoraSettings

    settings = {"alpha": LoraSettings(rank=2, alpha=3.0), "beta": LoraSettings(rank=4, alpha=4.0)}
    return seeded_adapter_dirs(TINY, settings, 200, tmp_path_factory)


def _adapter_engine(adapter_dirs, prefix_cache: bool) -> RequestEngine:
    from gptj.model import GPTJ
    from gptj.model.multi_lora import load_adapters

    model = GPTJ(TINY).init_weights(seed=3).eval()
    return RequestEngine(model, 2, None, adapters=load_adapters(adapter_dirs, model), prefix_cache=prefix_cache,
                         prefix_block_size=BLOCK)


def test_two_adapters_never_share_kv(adapter_dirs):
    prompt = BASE[:12]
    arrivals = {0: [Request("alpha", prompt, 6, logprobs=1, adapter="alpha")],
                2: [Request("beta", prompt, 6, logprobs=1, adapter="beta")],
                4: [Request("base", prompt, 6, logprobs=1)],
                6: [Request("alpha again", prompt, 6, logprobs=1, adapter="alpha")]}
    engine = _adapter_engine(adapter_dirs, True)
    got = _run(engine, arrivals)
    want = _run(_adapter_engine(adapter_dirs, False), arrivals)
    _assert_same(got, want)
    assert len({tuple(want[r]["tokens"]) for r in ("alpha", "beta", "base")}) == 3  # the adapters matter
    assert engine.prefix_cache.hit_tokens == 11  # only "alpha again"
    assert len(engine.prefix_cache) == 3 * 3
    # An adapter replaced under the same name: its old blocks go with it.
    from gptj.model.multi_lora import read_adapter

    engine.remove_adapter("alpha")
    assert len(engine.prefix_cache) == 2 * 3
    engine.add_adapter("alpha", read_adapter("alpha", adapter_dirs["beta"], engine.model))
    again = _run(engine, {0: [Request("new alpha", prompt, 6, logprobs=1, adapter="alpha")]})
    assert engine.prefix_cache.hit_tokens == 11
    assert again["new alpha"]["tokens"] == want["beta"]["tokens"]


# ---- tensor parallel -----------------------------------------------------------------------------
def _tp_worker(rank, world_size):
    ctx, _ = init_distributed(tensor_parallel=world_size)
    model = reference_pair(seed=0, ctx=ctx)[1]
    engine = _engine(model, True)
    out = _run(engine, _requests())
    pool = engine.prefix_cache
    keys = list(pool._blocks)
    return {"tokens": {rid: r["tokens"] for rid, r in out.items()},
            "logprobs": {rid: r["logprobs"] for rid, r in out.items()},
            "keys": [k.hex() for k in keys], "heads": pool._blocks[keys[0]].shape[1], "hits": pool.hit_tokens}


def test_tensor_parallel_ranks_hold_the_same_blocks_of_their_own_heads(model):
    ranks = run_distributed(_tp_worker, 2)
    single = _run(_engine(model, False), _requests())
    for rank in ranks:
        assert rank["tokens"] == {rid: r["tokens"] for rid, r in single.items()}
        for rid, r in single.items():
            if r["logprobs"] and r["logprobs"][0] is not None:
                assert rank["logprobs"][rid] == pytest.approx(r["logprobs"], abs=1e-4)
        assert rank["heads"] == TINY.num_heads // 2
        assert rank["hits"] == 20 + 12 + 11 + 20
    assert ranks[0]["keys"] == ranks[1]["keys"]


# ---- the server ----------------------------------------------------------------------------------
LONG = "In the beginning the model read every token of this rather long prompt, one block at a time, and"


def _completion(url: str, prompt: str) -> dict:
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 2}
    resp = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]


def test_the_server_reuses_prefixes_by_default_reports_the_hit_rate_and_can_turn_it_off():
    with tiny_server("--no-prefix-cache") as server:
        assert server.state.loop.engine.prefix_cache is None
        plain = [_completion(server.url, LONG + " then"), _completion(server.url, LONG + " so")]
        assert metric(server.url, "gptj_prefix_cache_prompt_tokens_total") == 0
    with tiny_server() as server:
        engine = server.state.loop.engine
        assert engine.prefix_cache is not None
        cached = [_completion(server.url, LONG + " then"), _completion(server.url, LONG + " so")]
        prompt_tokens = metric(server.url, "gptj_prefix_cache_prompt_tokens_total")
        hits = metric(server.url, "gptj_prefix_cache_hit_tokens_total")
        assert hits >= 16 and hits == engine.prefix_cache.hit_tokens
        assert prompt_tokens == engine.prefix_cache.prompt_tokens
        assert metric(server.url, "gptj_prefix_cache_hit_rate") == pytest.approx(hits / prompt_tokens)
        assert metric(server.url, "gptj_prefix_cache_blocks") == len(engine.prefix_cache) > 0
    for got, want in zip(cached, plain):
        assert got["text"] == want["text"]
        assert got["logprobs"]["token_logprobs"] == pytest.approx(want["logprobs"]["token_logprobs"],
                                                                  abs=LOGPROB_TOLERANCE)
