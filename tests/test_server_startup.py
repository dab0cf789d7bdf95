"""run_server.py's start: a bad model path or a busy port is one line and exit 2 before any model
is loaded; "serving on URL" appears only once that URL answers."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def start(*argv):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "run_server.py", "--log-level", "warning", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=env)


def test_a_missing_model_path_is_one_line_before_serving(tmp_path):
    proc = start("--model", str(tmp_path / "no-such-model"), "--port", "0")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "no-such-model: model directory does not exist" in proc.stderr
    assert "serving on" not in proc.stdout


def test_a_missing_adapter_is_one_line_before_serving(tmp_path):
    proc = start("--adapter", f"qa={tmp_path / 'no-adapter'}", "--port", "0")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "no-adapter: adapter directory does not exist" in proc.stderr
    assert "serving on" not in proc.stdout


def test_a_busy_port_is_one_line_naming_it_and_loads_nothing():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = start("--port", str(port))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "ready:" not in proc.stdout and "serving on" not in proc.stdout  # the model was never loaded


def test_serving_on_names_the_bound_port_and_it_answers():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "run_server.py", "--port", "0", "--log-level", "warning"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving on"):
                break
        match = re.fullmatch(r"serving on http://127\.0\.0\.1:(\d+)/v1\n", lines[-1])
        assert match and int(match[1]) != 0, lines
        # Answered at once (503 while the model loads, 200 once it has).
        assert httpx.get(f"http://127.0.0.1:{match[1]}/health", timeout=30).status_code in (200, 503)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
