"""Request fields are read as sent: a NaN or infinite float, a field of the wrong JSON type, or an
OpenAI field the server does not implement is a 400 naming the field, never ignored or coerced."""

from __future__ import annotations

import httpx
import pytest

from tests.fixtures.server import tiny_server

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server():
    with tiny_server() as s:
        yield s


def post(server, path: str, raw: str) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", content=raw.encode(), timeout=60,
                      headers={"content-type": "application/json"})


@pytest.mark.parametrize("path, base", [
    ("/v1/completions", '"prompt": "a", "max_tokens": 2'),
    ("/v1/chat/completions", '"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2'),
])
@pytest.mark.parametrize("field, value", [
    ("temperature", "NaN"), ("temperature", "Infinity"), ("temperature", "-Infinity"),
    ("top_p", "NaN"), ("top_p", "Infinity"),
])
def test_a_float_that_is_not_finite_is_a_400_naming_the_field(server, path, base, field, value):
    # Python's json (which the server parses with) reads NaN and Infinity as floats.
    resp = post(server, path, f'{{{base}, "{field}": {value}}}')
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == field and "finite" in error["message"], error


@pytest.mark.parametrize("path, base", [
    ("/v1/completions", {"prompt": "a"}),
    ("/v1/chat/completions", {"messages": CHAT}),
])
@pytest.mark.parametrize("field, value", [
    ("max_tokens", "3"), ("max_tokens", True), ("max_tokens", 3.0), ("n", "1"), ("seed", "7"),
    ("temperature", "0.5"), ("stream", 1), ("stream", "true"), ("ignore_eos", "yes"),
])
def test_a_field_of_the_wrong_json_type_is_a_400_not_coerced(server, path, base, field, value):
    resp = httpx.post(f"{server.url}{path}", json={**base, field: value}, timeout=60)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == field


@pytest.mark.parametrize("path, base", [
    ("/v1/completions", {"prompt": "a", "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2}),
])
@pytest.mark.parametrize("field, value", [
    ("presence_penalty", 0.5), ("frequency_penalty", -1), ("logit_bias", {"50": 100}),
    ("response_format", {"type": "json_object"}), ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("tool_choice", "required"), ("suffix", "end"), ("best_of", 3),
])
def test_an_unsupported_openai_field_is_a_400_naming_it(server, path, base, field, value):
    resp = httpx.post(f"{server.url}{path}", json={**base, field: value}, timeout=60)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == field and "not supported" in error["message"], error


@pytest.mark.parametrize("field, value", [
    ("presence_penalty", 0), ("frequency_penalty", 0.0), ("logit_bias", {}), ("tools", []),
    ("tool_choice", "none"), ("response_format", {"type": "text"}), ("best_of", 1), ("user", "someone"),
])
def test_neutral_values_and_fields_openai_does_not_define_are_accepted(server, field, value):
    plain = httpx.post(f"{server.url}/v1/completions", timeout=60,
                       json={"prompt": "a", "max_tokens": 3, "temperature": 0})
    resp = httpx.post(f"{server.url}/v1/completions", timeout=60,
                      json={"prompt": "a", "max_tokens": 3, "temperature": 0, field: value})
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]
    # Well-typed values are still taken: an integer temperature is a float.
    assert httpx.post(f"{server.url}/v1/completions", timeout=60,
                      json={"prompt": "a", "max_tokens": 3, "temperature": 1}).status_code == 200
