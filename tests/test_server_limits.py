"""Server limits on a one-row server: API key (401), backpressure (429), timeouts; the command line."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

import gptj.commands.serve as run_server
from tests.fixtures.server import metric, tiny_server, wait_for

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-key"


@pytest.fixture(scope="module")
def server():
    with tiny_server("--max-batch-size", "1", "--max-queue", "1", "--api-key", KEY,
                     "--served-model-name", "tiny-test") as s:
        yield s


def headers(key=KEY):
    return {"Authorization": f"Bearer {key}"}


def test_the_api_key_is_required_when_set(server):
    good = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    assert good.completions.create(model="tiny-test", prompt="a", max_tokens=2).usage.completion_tokens >= 1
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        bad.completions.create(model="tiny-test", prompt="a", max_tokens=2)
    resp = httpx.get(f"{server.url}/v1/models")
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health").status_code == 200  # health and metrics stay open
    assert metric(server.url, "gptj_requests_rejected_total", 'status="401"') == 2
    with pytest.raises(openai.NotFoundError):  # the served name replaces the model's
        good.completions.create(model="random:tiny", prompt="a", max_tokens=2)


def test_beyond_the_queue_limit_requests_get_429_with_retry_after(server):
    """One row + one waiting place: with one request running, of 5 more sent at once one waits
    and is served, the others are refused (two may be served if the first ends meanwhile)."""
    async def run():
        async with httpx.AsyncClient(timeout=120, headers=headers()) as http:
            body = {"model": "tiny-test", "prompt": "a", "max_tokens": 200}
            first = asyncio.create_task(http.post(f"{server.url}/v1/completions", json=body))
            while metric(server.url, "gptj_requests_running") < 1:
                await asyncio.sleep(0.01)
            rest = await asyncio.gather(*(http.post(f"{server.url}/v1/completions", json=body) for _ in range(5)))
            return [await first, *rest]

    responses = asyncio.run(run())
    statuses = [r.status_code for r in responses]
    assert statuses[0] == 200 and set(statuses) == {200, 429}, statuses
    assert statuses[1:].count(200) in (1, 2) and statuses[1:].count(429) >= 3, statuses
    refused = [r for r in responses if r.status_code == 429]
    assert all(r.headers["retry-after"] == "1" for r in refused)
    assert refused[0].json()["error"]["type"] == "rate_limit_error"
    assert metric(server.url, "gptj_requests_rejected_total", 'status="429"') == len(refused)
    # Once the queue drains, requests are served again.
    assert wait_for(lambda: metric(server.url, "gptj_requests_running") == 0)
    ok = httpx.post(f"{server.url}/v1/completions", headers=headers(), timeout=60,
                    json={"model": "tiny-test", "prompt": "a", "max_tokens": 2})
    assert ok.status_code == 200


def test_a_request_past_its_timeout_is_cancelled_with_504(server):
    settings = server.config.server
    settings.request_timeout = 0.05  # a 500-token request cannot finish in 50 ms
    try:
        cancelled = metric(server.url, "gptj_requests_cancelled_total")
        body = {"model": "tiny-test", "prompt": "a", "max_tokens": 500}
        resp = httpx.post(f"{server.url}/v1/completions", headers=headers(), json=body, timeout=60)
        assert resp.status_code == 504 and "timeout of 0.05 s" in resp.json()["error"]["message"]
        streamed = httpx.post(f"{server.url}/v1/completions", headers=headers(), timeout=60,
                              json={**body, "stream": True}).text
        assert '"code":"timeout"' in streamed and streamed.endswith("data: [DONE]\n\n")
        assert wait_for(lambda: metric(server.url, "gptj_requests_cancelled_total") == cancelled + 2)
    finally:
        settings.request_timeout = 600.0
    ok = httpx.post(f"{server.url}/v1/completions", headers=headers(), timeout=60,
                    json={"model": "tiny-test", "prompt": "a", "max_tokens": 2})
    assert ok.status_code == 200


@pytest.mark.parametrize("argv, message", [
    (["--config", "nope"], "unknown preset 'nope'"),
    (["--tensor-parallel", "2"], "torchrun --nproc-per-node 2"),
    (["--max-batch-size", "0"], "server.max_batch_size must be >= 1"),
    (["--model", "/no/such/dir", "--port", "0"], "does not exist"),
    (["--quantize", "int8", "--offload-weights"], "model.quantize and model.offload_weights cannot be combined"),
    (["--memory-utilization", "1.5"], "server.memory_utilization must be in (0, 1], got 1.5"),
    # random:tiny keeps 2 x 2 layers x 128 wide x 4 B = 2 KiB a token: 512 tokens (1 MiB) never fit in a billionth.
    (["--memory-utilization", "1e-9", "--port", "0"], "KV cache: one row of 512 tokens needs 1.00 MiB but"),
])
def test_bad_command_lines_are_one_line_and_exit_2(argv, message, capsys):
    assert run_server.main(["--log-level", "warning", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.strip().count("\n") == 0 and message in err, err


def test_the_script_itself_exits_2_on_a_bad_preset():
    proc = subprocess.run([sys.executable, "run_server.py", "--config", "nope"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == proc.stderr.strip().splitlines()[0]
    assert "unknown preset 'nope'" in proc.stderr


def test_health_and_routes_say_503_until_the_model_has_loaded():
    from fastapi.testclient import TestClient

    from gptj.serving.app import ServerState, create_app
    from tests.fixtures.server import tiny_config

    state = ServerState(tiny_config(), "random:tiny")
    client = TestClient(create_app(state))  # no lifespan: nothing loads
    assert client.get("/health").status_code == 503 and client.get("/health").json() == {"status": "loading"}
    resp = client.post("/v1/completions", json={"prompt": "a"})
    assert resp.status_code == 503 and resp.json()["error"]["message"] == "the model is loading"
    assert resp.headers["retry-after"] == "5"
    state.load_error = "checkpoint directory /x does not exist"
    assert client.get("/health").json() == {"status": "error"}
    assert "failed to load: checkpoint directory /x" in client.get("/v1/models").json()["error"]["message"]
