"""Big requests cannot take the server's memory or its event loop: a body over the limit is a 413
before it is parsed or kept, a text that cannot fit the context is refused before it is
tokenized, and tokenizing runs off the event loop. The soak (many clients beside one posting
10 MB bodies) is benchmarks/bench_big_bodies.py; a few seconds of it run here."""

from __future__ import annotations

import os
import threading

import httpx
import pytest

from benchmarks import bench_big_bodies
from tests.fixtures.server import metric, tiny_server

LIMIT = 100_000


@pytest.fixture(scope="module")
def server():
    with tiny_server() as s:
        s.state.max_body_bytes = LIMIT
        yield s


@pytest.fixture
def encode_calls(server, monkeypatch):
    """The texts the server tokenizes during a test."""
    calls, encode = [], server.state.tokenizer.encode

    def counted(texts):
        calls.append(list(texts))
        return encode(texts)

    monkeypatch.setattr(server.state.tokenizer, "encode", counted)
    return calls


def test_a_body_over_the_limit_is_a_413_before_it_is_parsed(server, encode_calls):
    before = metric(server.url, "gptj_requests_rejected_total", 'status="413"')
    oversized = b'{"prompt": "' + b"a " * LIMIT  # not even JSON: never parsed, so no 400
    headers = {"content-type": "application/json"}
    with httpx.Client(timeout=60) as http:
        resp = http.post(f"{server.url}/v1/completions", content=oversized, headers=headers)
        assert resp.status_code == 413, resp.text
        error = resp.json()["error"]
        assert error["code"] == "request_too_large" and f"at most {LIMIT} bytes" in error["message"]
        assert f"{len(oversized)} bytes" in error["message"]

        def chunks():  # no Content-Length: refused once the bytes read pass the limit
            for start in range(0, len(oversized), 16_384):
                yield oversized[start:start + 16_384]

        resp = http.post(f"{server.url}/v1/chat/completions", content=chunks(), headers=headers)
        assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large", resp.text
        # The same client goes on being served.
        ok = http.post(f"{server.url}/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert ok.status_code == 200
    assert encode_calls == [["a"]]
    assert metric(server.url, "gptj_requests_rejected_total", 'status="413"') == before + 2


def test_a_body_under_the_limit_is_served(server):
    prompt = "a " * 200
    resp = httpx.post(f"{server.url}/v1/completions", timeout=60,
                      json={"prompt": prompt, "max_tokens": 2, "padding": "x" * (LIMIT - 1000)})
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("path, body, param, where", [
    ("/v1/completions", {"prompt": "a " * 10_000}, "prompt", "the prompt is 20000 characters"),
    ("/v1/completions", {"prompt": ["a", "a " * 10_000]}, "prompt", "prompt[1] is 20000 characters"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a " * 10_000}]}, "messages",
     "the chat prompt is"),
])
def test_a_text_that_cannot_fit_the_context_is_refused_before_tokenizing(server, encode_calls, path, body,
                                                                         param, where):
    # The tiny tokenizer's longest token is 14 characters: 20000 characters are > 512 tokens for certain.
    resp = httpx.post(f"{server.url}{path}", json={**body, "max_tokens": 2}, timeout=60)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["code"] == "context_length_exceeded", error
    assert error["message"].startswith(where) and "context of 512 tokens" in error["message"], error
    assert encode_calls == []


def test_a_text_within_the_bound_is_tokenized_and_counted(server, encode_calls):
    # 2000 characters may fit 512 tokens, so it is tokenized; its ~1000 tokens do not fit.
    resp = httpx.post(f"{server.url}/v1/completions", json={"prompt": "a " * 1000, "max_tokens": 2}, timeout=60)
    assert resp.status_code == 400 and "context is 512 tokens" in resp.json()["error"]["message"]
    assert len(encode_calls) == 1


def test_tokenizing_runs_off_the_event_loop(server, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    encode = server.state.tokenizer.encode

    def slow_encode(texts):
        entered.set()
        release.wait(30)
        return encode(texts)

    monkeypatch.setattr(server.state.tokenizer, "encode", slow_encode)
    result = {}
    sender = threading.Thread(target=lambda: result.update(resp=httpx.post(
        f"{server.url}/v1/completions", json={"prompt": "held", "max_tokens": 2}, timeout=60)))
    sender.start()
    try:
        assert entered.wait(30)
        # While that request's text is being tokenized, the server answers others.
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        assert httpx.get(f"{server.url}/v1/models", timeout=10).status_code == 200
    finally:
        release.set()
        sender.join(60)
    assert result["resp"].status_code == 200


@pytest.mark.slow
def test_soak_many_clients_beside_one_posting_10_mb_bodies():
    """A few seconds by default; GPTJ_SOAK_SECONDS=60 runs the full soak (48 clients)."""
    seconds = float(os.environ.get("GPTJ_SOAK_SECONDS", "4"))
    clients = 48 if seconds >= 60 else 8
    assert bench_big_bodies.main(["--clients", str(clients), "--seconds", str(seconds)]) == 0
