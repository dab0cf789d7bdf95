"""The HTTP server on the tiny model, through the real `openai` client and httpx.

One server for the whole module (tiny preset: 16 rows, greedy by default); every answer is
checked against run_inference.py, the pipelines or the same request sent alone.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

import gptj.commands.generate as run_inference
from gptj.execution.inference.pipelines import EntailmentPipeline, load_model_and_tokenizer
from tests.fixtures.server import metric, tiny_server, wait_for

PROMPTS = ["The cat sat on the", "mnli hypothesis: a cat sleeps premise: the cat is asleep target:",
           "Once upon a time", "a"]


@pytest.fixture(scope="module")
def server():
    with tiny_server() as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_greedy_completions_equal_run_inference(server, client, tmp_path):
    out = tmp_path / "out.jsonl"
    argv = ["--max-new-tokens", "12", "--output", str(out)]
    for prompt in PROMPTS:
        argv += ["--prompt", prompt]
    assert run_inference.main(argv) == 0
    expected = [json.loads(line) for line in out.read_text().splitlines()]
    got = client.completions.create(model="random:tiny", prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [c.text for c in got.choices] == [e["text"] for e in expected]
    assert got.usage.completion_tokens == sum(len(e["token_ids"]) for e in expected)
    assert [c.finish_reason for c in got.choices] == [
        {"eos": "stop"}.get(e["finish_reason"], e["finish_reason"]) for e in expected]
    # Token ids in, the same text out; the default (the preset's) is greedy too.
    tokenizer = server.state.tokenizer
    ids = tokenizer.encode(PROMPTS[:1])[0]
    by_ids = client.completions.create(model="random:tiny", prompt=ids, max_tokens=12)
    assert by_ids.choices[0].text == expected[0]["text"]
    assert by_ids.usage.prompt_tokens == len(ids)


def test_streamed_chunks_concatenate_to_the_full_text(client):
    for kwargs in (dict(max_tokens=20), dict(max_tokens=20, temperature=0.9, seed=5, n=2, stop=[" t", "e"])):
        full = client.completions.create(model="random:tiny", prompt=PROMPTS[0], **kwargs)
        chunks = list(client.completions.create(model="random:tiny", prompt=PROMPTS[0], stream=True,
                                                stream_options={"include_usage": True}, **kwargs))
        texts, finish = {}, {}
        for chunk in chunks[:-1]:
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + choice.text
                if choice.finish_reason:
                    finish[choice.index] = choice.finish_reason
        assert [texts.get(c.index, "") for c in full.choices] == [c.text for c in full.choices]
        assert [finish[c.index] for c in full.choices] == [c.finish_reason for c in full.choices]
        assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens
        assert len(chunks) > 3
        if "stop" in kwargs:  # the stop strings cut the text and never appear in it
            assert all(" t" not in c.text and "e" not in c.text for c in full.choices)
            assert len({c.text for c in full.choices}) == 2  # two choices, two random streams


def test_chat_renders_the_template_and_streams_the_same_text(server, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    chat = client.chat.completions.create(model="random:tiny", messages=messages, max_completion_tokens=10)
    prompt = "Be brief.\n\nUser: Name a colour.\nAssistant:"
    plain = client.completions.create(model="random:tiny", prompt=prompt, max_tokens=10, stop=["\nUser:"])
    assert chat.choices[0].message.content == plain.choices[0].text
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == plain.usage.prompt_tokens
    streamed = client.chat.completions.create(model="random:tiny", messages=messages, max_tokens=10, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == chat.choices[0].message.content


def test_logprobs_and_echo(client):
    out = client.completions.create(model="random:tiny", prompt=PROMPTS[2], max_tokens=6, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and max(top.values()) == pytest.approx(logprob)  # greedy: the most likely
        assert top[token] == pytest.approx(logprob)
    assert "".join(lp.tokens).startswith(out.choices[0].text[:1])
    streamed = client.completions.create(model="random:tiny", prompt=PROMPTS[2], max_tokens=6, logprobs=3,
                                         stream=True)
    parts = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == lp.tokens
    assert [x for p in parts for x in p.token_logprobs] == pytest.approx(lp.token_logprobs)
    echoed = client.completions.create(model="random:tiny", prompt=PROMPTS[2], max_tokens=6, echo=True)
    assert echoed.choices[0].text == PROMPTS[2] + out.choices[0].text


def test_32_concurrent_requests_each_return_what_they_return_alone(server):
    async def run():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        kinds = []
        for i in range(32):
            prompt = PROMPTS[i % len(PROMPTS)] + " x" * (i % 7)
            kwargs = dict(max_tokens=4 + (i * 5) % 29)
            if i % 3:
                kwargs.update(temperature=0.7 + 0.1 * (i % 4), top_p=0.95, seed=i % 5)
            kinds.append((prompt, kwargs))

        async def ask(prompt, kwargs):
            return await client.completions.create(model="random:tiny", prompt=prompt, **kwargs)

        together = await asyncio.gather(*(ask(p, k) for p, k in kinds))
        alone = [await ask(p, k) for p, k in kinds]
        await client.close()
        return together, alone

    together, alone = asyncio.run(run())
    assert [r.choices[0].text for r in together] == [r.choices[0].text for r in alone]
    assert [r.usage.completion_tokens for r in together] == [r.usage.completion_tokens for r in alone]
    assert len({r.choices[0].text for r in together}) > 16  # they really differ
    assert metric(server.url, "gptj_requests_running") == 0


def test_a_disconnect_mid_stream_cancels_the_request_and_frees_its_row(server, client):
    cancelled = metric(server.url, "gptj_requests_cancelled_total")
    body = {"model": "random:tiny", "prompt": "a", "max_tokens": 500, "stream": True, "temperature": 0}
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{server.url}/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        first = next(resp.iter_lines())
        assert first.startswith("data: {")
    # The connection is closed: the engine drops the request and its row.
    assert wait_for(lambda: metric(server.url, "gptj_requests_cancelled_total") == cancelled + 1)
    assert wait_for(lambda: metric(server.url, "gptj_requests_running") == 0)
    assert metric(server.url, "gptj_requests_finished_total", 'finish_reason="cancelled"') >= 1
    later = client.completions.create(model="random:tiny", prompt="b", max_tokens=3)
    assert later.usage.completion_tokens >= 1 and later.choices[0].finish_reason in ("length", "stop")


def test_entailment_is_the_pipelines_answer(server):
    model, tokenizer = load_model_and_tokenizer("random:tiny", "bundled:tiny")
    nli = EntailmentPipeline(model, tokenizer)
    pairs = [("the cat is asleep", "a cat sleeps"), ("a man plays a guitar", "nobody makes music")]
    one = httpx.post(f"{server.url}/v1/entailment", json={"premise": pairs[0][0], "hypothesis": pairs[0][1]},
                     timeout=60).json()
    many = httpx.post(f"{server.url}/v1/entailment",
                      json=[{"premise": p, "hypothesis": h} for p, h in pairs], timeout=60).json()
    expected = nli(pairs)
    assert one["label"] == expected[0]["label"]
    assert one["scores"] == pytest.approx(expected[0]["scores"], abs=1e-5)
    assert [m["label"] for m in many] == [e["label"] for e in expected]
    for got, want in zip(many, expected):
        assert got["scores"] == pytest.approx(want["scores"], abs=1e-5)


def test_models_health_and_metrics(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["random:tiny"]
    assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["max_model_len"] == 512
    assert httpx.get(f"{server.url}/health").status_code == 200
    names = {"prompt": "gptj_prompt_tokens_total", "generated": "gptj_generation_tokens_total",
             "finished": "gptj_e2e_request_latency_seconds_count",
             "first_token": "gptj_time_to_first_token_seconds_count", "steps": "gptj_engine_steps_total"}
    before = {key: metric(server.url, name) for key, name in names.items()}
    length_before = metric(server.url, "gptj_requests_finished_total", 'finish_reason="length"')
    # Three HTTP requests, five engine requests (one per prompt and choice).
    two_prompts = client.completions.create(model="random:tiny", prompt=PROMPTS[:2], max_tokens=5)
    two_choices = client.completions.create(model="random:tiny", prompt=PROMPTS[2], max_tokens=7, n=2,
                                            temperature=0.8, seed=1)
    streamed = list(client.completions.create(model="random:tiny", prompt=PROMPTS[3], max_tokens=4, stream=True,
                                              stream_options={"include_usage": True}))[-1]
    after = {key: metric(server.url, name) for key, name in names.items()}
    rose = {key: after[key] - before[key] for key in names}
    # Prompt tokens count once per engine request: twice for the two choices of one prompt.
    assert rose["prompt"] == (two_prompts.usage.prompt_tokens + 2 * two_choices.usage.prompt_tokens
                              + streamed.usage.prompt_tokens)
    assert rose["generated"] == sum(r.usage.completion_tokens for r in (two_prompts, two_choices, streamed))
    assert rose["finished"] == rose["first_token"] == 5
    assert rose["steps"] >= 7  # the longest request alone needs 7 tokens
    finished = [c.finish_reason for r in (two_prompts, two_choices) for c in r.choices]
    assert (metric(server.url, "gptj_requests_finished_total", 'finish_reason="length"') - length_before
            == finished.count("length") + (streamed.usage.completion_tokens == 4))
    assert metric(server.url, "gptj_requests_running") == metric(server.url, "gptj_requests_waiting") == 0


BAD_COMPLETIONS = [
    (dict(prompt="a", max_tokens=600), "context is 512 tokens, but the prompt has 1 tokens and max_tokens is 600"),
    (dict(prompt="a", temperature=-0.5), "temperature must be >= 0, got -0.5"),
    (dict(prompt="a", top_p=0), "top_p must be in (0, 1], got 0"),
    (dict(prompt="a", top_p=1.5), "top_p must be in (0, 1], got 1.5"),
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt=[]), "prompt is empty"),
    (dict(prompt=[[1, 2], []]), "prompt[1] is empty"),
    (dict(prompt=[5, 100000]), "token id 100000 outside the vocabulary"),
    (dict(prompt="a", n=9), "n must be in [1, 8], got 9"),
    (dict(prompt="a", logprobs=6), "logprobs must be in [0, 5], got 6"),
    (dict(prompt="a", max_tokens=0), "max_tokens must be >= 1, got 0"),
    (dict(prompt="a", top_k=-2), "top_k must be >= 0"),
    (dict(prompt=[1.5]), "prompt"),
    (dict(max_tokens=3), "prompt"),
]


@pytest.mark.parametrize("body, message", BAD_COMPLETIONS)
def test_bad_input_is_a_400_naming_the_problem(server, body, message):
    resp = httpx.post(f"{server.url}/v1/completions", json={"model": "random:tiny", **body}, timeout=60)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}


def test_other_errors_through_the_openai_client(server, client):
    with pytest.raises(openai.BadRequestError, match="context is 512 tokens.*600 tokens and max_tokens is 16"):
        client.completions.create(model="random:tiny", prompt=list(range(1, 601)))
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4' does not exist"):
        client.completions.create(model="gpt-4", prompt="a")
    with pytest.raises(openai.BadRequestError, match="role 'robot'"):
        client.chat.completions.create(model="random:tiny", messages=[{"role": "robot", "content": "x"}])
    resp = httpx.post(f"{server.url}/v1/completions", content=b"{not json", timeout=60,
                      headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "not valid JSON" in resp.json()["error"]["message"]
    resp = httpx.post(f"{server.url}/v1/entailment", json={"premise": "", "hypothesis": "x"}, timeout=60)
    assert resp.status_code == 400 and "premise is empty" in resp.json()["error"]["message"]
    assert metric(server.url, "gptj_requests_rejected_total", 'status="404"') >= 1
    # Fields OpenAI does not define are accepted and ignored, as are unsupported ones at their neutral value.
    ok = httpx.post(f"{server.url}/v1/completions", timeout=60,
                    json={"prompt": "a", "max_tokens": 2, "frequency_penalty": 0, "whatever": [1]})
    assert ok.status_code == 200


def test_a_quantized_server_answers_as_quantized_run_inference(server, tmp_path):
    from gptj.model.quantized_linear import QuantizedLinear

    out = tmp_path / "out.jsonl"
    quant = ["--quantize", "int4", "--group-size", "32"]
    assert run_inference.main([*quant, "--max-new-tokens", "10", "--output", str(out), "--prompt", PROMPTS[0]]) == 0
    expected = json.loads(out.read_text())
    body = {"model": "random:tiny", "prompt": PROMPTS[0], "max_tokens": 10, "temperature": 0}
    with tiny_server(*quant) as quantized:
        got = httpx.post(f"{quantized.url}/v1/completions", json=body, timeout=60).json()
        answered = quantized.state.loop.engine.model
        layers = [m for m in answered.modules() if isinstance(m, QuantizedLinear)]
    assert got["choices"][0]["text"] == expected["text"]
    assert len(layers) == 3 * answered.config.num_layers + 1
    assert all(m.bits == 4 and m.group_size == 32 for m in layers)
    # The float server (same seed) answers otherwise on this prompt: the quantized model answered.
    float_text = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    assert float_text != got["choices"][0]["text"]
