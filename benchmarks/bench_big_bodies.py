"""Soak: many clients with ordinary requests beside one client posting oversized bodies.

Starts run_server.py (the tiny preset) in its own process on 127.0.0.1 and runs, for --seconds:

    --clients clients   each posting small completions back to back (every one must be a 200)
    one client          posting --big-mb MB completion bodies, alternately with a Content-Length
                        and chunked (every one must be refused with a 413, unread)

It reports the server's resident memory (RSS) at the start, its peak (sampled every 0.25 s) and
at the end, the requests answered and lost, and the slowest /health answer during the soak. The
check: no well-formed request lost, every big body a 413, RSS at the end within --rss-slack-mib of
the start.

    python benchmarks/bench_big_bodies.py                            # 48 clients, 60 s, 10 MB bodies
    python benchmarks/bench_big_bodies.py --clients 8 --seconds 3    # a smoke run (tests/)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_serving import rss_mib, wait_until_healthy  # noqa: E402


def start_server(max_batch_size: int) -> tuple[subprocess.Popen, str]:
    from gptj.serving.server import free_port

    port = free_port()
    command = [sys.executable, "run_server.py", "--port", str(port), "--log-level", "warning", "--threads", "1",
               "--max-batch-size", str(max_batch_size), "--max-queue", "1024"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, wait_until_healthy(proc, f"http://127.0.0.1:{port}", 300)


def big_body(megabytes: float) -> bytes:
    # The shape that held 20 GB before bodies were limited: one long text prompt.
    words = int(megabytes * 1_000_000) // 2
    return b'{"prompt": "' + b"a " * words + b'", "max_tokens": 1}'


async def soak(url: str, pid: int, clients: int, seconds: float, big_mb: float) -> dict:
    outcome = {"answered": 0, "lost": 0, "big_refused": 0, "big_not_refused": 0}
    lost_examples: list[str] = []
    body = big_body(big_mb)
    memory = [rss_mib(pid)]
    slowest_health = 0.0
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)

    def lose(detail: str) -> None:
        outcome["lost"] += 1
        if len(lost_examples) < 5:
            lost_examples.append(detail)

    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        async def client(worker: int):
            request = {"prompt": f"client {worker} says", "max_tokens": 4, "ignore_eos": True, "temperature": 0}
            while time.monotonic() < stop_at:
                try:
                    resp = await http.post(f"{url}/v1/completions", json=request)
                except httpx.HTTPError as err:
                    lose(f"{type(err).__name__}: {err}")
                    continue
                if resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 4:
                    outcome["answered"] += 1
                else:
                    lose(f"{resp.status_code}: {resp.text[:200]}")

        async def big_client():
            chunked = False
            # Its own connections: the server closes each after refusing an unread body.
            async with httpx.AsyncClient(timeout=120) as own:
                while time.monotonic() < stop_at:
                    if chunked:
                        async def parts():
                            for start in range(0, len(body), 1 << 20):
                                yield body[start:start + (1 << 20)]
                        content = parts()
                    else:
                        content = body
                    try:
                        resp = await own.post(f"{url}/v1/completions", content=content,
                                              headers={"content-type": "application/json"})
                        refused = resp.status_code == 413 and "error" in resp.json()
                    except httpx.HTTPError:  # the connection closed before the answer was read
                        refused = False
                    outcome["big_refused" if refused else "big_not_refused"] += 1
                    chunked = not chunked

        async def watch():
            nonlocal slowest_health
            while time.monotonic() < stop_at:
                began = time.monotonic()
                await http.get(f"{url}/health")
                slowest_health = max(slowest_health, time.monotonic() - began)
                memory.append(rss_mib(pid))
                await asyncio.sleep(0.25)

        await asyncio.gather(watch(), big_client(), *(client(i) for i in range(clients)))
    await asyncio.sleep(1.0)  # what is freed at the end is freed now
    memory.append(rss_mib(pid))
    return {"clients": clients, "seconds": seconds, "big_body_mb": big_mb, **outcome,
            "lost_examples": lost_examples, "slowest_health_s": round(slowest_health, 3),
            "rss_mib": {"start": round(memory[0]), "peak": round(max(memory)), "end": round(memory[-1])}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=48)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--big-mb", type=float, default=10.0)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--rss-slack-mib", type=float, default=200.0)
    p.add_argument("--json", metavar="FILE", help="write the result as JSON")
    args = p.parse_args(argv)
    proc, url = start_server(args.max_batch_size)
    try:
        # Warm up (first requests allocate the KV cache and the tokenizer's buffers) before the start RSS.
        for _ in range(3):
            httpx.post(f"{url}/v1/completions", json={"prompt": "warm up", "max_tokens": 4}, timeout=60)
        result = asyncio.run(soak(url, proc.pid, args.clients, args.seconds, args.big_mb))
    finally:
        proc.terminate()
        proc.wait(30)
    rss = result["rss_mib"]
    result["ok"] = (result["lost"] == 0 and result["big_not_refused"] == 0 and result["big_refused"] > 0
                    and rss["end"] - rss["start"] <= args.rss_slack_mib)
    print(json.dumps(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
