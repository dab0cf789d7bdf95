"""A tiny-model server in a thread of the test process, on 127.0.0.1 and a free port."""

from __future__ import annotations

import contextlib
import time

import httpx

import run_server
from serving.server import ServerThread


def tiny_config(*argv: str):
    """run_server.py's config for `argv` (the tiny preset), on a free port."""
    return run_server.build_config(run_server.parse_args(["--port", "0", *argv]))


@contextlib.contextmanager
def tiny_server(*argv: str):
    with ServerThread(tiny_config(*argv)) as server:
        yield server


def metric(url: str, name: str, labels: str = "") -> float:
    """One sample of /metrics (0 when absent)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0


def wait_for(condition, timeout: float = 30.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()
