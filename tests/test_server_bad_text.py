"""Text that cannot be encoded is a 400 naming its field, and an unexpected error is a JSON 500;
either way the keep-alive connection and the server go on serving the next request."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import pytest

from tests.fixtures.server import tiny_server

GOOD = {"prompt": "hello", "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def server():
    with tiny_server() as s:
        yield s


def post(connection, path: str, raw_json: str):
    connection.request("POST", path, body=raw_json.encode(), headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, json.loads(response.read())


@pytest.mark.parametrize("path, raw_json, field", [
    ("/v1/completions", '{"prompt": "\\ud800 x", "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"prompt": ["ok", "\\udc00"], "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"prompt": "x", "stop": ["\\ud800"], "max_tokens": 2}', "stop"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content"),
])
def test_a_lone_surrogate_is_a_400_and_the_connection_serves_the_next_request(server, path, raw_json, field):
    connection = http.client.HTTPConnection(urlsplit(server.url).netloc, timeout=60)
    try:
        status, body = post(connection, path, raw_json)
        assert status == 400
        assert body["error"]["param"] == field and "not valid Unicode" in body["error"]["message"]
        status, body = post(connection, "/v1/completions", json.dumps(GOOD))  # same socket
        assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        connection.close()


class BrokenTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, texts):
        raise RuntimeError("tokenizer exploded")

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_an_unexpected_error_is_a_json_500_and_the_connection_serves_the_next_request(server):
    connection = http.client.HTTPConnection(urlsplit(server.url).netloc, timeout=60)
    tokenizer = server.state.tokenizer
    try:
        server.state.tokenizer = BrokenTokenizer(tokenizer)
        status, body = post(connection, "/v1/completions", json.dumps(GOOD))
        assert status == 500
        assert body["error"]["type"] == "internal_error" and "tokenizer exploded" in body["error"]["message"]
        server.state.tokenizer = tokenizer
        status, body = post(connection, "/v1/completions", json.dumps(GOOD))  # same socket
        assert status == 200 and body["usage"]["completion_tokens"] >= 1
    finally:
        server.state.tokenizer = tokenizer
        connection.close()
