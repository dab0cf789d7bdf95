"""Stopping a server with requests in flight: the first Ctrl-C says how many and how long at
most (the request timeout) and lets them finish; a second one stops at once and says what it cut."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
import uvicorn

from gptj.serving.drain import DrainOnExit
from gptj.serving.server import build_app, free_port
from tests.fixtures.server import tiny_config, wait_for


class DrainingServer(DrainOnExit, uvicorn.Server):
    pass


@pytest.fixture
def server():
    config = tiny_config("--request-timeout", "40", "--max-batch-size", "2")
    config.server.port = free_port()
    app, state = build_app(config)
    server = DrainingServer(uvicorn.Config(app, host="127.0.0.1", port=config.server.port, log_level="warning"))
    server.drain_state = state
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_for(lambda: state.ready and server.started, 120)
    step = state.loop.engine.step

    def slow_step():  # about 100 tokens a second: a stream lasts long enough to stop the server during it
        time.sleep(0.01)
        return step()

    state.loop.engine.step = slow_step
    server.url = f"http://127.0.0.1:{config.server.port}"
    yield server, state
    server.force_exit = server.should_exit = True
    thread.join(30)


def stream_in_background(url: str, max_tokens: int) -> dict:
    """A streamed completion read in a thread: result["chunks"], result["done"] ([DONE] seen)."""
    result = {"chunks": 0, "done": False, "tokens": None}

    def read():
        body = {"prompt": "a", "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as resp:
                for line in resp.iter_lines():
                    result["chunks"] += line.startswith("data: {")
                    result["done"] |= line == "data: [DONE]"
                    if line.startswith("data: {") and json.loads(line[6:]).get("usage"):
                        result["tokens"] = json.loads(line[6:])["usage"]["completion_tokens"]
        except httpx.HTTPError as err:
            result["error"] = err

    result["thread"] = threading.Thread(target=read)
    result["thread"].start()
    return result


def test_the_first_ctrl_c_names_the_requests_and_the_longest_wait_and_lets_them_finish(server, capsys):
    server, state = server
    streams = [stream_in_background(server.url, 200) for _ in range(2)]
    assert wait_for(lambda: state.loop.in_flight == 2 and all(s["chunks"] for s in streams))
    server.handle_exit(signal.SIGINT, None)
    assert capsys.readouterr().err.strip() == ("stopping: waiting for 2 requests in flight to finish, at most 40 s "
                                               "(the request timeout); Ctrl-C again stops now")
    assert server.config.timeout_graceful_shutdown == 40
    for s in streams:
        s["thread"].join(60)
        assert s["done"] and s["tokens"] == 200 and "error" not in s, s


def test_a_second_ctrl_c_stops_at_once(server, capsys):
    server, state = server
    stream = stream_in_background(server.url, 500)
    assert wait_for(lambda: state.loop.in_flight == 1 and stream["chunks"])
    server.handle_exit(signal.SIGINT, None)
    server.handle_exit(signal.SIGINT, None)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("stopping: waiting for 1 request in flight") and lines[1] == \
        "stopping now: 1 request(s) cut off"
    began = time.monotonic()
    stream["thread"].join(60)
    assert not stream["done"] and time.monotonic() - began < 20
