"""The generation engine against transformers `generate` and against full recomputation."""

from __future__ import annotations

import pytest
import torch

from gptj.execution.inference.generation import GenerationEngine, generate
from gptj.execution.inference.sampling import SamplingParams
from tests.fixtures.generation import PROMPTS, hf_greedy, reference_pair
from tests.fixtures.reference import TINY, max_rel_diff


@pytest.fixture(scope="module")
def pair():
    return reference_pair(seed=0)


def test_greedy_matches_transformers_generate_on_a_ragged_batch(pair):
    hf, ours = pair
    expected = hf_greedy(hf, PROMPTS, max_new_tokens=20)
    results = generate(ours, PROMPTS, max_new_tokens=20, eos_token_id=None)
    assert [r.token_ids for r in results] == expected
    assert all(r.finish_reason == "length" for r in results)
    assert len({tuple(t) for t in expected}) == len(PROMPTS)  # the continuations really differ


def test_eos_stops_each_row_and_is_excluded(pair):
    hf, ours = pair
    free = hf_greedy(hf, PROMPTS, max_new_tokens=16)
    eos = free[0][3]  # a token the first row produces mid-way
    results = generate(ours, PROMPTS, max_new_tokens=16, eos_token_id=eos)
    with_eos = hf_greedy(hf, PROMPTS, max_new_tokens=16, eos_token_id=eos, pad_token_id=eos)
    for result, unrestricted, hf_row in zip(results, free, with_eos):
        if eos in unrestricted:
            cut = unrestricted.index(eos)
            assert result.token_ids == unrestricted[:cut]
            assert result.finish_reason == "eos"
            assert hf_row[:cut] == result.token_ids
        else:
            assert result.token_ids == unrestricted and result.finish_reason == "length"
    assert results[0].finish_reason == "eos"


def test_cached_decode_logits_equal_full_recomputation(pair):
    _, ours = pair
    engine = GenerationEngine(ours)
    seen = []
    forward = engine.runner._decode_fn

    def recording(tokens, positions, mask):
        logits = forward(tokens, positions, mask)
        seen.append((positions.clone(), logits.clone()))
        return logits

    engine.runner._decode_fn = recording
    prompts = PROMPTS[:3]
    results = engine.run(prompts, max_new_tokens=8, eos_token_id=None)
    assert len(seen) == 7  # first token from prefill, then 7 decode steps
    for step, (positions, logits) in enumerate(seen):
        for row, prompt in enumerate(prompts):
            sequence = prompt + results[row].token_ids[: step + 1]
            assert positions[row].item() == len(sequence) - 1
            full = ours.logits(torch.tensor([sequence]), last_only=True)[0]
            assert max_rel_diff(logits[row], full) < 1e-5


def test_continuous_batching_matches_running_each_prompt_alone(pair):
    _, ours = pair
    alone = [generate(ours, [p], max_new_tokens=12, eos_token_id=None)[0] for p in PROMPTS]
    eos = alone[1].token_ids[2]  # rows finish at different steps, so refills interleave
    alone = [generate(ours, [p], max_new_tokens=12, eos_token_id=eos)[0] for p in PROMPTS]
    batched = generate(ours, PROMPTS, max_new_tokens=12, eos_token_id=eos, batch_size=2)
    assert [(r.token_ids, r.finish_reason) for r in batched] == [(r.token_ids, r.finish_reason) for r in alone]
    assert {r.finish_reason for r in batched} == {"eos", "length"}
    engine = GenerationEngine(ours)
    sampling = SamplingParams(temperature=0.9, top_k=20)
    sampled = engine.run(PROMPTS, 10, None, sampling, seed=3, batch_size=2)
    for i, p in enumerate(PROMPTS):
        alone_i = engine.run([p], 10, None, sampling, seed=3, batch_size=1, stream_ids=[i])[0]
        assert sampled[i].token_ids == alone_i.token_ids
    # Stream ids default to the prompt's index in the list.
    first_alone = generate(ours, [PROMPTS[0]], 10, None, temperature=0.9, top_k=20, seed=3)[0]
    assert sampled[0].token_ids == first_alone.token_ids


def test_stop_sequences_and_stop_strings(pair):
    _, ours = pair
    free = generate(ours, PROMPTS[:2], max_new_tokens=16, eos_token_id=None)
    stop = free[0].token_ids[4:6]
    results = generate(ours, PROMPTS[:2], max_new_tokens=16, eos_token_id=None, stop_token_sequences=[stop])
    first = next(i for i in range(len(free[0].token_ids)) if free[0].token_ids[i : i + 2] == stop)
    assert results[0].token_ids == free[0].token_ids[: first + 2]
    assert results[0].finish_reason == "stop"
    expected_second = free[1].token_ids
    for i in range(len(expected_second) - 1):
        if expected_second[i : i + 2] == stop:
            expected_second = expected_second[: i + 2]
            break
    assert results[1].token_ids == expected_second

    def letters(ids):
        return "".join(chr(ord("a") + t % 26) for t in ids)

    text = letters(free[1].token_ids)
    target = text[5:7]
    engine = GenerationEngine(ours)
    out = engine.run(PROMPTS[1:2], 16, None, stop_strings=[target], decode=letters)[0]
    assert out.finish_reason == "stop"
    assert letters(out.token_ids).endswith(target) and target not in letters(out.token_ids[:-1])
    assert out.token_ids == free[1].token_ids[: len(out.token_ids)]


