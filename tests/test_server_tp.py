"""`torchrun --nproc-per-node 2 run_server.py --tensor-parallel 2` (gloo) serves a single process's tokens."""

from __future__ import annotations

import asyncio
import signal

import httpx
import pytest

from gptj.execution.inference.generation import GenerationEngine
from gptj.execution.inference.pipelines import EntailmentPipeline, load_model_and_tokenizer
from gptj.execution.inference.sampling import SamplingParams
from gptj.execution.inference.scoring import choose, score_rows
from tests.fixtures.server import metric, tp_server_process

PROMPTS = ["The cat sat on the", "Once upon a time", "a", "mnli hypothesis: x premise: y target:"]
SAMPLED = dict(temperature=0.8, top_k=40, top_p=0.95, seed=7)


@pytest.fixture(scope="module")
def tp_server():
    with tp_server_process() as (url, proc):
        yield url, proc


def test_tensor_parallel_server_reuses_prompt_prefixes_with_the_single_process_tokens(tp_server):
    """Prefix caching is on by default: both ranks hold the same blocks (their own heads), so the
    second prompt's hit runs the same shortened prefill on both, and the tokens stay a single
    process's (runs before the test below, which stops the server)."""
    url, _ = tp_server
    model, tokenizer = load_model_and_tokenizer("random:tiny", "bundled:tiny")
    long = "In the beginning the model read every token of this rather long prompt, one block at a time, and"
    prompts = [long + " then", long + " so"]
    want = [tokenizer.decode(r.token_ids) for r in GenerationEngine(model).run(tokenizer.encode(prompts), 8,
                                                                                tokenizer.eos_id)]
    before = metric(url, "gptj_prefix_cache_hit_tokens_total")
    texts = []
    for prompt in prompts:  # one after the other: the second finds the first's blocks
        resp = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0},
                          timeout=120)
        assert resp.status_code == 200, resp.text
        texts.append(resp.json()["choices"][0]["text"])
    assert texts == want
    assert metric(url, "gptj_prefix_cache_hit_tokens_total") - before >= 16


def test_tensor_parallel_server_gives_the_single_process_tokens(tp_server):
    url, proc = tp_server
    model, tokenizer = load_model_and_tokenizer("random:tiny", "bundled:tiny")
    engine = GenerationEngine(model)
    ids = tokenizer.encode(PROMPTS)
    greedy = engine.run(ids, 10, tokenizer.eos_id)
    sampled = [engine.run([p], 10, tokenizer.eos_id, SamplingParams(0.8, 40, 0.95), seed=7, stream_ids=[0])[0]
               for p in ids]
    expected = ([tokenizer.decode(r.token_ids) for r in greedy], [tokenizer.decode(r.token_ids) for r in sampled])

    async def ask_all():
        async with httpx.AsyncClient(timeout=120) as http:
            async def ask(prompt, **kwargs):
                resp = await http.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 10, **kwargs})
                assert resp.status_code == 200, resp.text
                return resp.json()["choices"][0]["text"]
            # All at once, so requests join the batch between steps on both ranks.
            return await asyncio.gather(*(ask(p) for p in PROMPTS), *(ask(p, **SAMPLED) for p in PROMPTS))

    texts = asyncio.run(ask_all())
    assert (texts[: len(PROMPTS)], texts[len(PROMPTS):]) == expected
    pair = {"premise": "the cat is asleep", "hypothesis": "a cat sleeps"}
    got = httpx.post(f"{url}/v1/entailment", json=pair, timeout=60).json()
    want = EntailmentPipeline(model, tokenizer)(pair["premise"], pair["hypothesis"])
    assert got["label"] == want["label"] and got["scores"] == pytest.approx(want["scores"], abs=1e-4)
    # Prompt scores (echo + logprobs, as lm-eval asks) from the sharded prefill: the single
    # process's gptj.execution.inference.scoring numbers and top token.
    body = {"prompt": PROMPTS, "max_tokens": 0, "logprobs": 1, "echo": True, "temperature": 0}
    choices = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"]
    reference = score_rows(model, ids, [1] * len(ids), top_k=1)
    for choice, scores in zip(choices, reference):
        lp = choice["logprobs"]
        assert lp["token_logprobs"][1:] == pytest.approx(scores.logprobs.tolist(), abs=1e-4)
        assert [max(top.values()) for top in lp["top_logprobs"][1:]] == pytest.approx(
            scores.top_logprobs[:, 0].tolist(), abs=1e-4)
    # A guided choice, scored by both ranks in the same step: the single process's choice and numbers.
    choices = [" mat", " floor", " roof of the house"]
    body = {"prompt": PROMPTS[0], "guided_choice": choices, "temperature": 0, "logprobs": 1}
    answer = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    choice_ids = tokenizer.encode(choices)
    (picked,) = choose(model, [ids[0]], [[c + [tokenizer.eos_id] for c in choice_ids]])
    assert answer["text"] == choices[picked.best]
    assert answer["logprobs"]["token_logprobs"] == pytest.approx(
        picked.scores[picked.best].logprobs[:-1].tolist(), abs=1e-4)
    # Ctrl-C: rank 0 finishes its last step and tells the follower to stop; no rank fails.
    proc.send_signal(signal.SIGINT)
    proc.wait(60)
    log = proc.stdout.read()
    assert "Exception in thread" not in log and "Connection closed by peer" not in log, log
