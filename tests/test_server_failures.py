"""The server when generation fails: a failing request is a 500 naming the cause, a dead
engine thread makes every route answer 503 with the reason, refused engine commands."""

from __future__ import annotations

import httpx
import pytest

from gptj.execution.inference.request_engine import Request
from gptj.serving.engine_loop import apply_commands
from tests.fixtures.server import tiny_server, wait_for

BODY = {"model": "random:tiny", "prompt": "a", "max_tokens": 4, "temperature": 0}


def test_a_failing_request_is_a_500_and_the_engine_goes_on():
    with tiny_server() as server:
        engine = server.state.loop.engine

        def broken(ids):
            raise RuntimeError("detokenizer broke")

        engine.decode = broken  # used for stop strings only
        resp = httpx.post(f"{server.url}/v1/completions", json={**BODY, "stop": ["x"]}, timeout=60)
        assert resp.status_code == 500, resp.text
        error = resp.json()["error"]
        assert error["code"] == "generation_failed" and "detokenizer broke" in error["message"]
        streamed = httpx.post(f"{server.url}/v1/completions", json={**BODY, "stop": ["x"], "stream": True},
                              timeout=60).text
        assert '"code":"generation_failed"' in streamed and streamed.endswith("data: [DONE]\n\n")
        ok = httpx.post(f"{server.url}/v1/completions", json=BODY, timeout=60)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread dies
def test_a_dead_engine_thread_fails_the_request_in_flight_and_503s_the_rest():
    with tiny_server() as server:
        loop = server.state.loop

        def dead_rank():
            raise RuntimeError("rank 1 is gone")

        loop.engine.step = dead_rank
        resp = httpx.post(f"{server.url}/v1/completions", json=BODY, timeout=60)
        assert resp.status_code == 500 and "the engine stopped" in resp.json()["error"]["message"]
        assert wait_for(lambda: not loop.alive)
        assert "rank 1 is gone" in loop.error
        later = httpx.post(f"{server.url}/v1/completions", json=BODY, timeout=60)
        assert later.status_code == 503
        assert later.json()["error"]["message"].startswith("the engine stopped:")
        assert "rank 1 is gone" in later.json()["error"]["message"]
        health = httpx.get(f"{server.url}/health", timeout=60)
        assert health.status_code == 503 and health.json() == {"status": "error"}


def test_refused_and_failed_commands_are_reported_to_their_callers():
    from gptj.execution.inference.request_engine import RequestEngine
    from tests.fixtures.generation import reference_pair

    engine = RequestEngine(reference_pair(seed=0)[1], max_batch_size=1, eos_token_id=None, max_length=16)
    too_long = Request("long", [1] * 14, 5).to_dict()
    fine = Request("fine", [1, 2], 3).to_dict()

    def failing_pipeline(pairs):
        raise ValueError(f"cannot score {len(pairs)} pairs")

    refused, results = apply_commands(engine, failing_pipeline, [
        ("add", too_long), ("add", fine), ("entail", "job-0", [["p", "h"]]), ("entail", "job-1", [["a", "b"]])])
    assert [(e.request_id, e.finish_reason) for e in refused] == [("long", "error")]
    assert "14 tokens and max_new_tokens is 5" in refused[0].error
    assert engine.num_waiting + engine.num_running == 1  # the fine request was added
    assert all(isinstance(results[job], ValueError) and "cannot score 2 pairs" in str(results[job])
               for job in ("job-0", "job-1"))  # both jobs scored in one batched call
    _, results = apply_commands(engine, None, [("cancel", "fine"), ("entail", "job-2", [["p", "h"]])])
    assert isinstance(results["job-2"], RuntimeError) and engine.num_waiting + engine.num_running == 0
    with pytest.raises(KeyError):
        results["job-0"]