def test_bad_inputs_are_named(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(ours, [[1, 2], []], 4, None)
    with pytest.raises(ValueError, match="context is 64"):
        generate(ours, [[1] * 64], 4, None)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(ours, [[TINY.vocab_size]], 4, None)
    with pytest.warns(UserWarning, match="exceeds the context"):
        result = generate(ours, [[1] * 60], 10, None)[0]
    assert len(result.token_ids) == 4 and result.finish_reason == "length"


def test_streamed_block_weights_give_the_resident_tokens():
    from gptj.execution.runtime.offload import BlockWeightStreamer

    _, resident = reference_pair(seed=3)
    _, streamed = reference_pair(seed=3)
    streamer = BlockWeightStreamer(streamed, torch.device("cpu"))
    streamer.attach()
    expected = generate(resident, PROMPTS, 8, None, batch_size=2)
    got = generate(streamed, PROMPTS, 8, None, batch_size=2)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert streamer.copies > 2 * len(streamed.blocks)  # every forward fetched every block
    assert streamer.peak_resident_blocks <= 2


def test_bf16_decode_on_cpu_caches_fp32_and_picks_the_tokens_of_a_bf16_cache(pair, monkeypatch):
    import gptj.model.kv_cache
    from gptj.model import GPTJ
    from gptj.model.kv_cache import StaticKVCache

    monkeypatch.setattr(gptj.model.kv_cache, "native_bf16_attention", lambda: False)  # a CPU without AMX
    model = GPTJ(pair[1].config, dtype=torch.bfloat16).eval()
    model.load_state_dict(pair[1].state_dict())
    fast = GenerationEngine(model)
    fast_results = fast.run(PROMPTS, max_new_tokens=12, eos_token_id=None)
    assert fast.cache.layers[0].keys.dtype == torch.float32
    plain = GenerationEngine(model)
    plain.cache = StaticKVCache.for_model(model, len(PROMPTS), model.config.max_positions, dtype=torch.bfloat16)
    plain_results = plain.run(PROMPTS, max_new_tokens=12, eos_token_id=None)
    assert plain.cache.layers[0].keys.dtype == torch.bfloat16  # the engine kept the cache it was given
    assert [r.token_ids for r in fast_results] == [r.token_ids for r in plain_results]


@pytest.mark.parametrize("amx", [False, True])
def test_the_cpu_cache_dtype_follows_torchs_native_bf16_attention(amx, monkeypatch):
    """bf16 on a CPU: fp32 keys and values where torch's attention has no native bf16 path, bf16
    where it runs on AMX tiles; fp16 always fp32 on a CPU; fp32 and every GPU dtype as they are."""
    import gptj.model.kv_cache
    from gptj.model.kv_cache import cache_dtype

    monkeypatch.setattr(gptj.model.kv_cache, "native_bf16_attention", lambda: amx)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert cache_dtype(torch.bfloat16, cpu) == (torch.bfloat16 if amx else torch.float32)
    assert cache_dtype(torch.float16, cpu) == torch.float32
    assert cache_dtype(torch.float32, cpu) == torch.float32
    assert cache_dtype(torch.bfloat16, gpu) == torch.bfloat16 and cache_dtype(torch.float16, gpu) == torch.float16


def test_compiled_cpu_decode_step_gives_the_eager_tokens():
    """--compile on CPU (torch.compile of the decode step, static shapes): a short greedy run
    equals the eager one."""
    from gptj.execution.inference.generation import GenerationEngine
    from gptj.execution.inference.pipelines import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("random:tiny")
    prompts = tok.encode(["the cat sat on", "a dog"])
    eager = GenerationEngine(model).run(prompts, 4, None)
    compiled = GenerationEngine(model, compile_decode=True).run(prompts, 4, None)
    assert [r.token_ids for r in compiled] == [r.token_ids for r in eager]
    assert all(len(r.token_ids) == 4 for r in eager)


def test_generate_over_a_kept_runner_reuses_its_cache_and_matches_transformers(pair):
    """Offline generation is the plain `generate` over the request engine; a ModelRunner passed
    in keeps its KV cache from one call to the next, and the engine class only holds one."""
    import ast
    import inspect

    import gptj.execution.inference.request_engine as request_engine
    from gptj.execution.inference.generation import GenerationStats
    from gptj.execution.inference.model_runner import ModelRunner

    hf, ours = pair
    expected = hf_greedy(hf, PROMPTS, max_new_tokens=6)
    runner, stats = ModelRunner(ours), GenerationStats()
    assert [r.token_ids for r in generate(ours, PROMPTS, 6, None, runner=runner, stats=stats)] == expected
    cache = runner.cache
    assert stats.generated_tokens == 6 * len(PROMPTS) and stats.total_seconds > 0
    assert [r.token_ids for r in generate(ours, PROMPTS, 6, None, runner=runner)] == expected
    assert runner.cache is cache  # large enough: kept
    assert not issubclass(GenerationEngine, ModelRunner)
    # The request engine calls the runner's public prefill and decode only.
    tree = ast.parse(inspect.getsource(request_engine))
    private = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
               and isinstance(node.value, ast.Attribute) and node.value.attr == "runner" and node.attr.startswith("_")}
    assert private == set()
