"""RequestEngine (add / cancel / step) against GenerationEngine.run on each prompt alone."""

from __future__ import annotations

import pytest
import torch

from gptj.execution.inference.generation import GenerationEngine, generate
from gptj.execution.inference.request_engine import Request, RequestEngine
from gptj.execution.inference.sampling import SamplingParams
from tests.fixtures.generation import PROMPTS, reference_pair


@pytest.fixture(scope="module")
def model():
    return reference_pair(seed=0)[1]


@pytest.fixture(scope="module")
def bf16_model(model):
    """The same weights in bf16 (its KV cache on a CPU: gptj/model/kv_cache.py cache_dtype)."""
    from gptj.model import GPTJ

    copy = GPTJ(model.config, dtype=torch.bfloat16).eval()
    copy.load_state_dict(model.state_dict())
    return copy


def run_until_done(engine, arrivals=None, cancel_at=None):
    """Step until idle; `arrivals` maps step number -> requests added before that step."""
    arrivals, cancel_at = dict(arrivals or {}), dict(cancel_at or {})
    tokens, finish, steps = {}, {}, 0
    while engine.has_work or arrivals:
        for request in arrivals.pop(steps, []):
            engine.add(request)
        for request_id in cancel_at.pop(steps, []):
            engine.cancel(request_id)
        for event in engine.step():
            if event.token is not None:
                tokens.setdefault(event.request_id, []).append(event.token)
            if event.finish_reason:
                assert event.request_id not in finish, "finished twice"
                finish[event.request_id] = event
        steps += 1
        assert steps < 500
    return tokens, finish


@pytest.mark.parametrize("prefill_multiple, dtype", [(1, "fp32"), (16, "fp32"), (16, "bf16")])
def test_requests_joining_between_steps_get_the_tokens_they_get_alone(model, bf16_model, prefill_multiple, dtype):
    model = bf16_model if dtype == "bf16" else model
    free = generate(model, PROMPTS[1:2], max_new_tokens=12, eos_token_id=None)[0]
    eos = free.token_ids[3]
    budgets = [12, 5, 9, 12, 7]
    alone = [generate(model, [p], max_new_tokens=n, eos_token_id=eos)[0] for p, n in zip(PROMPTS, budgets)]
    engine = RequestEngine(model, max_batch_size=2, eos_token_id=eos, prefill_multiple=prefill_multiple)
    requests = [Request(f"r{i}", p, n) for i, (p, n) in enumerate(zip(PROMPTS, budgets))]
    # Two arrive at once, the rest while others run; only two rows, so some wait.
    tokens, finish = run_until_done(engine, {0: requests[:2], 2: requests[2:4], 5: requests[4:]})
    for i, result in enumerate(alone):
        assert tokens.get(f"r{i}", []) == result.token_ids
        assert finish[f"r{i}"].finish_reason == result.finish_reason
    assert {e.finish_reason for e in finish.values()} == {"eos", "length"}
    assert engine.num_running == engine.num_waiting == 0


def test_each_request_samples_from_its_own_settings_and_stream(model):
    settings = [SamplingParams(0.9, 20, 1.0), SamplingParams(), SamplingParams(1.3, 0, 0.8),
                SamplingParams(0.7, 5, 0.9), SamplingParams(1.0)]
    seeds = [3, 0, 11, 3, 5]
    runner = GenerationEngine(model)
    alone = [runner.run([p], 10, None, s, seed=seed, stream_ids=[i])[0].token_ids
             for i, (p, s, seed) in enumerate(zip(PROMPTS, settings, seeds))]
    engine = RequestEngine(model, max_batch_size=3, eos_token_id=None)
    requests = [Request(f"r{i}", p, 10, s, seed=seed, stream_id=i)
                for i, (p, s, seed) in enumerate(zip(PROMPTS, settings, seeds))]
    tokens, _ = run_until_done(engine, {0: requests[:1], 1: requests[1:4], 4: requests[4:]})
    assert [tokens[f"r{i}"] for i in range(len(PROMPTS))] == alone
    assert len({tuple(t) for t in alone}) == len(alone)


def test_cancel_frees_the_row_at_once(model):
    engine = RequestEngine(model, max_batch_size=1, eos_token_id=None)
    long = Request("long", PROMPTS[0], 40)
    short = Request("short", PROMPTS[2], 6)
    queued = Request("queued", PROMPTS[3], 6)
    tokens, finish = run_until_done(engine, {0: [long, short, queued]}, cancel_at={3: ["long", "queued"]})
    assert finish["long"].finish_reason == "cancelled" and len(tokens["long"]) == 4  # 3 steps: 1 + 3
    assert finish["queued"].finish_reason == "cancelled" and "queued" not in tokens
    assert tokens["short"] == generate(model, [PROMPTS[2]], 6, None)[0].token_ids
    assert engine.steps == 3 + 5  # the freed row took `short` at the very next step
    assert not engine.cancel("short")  # finished requests are gone


