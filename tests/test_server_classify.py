"""POST /v1/classify against the classification pipeline on the same model, /v1/entailment as
its MNLI instance, and every refusal as a 400 naming the field."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from gptj.execution.inference.classification import ClassificationPipeline
from gptj.execution.inference.pipelines import load_model_and_tokenizer
from tests.fixtures.server import tiny_server

INLINE = {"prompt": "review: {text} sentiment:", "target": " {label}", "labels": ["negative", "positive"]}


@pytest.fixture(scope="module")
def server():
    with tiny_server("--max-model-len", "64") as s:
        yield s


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return load_model_and_tokenizer("random:tiny", "bundled:tiny")


def post(server, body):
    return httpx.post(f"{server.url}/v1/classify", json=body, timeout=60)


def assert_same(got: list[dict], want: list[dict]):
    assert [g["label"] for g in got] == [w["label"] for w in want]
    for g, w in zip(got, want):
        assert g["probabilities"] == pytest.approx(w["probabilities"], abs=1e-5)
        assert g["log_likelihoods"] == pytest.approx(w["log_likelihoods"], abs=1e-4)


def test_classify_is_the_pipelines_answer(server, model_and_tokenizer):
    model, tok = model_and_tokenizer
    sst2 = ClassificationPipeline(model, tok, task="sst2")
    rows = [{"sentence": "a fine film"}, {"sentence": "dull, long and loud"}]
    resp = post(server, {"task": "sst2", "inputs": rows})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["task"] == "sst2" and body["labels"] == ["negative", "positive"]
    assert_same(body["results"], sst2(rows))
    one = post(server, {"task": "sst2", "input": rows[1]}).json()
    assert_same(one["results"], [sst2(rows[1])])
    # A task spelled out in the request, and other labels for it.
    inline = post(server, {"task": INLINE, "inputs": [{"text": "great"}], "choices": ["bad", "good", "meh"]}).json()
    from gptj.data.tasks import _make_task

    task = _make_task("request", {**INLINE, "fields": {"text": "text", "label": "label"}}, "test")
    want = ClassificationPipeline(model, tok, task=task)([{"text": "great"}], choices=["bad", "good", "meh"])
    assert inline["labels"] == ["bad", "good", "meh"]
    assert_same(inline["results"], want)


def test_entailment_is_classify_with_mnli(server):
    pair = {"premise": "the cat is asleep", "hypothesis": "a cat sleeps"}
    entail = httpx.post(f"{server.url}/v1/entailment", json=pair, timeout=60).json()
    classified = post(server, {"task": "mnli", "input": pair}).json()["results"][0]
    assert_same([entail], [classified])
    assert entail["scores"] == entail["probabilities"]


def test_requests_at_once_get_what_they_get_alone(server):
    bodies = [{"task": "sst2", "input": {"sentence": f"review number {i}" + " ok" * i}} for i in range(5)]
    bodies.append({"task": "mnli", "input": {"premise": "a b", "hypothesis": "c d"}})

    async def together():
        async with httpx.AsyncClient(timeout=60) as http:
            return await asyncio.gather(*(http.post(f"{server.url}/v1/classify", json=b) for b in bodies))

    for got, body in zip(asyncio.run(together()), bodies):
        assert_same(got.json()["results"], post(server, body).json()["results"])


@pytest.mark.parametrize("body, param, message", [
    ({"task": "sentiment-of-my-own", "input": {"sentence": "x"}}, "task", "unknown task 'sentiment-of-my-own'"),
    ({"input": {"sentence": "x"}}, "task", "task is missing"),
    ({"task": {"prompt": "x {text}"}, "input": {"text": "x"}}, "task", "string 'prompt' and 'target'"),
    ({"task": "sst2", "inputs": [{"sentence": "x"}, {"text": "x"}]}, "inputs[1].sentence",
     "inputs[1].sentence is missing (task sst2 needs sentence)"),
    ({"task": "sst2", "input": {"sentence": "x"}, "choices": []}, "choices", "choices must be a non-empty list"),
    ({"task": "sst2", "input": {"sentence": "x"}, "choices": ["a", "a"]}, "choices", "the same label twice"),
    ({"task": "qa", "input": {"question": "q", "context": "c"}}, "choices", "task qa has no labels"),
    ({"task": "sst2"}, "input", "exactly one of input"),
    ({"task": "sst2", "input": {"sentence": "word " * 70}}, "input", "beyond the context of 64 tokens"),
    ({"task": "sst2", "input": {"sentence": "x"}, "model": "nope"}, "model", "model 'nope' does not exist"),
])
def test_bad_requests_are_a_4xx_naming_the_field(server, body, param, message):
    resp = post(server, body)
    assert 400 <= resp.status_code < 500, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and message in error["message"]


def test_a_text_too_long_for_the_context_is_refused_before_it_is_tokenized(server, monkeypatch):
    state = server.state
    limit = state.max_model_len * state.longest_token_chars()  # more characters cannot fit
    seen = []
    encode = state.tokenizer.encode

    def recording(texts):
        seen.extend(len(t) for t in texts)
        return encode(texts)

    monkeypatch.setattr(state.tokenizer, "encode", recording)
    resp = post(server, {"task": "sst2", "inputs": [{"sentence": "ok"}, {"sentence": "x" * (limit + 1)}]})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "inputs[1]" and "characters a token" in error["message"]
    resp = post(server, {"task": "sst2", "input": {"sentence": "ok"}, "choices": ["bad", "y" * (limit + 1)]})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "choices", resp.text
    assert seen and max(seen) <= limit  # the short texts were tokenized, the long ones never
