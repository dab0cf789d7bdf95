"""Stopping a server with requests in flight: the first Ctrl-C says how many and how long at
most (the request timeout) and lets them finish; a second one stops at once and says what it cut.
The server of gptj-serve does so (a real server process, its streams slowed to last seconds)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from gptj.serving.server import build_app, free_port, uvicorn_server
from tests.fixtures.server import serving, tiny_config, wait_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def server():
    config = tiny_config("--request-timeout", "40", "--max-batch-size", "2")
    config.server.port = free_port()
    app, state = build_app(config)
    server = uvicorn_server(app, "127.0.0.1", config.server.port, state=state)  # the server gptj-serve runs
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


# gptj-serve with each engine step slowed by 20 ms: a 150-token stream lasts about 3 s, long
# enough to press Ctrl-C during it. Everything else is the command as it runs.
SLOW_SERVE = """
import sys, time
from gptj.execution.inference.request_engine import RequestEngine
step = RequestEngine.step
def slow_step(self):
    time.sleep(0.02)
    return step(self)
RequestEngine.step = slow_step
from gptj.commands.serve import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def serve_process():
    """gptj-serve (slowed) on a free port, serving once /health answers: (process, url, stderr lines)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SERVE, "--port", str(port), "--log-level", "warning",
                             "--request-timeout", "45", "--max-batch-size", "8"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    stderr: list[str] = []

    def read():  # line by line, so a test sees each line as it comes
        for line in proc.stderr:
            stderr.append(line)

    threading.Thread(target=read, daemon=True).start()
    url = f"http://127.0.0.1:{port}"

    try:
        assert serving(proc, url), "".join(stderr)
        yield proc, url, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_gptj_serve_drains_8_streams_at_the_first_ctrl_c(serve_process):
    proc, url, stderr = serve_process
    streams = [stream_in_background(url, 150) for _ in range(8)]
    assert wait_for(lambda: all(s["chunks"] for s in streams), 60)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0, "".join(stderr)
    for s in streams:
        s["thread"].join(30)
        assert s["done"] and s["tokens"] == 150 and "error" not in s, s
    assert wait_for(lambda: stderr and stderr[-1].startswith("stopping:"), 5)
    assert [line.rstrip("\n") for line in stderr] == [
        "stopping: waiting for 8 requests in flight to finish, at most 45 s (the request timeout); "
        "Ctrl-C again stops now"]


def test_gptj_serve_stops_at_once_at_a_second_ctrl_c(serve_process):
    proc, url, stderr = serve_process
    streams = [stream_in_background(url, 480) for _ in range(8)]  # about 10 s each
    assert wait_for(lambda: all(s["chunks"] for s in streams), 60)
    proc.send_signal(signal.SIGINT)
    assert wait_for(lambda: any(line.startswith("stopping: waiting for 8 requests") for line in stderr), 10)
    began = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0, "".join(stderr)
    assert time.monotonic() - began < 5  # not the streams' remaining seconds
    for s in streams:
        s["thread"].join(30)
        assert not s["done"], s
    assert wait_for(lambda: len(stderr) >= 2, 5)
    assert [line.rstrip("\n") for line in stderr][1:] == ["stopping now: 8 request(s) cut off"]