def test_a_failing_request_is_finished_with_an_error_and_the_others_go_on(model):
    def broken_decode(ids):
        raise RuntimeError("detokenizer broke")

    engine = RequestEngine(model, max_batch_size=2, eos_token_id=None, decode=broken_decode)
    requests = [Request("bad", PROMPTS[0], 8, stop_strings=["x"]), Request("good", PROMPTS[1], 8)]
    tokens, finish = run_until_done(engine, {0: requests})
    assert finish["bad"].finish_reason == "error" and "detokenizer broke" in finish["bad"].error
    assert tokens["good"] == generate(model, [PROMPTS[1]], 8, None)[0].token_ids
    # The engine still serves new requests afterwards.
    tokens, finish = run_until_done(engine, {0: [Request("later", PROMPTS[2], 3)]})
    assert finish["later"].finish_reason == "length" and len(tokens["later"]) == 3


def test_logprobs_are_the_models_log_softmax(model):
    engine = RequestEngine(model, max_batch_size=2, eos_token_id=None)
    events = []
    engine.add(Request("a", PROMPTS[0], 4, logprobs=3))
    engine.add(Request("b", PROMPTS[1], 4))
    while engine.has_work:
        events += engine.step()
    tokens = [e.token for e in events if e.request_id == "a"]
    for i, event in enumerate(e for e in events if e.request_id == "a"):
        sequence = PROMPTS[0] + tokens[:i]
        expected = model.logits(torch.tensor([sequence]), last_only=True)[0].log_softmax(-1)
        assert event.logprob == pytest.approx(expected[event.token].item(), abs=1e-4)
        top = torch.topk(expected, 3)
        assert [t for t, _ in event.top_logprobs] == top.indices.tolist()
        assert [p for _, p in event.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert all(e.logprob is None for e in events if e.request_id == "b")


def test_bad_requests_are_named(model):
    engine = RequestEngine(model, max_batch_size=1, eos_token_id=None, max_length=32)
    with pytest.raises(ValueError, match="prompt has 30 tokens and max_new_tokens is 5 \\(35 in total\\).*32"):
        engine.add(Request("x", [1] * 30, 5))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add(Request("x", [1, 10_000], 5))
    with pytest.raises(ValueError, match="is empty"):
        engine.add(Request("x", [], 5))
    with pytest.raises(ValueError, match="need a decode function"):
        engine.add(Request("x", [1], 5, stop_strings=["a"]))
    assert engine.num_waiting == 0


def test_ignore_eos_keeps_generating_past_eos(model):
    free = generate(model, [PROMPTS[0]], max_new_tokens=10, eos_token_id=None)[0].token_ids
    eos = free[2]
    engine = RequestEngine(model, max_batch_size=2, eos_token_id=eos)
    tokens, finish = run_until_done(engine, {0: [Request("stops", PROMPTS[0], 10),
                                                 Request("goes on", PROMPTS[0], 10, ignore_eos=True)]})
    assert tokens["stops"] == free[:2] and finish["stops"].finish_reason == "eos"
    assert tokens["goes on"] == free and finish["goes on"].finish_reason == "length"


def test_a_leading_rows_view_shares_the_cache_memory():
    from gptj.model.kv_cache import StaticKVCache

    cache = StaticKVCache(num_layers=2, batch_size=4, num_heads=2, head_dim=3, max_length=8)
    view = cache.leading_rows(2)
    assert view.batch_size == 2 and cache.leading_rows(4) is cache
    view.prefill(None, torch.tensor([3, 1]))
    k = torch.randn(2, 2, 1, 3)
    view.decode(torch.tensor([3, 1]))
    view.layer(1).update(k, k)
    base = cache.layers[1].keys  # the writes through the view land in the cache itself
    assert torch.equal(base[0, :, 3], k[0, :, 0]) and torch.equal(base[1, :, 1], k[1, :, 0])
    assert cache.decode_mask[:2, 0, 0].tolist() == [[True] * 4 + [False] * 4, [True] * 2 + [False] * 6]
    assert not cache.decode_mask[2:].any() and not cache.layers[1].keys[2:].any()
    with pytest.raises(ValueError, match="1 <= n <= 4"):
        cache.leading_rows(5)


def test_a_budgeted_cache_grows_as_rows_fill_stays_in_its_bytes_and_gives_the_same_tokens(model):
    from gptj.execution.inference.kv_budget import CacheBudget
    from gptj.model.kv_cache import kv_bytes_per_token

    per_token = kv_bytes_per_token(model)
    assert per_token == 2 * model.config.num_layers * model.config.hidden_size * 4  # fp32 keys and values
    budget = CacheBudget(per_token, 64 * per_token, max_rows=4, max_length=64, slot_step=8)
    engine = RequestEngine(model, max_batch_size=4, eos_token_id=None, cache_budget=budget)
    assert (engine.cache.batch_size, engine.cache.max_length) == (1, 8)
    short = [Request(f"s{i}", p[:6], 8) for i, p in enumerate(PROMPTS[:4])]
    long = Request("long", PROMPTS[0][:6], 34)  # 40 slots: not beside four rows of 16
    requests = short + [long]
    for request in requests:
        engine.add(request)
    tokens, shapes, first_step = {}, set(), {}
    while engine.has_work:
        for event in engine.step():
            first_step.setdefault(event.request_id, engine.steps)
            if event.token is not None:
                tokens.setdefault(event.request_id, []).append(event.token)
        shapes.add((engine.cache.batch_size, engine.cache.max_length))
        assert engine.cache.nbytes() <= budget.budget_bytes
    assert (4, 16) in shapes and (1, 40) in shapes  # grew to the short rows, then held the long one alone
    assert first_step["long"] > max(first_step[r.request_id] for r in short)  # it waited for room
    for request in requests:
        assert tokens[request.request_id] == generate(model, [request.prompt], request.max_new_tokens, None)[0].token_ids


def test_a_budget_grows_the_cache_length_by_steps_and_a_factor_and_rows_only_when_asked():
    """Hand-computed shapes: lengths round up to 32 slots and grow at least 1.5x; rows double only
    when more rows are asked; a shape past the budget shrinks to what is asked, or is refused."""
    from gptj.execution.inference.kv_budget import CacheBudget

    budget = CacheBudget(bytes_per_token=1, budget_bytes=4096, max_rows=16, max_length=2048)
    assert budget.first_shape() == (1, 32)
    assert budget.shape_for(1, 56, (1, 32)) == (1, 64)  # 56 -> 64 slots, not a whole 256-slot step
    assert budget.shape_for(1, 130, (1, 128)) == (1, 192)  # 1.5 x 128, not 160
    assert budget.shape_for(1, 200, (1, 96)) == (1, 224)  # past 1.5 x: the length asked, rounded
    assert budget.shape_for(3, 50, (1, 224)) == (3, 224)  # rows: max(3, 2 x 1)
    assert budget.shape_for(4, 50, (3, 224)) == (6, 224)  # doubled
    assert budget.shape_for(2, 300, (6, 224)) == (6, 352)  # more length alone keeps the rows
    assert budget.shape_for(11, 300, (6, 352)) == (11, 352)  # 12 (doubled) x 352 > 4096: the 11 asked
    assert budget.shape_for(16, 300, (6, 352)) is None  # 16 x 320 > 4096 (the engine admits fewer)
    assert budget.shape_for(2, 2000, (6, 352)) == (2, 2016)  # 6 x 2016 is over budget: just the rows asked
    assert budget.shape_for(3, 2000, (2, 2016)) is None  # 3 x 2016 slots exceed the budget
    assert budget.shape_for(1, 10, (6, 352)) == (6, 352)  # a shape that holds what is asked is kept


def test_the_server_budget_line_names_the_dtype_the_cache_holds(bf16_model, capsys, monkeypatch):
    """A bf16 model on a CPU without AMX caches keys and values in fp32: the server's line says
    so, and its budget counts 4 bytes a value (what an estimate from the activations' 2 halves)."""
    from types import SimpleNamespace

    import gptj.model.kv_cache
    from gptj.serving.server import cache_budget

    monkeypatch.setattr(gptj.model.kv_cache, "native_bf16_attention", lambda: False)

    config = bf16_model.config
    server = SimpleNamespace(max_batch_size=2, max_model_len=32, memory_utilization=0.5)
    budget = cache_budget(bf16_model, server, None)
    assert budget.bytes_per_token == 2 * config.num_layers * config.hidden_size * 4
    line = capsys.readouterr().out
    per_token = f"{budget.bytes_per_token / 1024:.2f} KiB"
    assert line.startswith(f"KV cache (fp32, {per_token} a token): up to 2 rows x 32 tokens asked"), line
    budget = cache_budget(bf16_model, server, torch.bfloat16)  # --kv-cache-dtype bf16
    assert budget.bytes_per_token == 2 * config.num_layers * config.hidden_size * 2
    assert capsys.readouterr().out.startswith("KV cache (bf16, ")


def test_a_resized_cache_keeps_what_its_rows_hold():
    from gptj.model.kv_cache import StaticKVCache

    cache = StaticKVCache(num_layers=2, batch_size=2, num_heads=2, head_dim=3, max_length=4)
    cache.layers[1].keys.copy_(torch.arange(48.0).view(2, 2, 4, 3))
    cache.decode_mask[:, 0, 0, :2] = True
    before = cache.layers[1].keys.clone()
    cache.resize(3, 6)
    keys = cache.layers[1].keys
    assert keys.shape == (3, 2, 6, 3) and torch.equal(keys[:2, :, :4], before)
    assert not keys[2].any() and not keys[:, :, 4:].any()
    assert cache.decode_mask[:, 0, 0].tolist() == [[True] * 2 + [False] * 4] * 2 + [[False] * 6]
    assert cache.write_index[0].shape == (3, 2)
    cache.resize(1, 3)
    assert torch.equal(cache.layers[1].keys[0], before[0, :, :3])
