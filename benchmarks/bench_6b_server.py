"""The bench_6b `server-int4` row: run_server.py over the pre-quantized int4 checkpoint.

Measured from outside the server, as a client sees it: seconds from launch until GET /health
answers 200, the KV cache the server said it holds, one completion of N tokens (c1) and 16
concurrent ones (c16), output tokens/s each (every request generates exactly N tokens:
greedy, ignore_eos, checked against usage.completion_tokens), and the server's peak RSS
(VmHWM, read before it stops) beside what it should need: the weights on disk + the KV cache
those tokens use, in the dtype the server said it caches in + 1.5 GiB of runtime.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
RUNTIME_ALLOWANCE = 1.5 * GiB  # interpreter, torch, the HTTP stack, allocator slack
CONCURRENCY = 16


def weight_bytes(model_dir: str) -> int:
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


def kv_bytes(config: dict, rows: int, tokens: int, dtype: str) -> int:
    """K and V of every layer in `dtype` (the cache's, as the server printed it) for `rows`
    requests of `tokens` positions. A bf16 model on a CPU caches in fp32 (gptj/model/kv_cache.py)."""
    from gptj.execution.runtime.precision import parse_dtype
    from gptj.model.kv_cache import token_bytes

    return token_bytes(config["n_layer"], config["n_embd"], parse_dtype(dtype)) * rows * tokens


def vm_hwm(pid: int) -> int | None:
    """Peak resident bytes of a live process (Linux), or None."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"^VmHWM:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) * 1024 if found else None


def start(model_dir: str, threads: int, max_len: int, log: Path) -> tuple[subprocess.Popen, str, float]:
    """run_server.py in its own process; (process, url, seconds until /health said 200)."""
    import httpx

    from gptj.serving.server import free_port

    port = free_port()
    command = [sys.executable, "run_server.py", "--model", model_dir, "--port", str(port),
               "--threads", str(threads), "--max-batch-size", str(CONCURRENCY), "--max-model-len", str(max_len),
               "--request-timeout", "7200", "--log-level", "warning"]  # c16 on 6B takes minutes
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url, time.perf_counter() - started
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            lines = [line for line in log.read_text().splitlines() if line.strip()]
            raise RuntimeError(f"server exited ({proc.returncode}): {lines[-1] if lines else 'no output'}")
        time.sleep(0.25)


def complete(url: str, prompt: list[int], tokens: int) -> float:
    """One greedy completion of exactly `tokens` tokens; its wall seconds."""
    import httpx

    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    started = time.perf_counter()
    reply = httpx.post(f"{url}/v1/completions", json=body, timeout=3600)
    elapsed = time.perf_counter() - started
    reply.raise_for_status()
    made = reply.json()["usage"]["completion_tokens"]
    if made != tokens:
        raise RuntimeError(f"asked for {tokens} tokens, the server generated {made}")
    return elapsed


def kv_printed(log: Path) -> dict:
    """The rows x tokens of KV cache the server's startup lines say it holds."""
    text = log.read_text()
    out = {}
    ready = re.search(r"(\d+) rows x (\d+) tokens\s*$", text, re.MULTILINE)
    if ready:
        out["kv_rows"], out["kv_tokens"] = int(ready.group(1)), int(ready.group(2))
    fit = re.search(r"(\d+) rows at full length fit", text)
    if fit:
        out["kv_full_rows_fit"] = int(fit.group(1))
    line = next((line for line in text.splitlines() if line.startswith("KV cache")), None)
    if line:
        out["kv_line"] = line
    dtype = re.search(r"^KV cache \((\w+),", text, re.MULTILINE)
    if dtype:
        out["kv_dtype"] = dtype.group(1)
    return out


def measure_server(model_dir: str, shape: dict, threads: int, prompts: list[list[int]]) -> dict:
    """The row: startup, KV, c1 and c16 tokens/s, peak RSS against weights + KV + runtime."""
    import json
    import tempfile

    tokens = shape["server_tokens"]
    max_len = shape["prompt_tokens"] + tokens + 8
    config = json.loads((Path(model_dir) / "config.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        proc, url, ready_s = start(model_dir, threads, max_len, log)
        try:
            out = {"ready_s": ready_s, "server_tokens": tokens, **kv_printed(log)}
            complete(url, prompts[0], 2)  # the first request's one-off costs stay out of c1
            c1 = complete(url, prompts[0], tokens)
            out["c1_tok_s"] = tokens / c1
            started = time.perf_counter()
            with ThreadPoolExecutor(CONCURRENCY) as pool:
                list(pool.map(lambda p: complete(url, p, tokens), prompts[:CONCURRENCY]))
            out[f"c{CONCURRENCY}_tok_s"] = CONCURRENCY * tokens / (time.perf_counter() - started)
            out["c16_over_c1"] = out[f"c{CONCURRENCY}_tok_s"] / out["c1_tok_s"]
            out["server_peak_rss"] = vm_hwm(proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    out["weights_bytes"] = weight_bytes(model_dir)
    out["kv_needed_bytes"] = kv_bytes(config, CONCURRENCY, shape["prompt_tokens"] + tokens, out.get("kv_dtype", "bf16"))
    out["expected_rss"] = out["weights_bytes"] + out["kv_needed_bytes"] + RUNTIME_ALLOWANCE
    if out.get("server_peak_rss"):
        out["rss_over_expected"] = out["server_peak_rss"] / out["expected_rss"]
    return out


def server_line(row: dict) -> str:
    """The markdown row of the server table."""
    if "c1_tok_s" not in row:
        return f"| {row['row']} | {row.get('error', 'no result')} |||||||"
    rss = row.get("server_peak_rss") or 0
    return (f"| {row['row']} | {row['ready_s']:.1f} | {row.get('kv_rows', '?')} x {row.get('kv_tokens', '?')} "
            f"| {row['c1_tok_s']:.2f} | {row['c16_tok_s']:.2f} | {row['c16_over_c1']:.1f}x "
            f"| {rss / GiB:.2f} | {row['expected_rss'] / GiB:.2f} (weights {row['weights_bytes'] / GiB:.2f} + KV "
            f"{row['kv_needed_bytes'] / GiB:.2f} in {row.get('kv_dtype', 'bf16')} + 1.5) |")


SERVER_HEADER = ["| row | ready s | KV rows x tokens | c1 tok/s | c16 tok/s | c16 / c1 | peak RSS GiB "
                 "| expected GiB |", "|---|---|---|---|---|---|---|---|"]
