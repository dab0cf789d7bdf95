"""What gptj-generate and gptj-serve print at start: one summary line, the full config only with
--show-config; and gptj-serve's --max-body-size, which the summary names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import gptj.commands.serve as serve_command
import gptj.serving.server as server_module
from gptj.serving.server import free_port
from tests.fixtures.cli import run_inference_main
from tests.fixtures.server import serving

ROOT = Path(__file__).resolve().parents[1]
NOTE = " (--show-config prints the full config)"


def start_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(("generate: ", "serve: ", "config: "))]


def test_gptj_generate_says_what_it_generates_in_one_line(capsys):
    code, out, err = run_inference_main(["--prompt", "a cat", "--prompt", "a dog", "--max-new-tokens", "3",
                                         "--precision", "fp32"], capsys)
    assert code == 0, err
    assert start_lines(out) == ["generate: 2 prompts with random:tiny, precision fp32; up to 3 new tokens each, "
                                "greedy, batches of 2" + NOTE]
    code, out, err = run_inference_main(["--prompt", "a cat", "--max-new-tokens", "2", "--temperature", "0.7",
                                         "--top-k", "5", "--seed", "3", "--stop", "\\n", "--batch-size", "4"], capsys)
    assert code == 0, err
    assert start_lines(out) == ["generate: 1 prompt with random:tiny, precision fp32; up to 2 new tokens each, "
                                "temperature 0.7, top-k 5, top-p 1, seed 3, stop at '\\n', batches of 1" + NOTE]


def test_gptj_generate_prints_the_full_config_only_when_asked(capsys):
    code, out, err = run_inference_main(["--prompt", "a cat", "--max-new-tokens", "2", "--show-config"], capsys)
    assert code == 0, err
    [line] = start_lines(out)
    config = json.loads(line.removeprefix("config: "))
    assert config["generation"]["max_new_tokens"] == 2 and config["prompts"] == ["a cat"]
    assert config["model"]["precision"] == "fp32"  # as resolved ("auto" chose it)


@pytest.fixture
def serve_calls(monkeypatch):
    """gptj-serve up to the point it would serve: serve()'s keyword arguments, for each call."""
    calls = []

    def serve(config, ctx=None, device=None, log_level="info", started=None, max_body_bytes=None):
        calls.append({"config": config, "max_body_bytes": max_body_bytes})
        return 0

    monkeypatch.setattr(server_module, "serve", serve)
    return calls


def test_gptj_serve_says_what_it_serves_in_one_line(serve_calls, capsys):
    assert serve_command.main(["--port", "0", "--max-body-size", "64K", "--request-timeout", "90",
                               "--served-model-name", "tiny-demo", "--api-key", "k"]) == 0
    out = capsys.readouterr().out
    assert start_lines(out) == ["serve: random:tiny as 'tiny-demo'; 16 requests at once, 256 waiting, request "
                                "timeout 90 s, bodies up to 64 KiB, API key required" + NOTE]
    assert serve_calls[-1]["max_body_bytes"] == 65536
    assert serve_command.main(["--port", "0"]) == 0
    assert start_lines(capsys.readouterr().out) == [
        "serve: random:tiny; 16 requests at once, 256 waiting, request timeout 600 s, bodies up to 4 MiB, "
        "no API key" + NOTE]
    assert serve_calls[-1]["max_body_bytes"] is None  # the server's own default


def test_gptj_serve_prints_the_full_config_only_when_asked(serve_calls, capsys):
    assert serve_command.main(["--port", "0", "--show-config", "--api-key", "secret"]) == 0
    [line] = start_lines(capsys.readouterr().out)
    config = json.loads(line.removeprefix("config: "))
    assert config["server"]["api_key"] == "***" and "secret" not in line
    assert config["model"]["precision"] == "fp32" and "prompts" not in config


@pytest.mark.parametrize("text, size", [("65536", 65536), ("64K", 65536), ("4M", 4 << 20), ("4MiB", 4 << 20),
                                        ("1g", 1 << 30), ("1.5K", 1536)])
def test_max_body_size_reads_bytes_and_binary_units(text, size):
    assert serve_command.parse_args(["--max-body-size", text]).max_body_size == size


@pytest.mark.parametrize("text, message", [("0", "must be more than 0 bytes, got '0'"),
                                           ("lots", "expected a size such as 65536, 512K or 4M, got 'lots'")])
def test_a_bad_max_body_size_is_one_line(text, message, capsys):
    with pytest.raises(SystemExit):
        serve_command.parse_args(["--max-body-size", text])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"argument --max-body-size: {message}")


def test_gptj_serve_refuses_bodies_over_max_body_size():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "run_server.py", "--port", str(port), "--log-level", "warning",
                             "--max-body-size", "64K"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"

    try:
        assert serving(proc, url)
        big = httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 1, "padding": "x" * 70_000},
                         timeout=60)
        assert big.status_code == 413 and "at most 65536 bytes" in big.json()["error"]["message"], big.text
        small = httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 1, "padding": "x" * 60_000},
                           timeout=60)
        assert small.status_code == 200, small.text
    finally:
        proc.kill()
        out, err = proc.communicate(timeout=60)
    assert "bodies up to 64 KiB" in out, (out, err)
