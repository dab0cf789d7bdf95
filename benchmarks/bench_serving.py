"""Serving benchmark: many clients against run_server.py, in the manner of vLLM's serving benchmark.

Starts `run_server.py` in its own process (or uses --url), with random weights of the
bench-small shape (d 512, 8 layers, vocab 50400 with the GPT-2 tokenizer from
/work/shared/data when present, else the bundled tokenizer's 1024). Every request is a
streamed completion of a random prompt of --input-len token ids, generating exactly
--output-len tokens (greedy, ignore_eos). For each max concurrency (default 1, 4, 16, 64)
it reports:

    request throughput   = finished requests / wall time of the level
    output tokens/s      = sum of generated tokens / wall time of the level
    TTFT                 = arrival of the first text chunk - request sent   (mean, median, p99)
    TPOT                 = (end - first chunk) / (output tokens - 1), per request
    ITL                  = gaps between consecutive text chunks, over all requests

--request-rate R sends requests as a Poisson process of R per second (default: all at once,
limited only by the concurrency). --soak S runs S seconds (>= 120 for the real check) of a
mix of plain, streamed, cancelled-mid-stream and bad requests at random concurrency, and
checks that every request is answered with its expected status (none lost), that the
server's metrics agree, and that its memory (RSS) stays flat.

    python benchmarks/bench_serving.py                      # levels 1, 4, 16, 64
    python benchmarks/bench_serving.py --soak 150 --concurrency 16
    python benchmarks/bench_serving.py --quick              # tiny model, seconds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe  # noqa: E402

GPT2_TOKENIZER = Path("/work/shared/data/gpt2")


# ---- the server ----------------------------------------------------------------------------------


def start_server(args, extra=()) -> tuple[subprocess.Popen, str]:
    from gptj.serving.server import free_port

    port = free_port()
    command = [sys.executable, "run_server.py", "--port", str(port), "--log-level", "warning",
               "--max-batch-size", str(args.max_batch_size), "--max-queue", "1024",
               "--max-model-len", str(args.input_len + args.output_len + 8), "--threads", str(args.threads),
               "--precision", args.precision]
    if not args.quick:
        command += ["--set", "model.preset=bench-small"]
        if GPT2_TOKENIZER.is_dir():
            command += ["--tokenizer", str(GPT2_TOKENIZER)]
    command += list(extra)
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, wait_until_healthy(proc, f"http://127.0.0.1:{port}", 300)


def wait_until_healthy(proc: subprocess.Popen, url: str, seconds: float) -> str:
    """`url` once its /health answers 200; kills the server and raises with its stderr when it
    exits or `seconds` pass first."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


# ---- one streamed request --------------------------------------------------------------------------


async def stream_request(http, url, body, cancel_after_chunks: int | None = None) -> dict:
    """Send one streamed completion; chunk arrival times, tokens and status."""
    record = {"status": None, "chunks": [], "tokens": 0, "done": False, "error": None}
    start = time.perf_counter()
    record["start"] = start
    try:
        async with http.stream("POST", f"{url}/v1/completions", json=body) as resp:
            record["status"] = resp.status_code
            if resp.status_code != 200:
                record["body"] = json.loads(await resp.aread())
                return record
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    record["done"] = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    record["error"] = chunk["error"]
                    continue
                if chunk.get("usage"):
                    record["tokens"] = chunk["usage"]["completion_tokens"]
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    record["chunks"].append(time.perf_counter())
                    if cancel_after_chunks is not None and len(record["chunks"]) >= cancel_after_chunks:
                        record["cancelled"] = True
                        break  # leaving the block closes the connection
    except httpx.HTTPError as err:
        record["error"] = f"{type(err).__name__}: {err}"
    record["end"] = time.perf_counter()
    return record


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "median": None, "p99": None}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"mean": statistics.fmean(ordered), "median": statistics.median(ordered), "p99": p99}


async def run_level(url, concurrency, num_requests, args, rng, models=None) -> dict:
    """models: request i asks for models[i % len(models)] (None: the server's default)."""
    vocab = args.vocab
    bodies = [{"prompt": [rng.randrange(vocab) for _ in range(args.input_len)], "max_tokens": args.output_len,
               "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
              for _ in range(num_requests)]
    for i, body in enumerate(bodies if models else []):
        body["model"] = models[i % len(models)]
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    deadline = time.perf_counter() + args.level_seconds

    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        async def one(body, delay):
            await asyncio.sleep(delay)
            async with gate:
                if time.perf_counter() > deadline:
                    return None  # the level's time is up: not sent
                return await stream_request(http, url, body)

        delays, t = [], 0.0
        for _ in bodies:
            delays.append(t)
            if args.request_rate:
                t += rng.expovariate(args.request_rate)
        start = time.perf_counter()
        records = [r for r in await asyncio.gather(*(one(b, d) for b, d in zip(bodies, delays))) if r]
        wall = time.perf_counter() - start

    good = [r for r in records if r["status"] == 200 and r["done"] and not r["error"] and r["chunks"]]
    ttft = [r["chunks"][0] - r["start"] for r in good]
    tpot = [(r["end"] - r["chunks"][0]) / (r["tokens"] - 1) for r in good if r["tokens"] > 1]
    itl = [b - a for r in good for a, b in zip(r["chunks"], r["chunks"][1:])]
    tokens = sum(r["tokens"] for r in good)
    return {
        "concurrency": concurrency, "requests": len(records), "failed": len(records) - len(good),
        "seconds": wall, "request_throughput": len(good) / wall, "output_tokens_per_s": tokens / wall,
        "ttft_s": percentiles(ttft), "tpot_s": percentiles(tpot), "itl_s": percentiles(itl),
    }


# ---- soak ------------------------------------------------------------------------------------------

BAD_BODIES = [
    ({"prompt": "a", "temperature": -1}, 400),
    ({"prompt": "a", "top_p": 0}, 400),
    ({"prompt": ""}, 400),
    ({"prompt": [10 ** 9]}, 400),
    ({"prompt": "a", "max_tokens": 10 ** 6}, 400),
    ({"prompt": "a", "n": 1000}, 400),
    ({"prompt": "a", "model": "no-such-model"}, 404),
]


async def soak(url, pid, args, rng) -> dict:
    """Random mix for args.soak seconds; every request must end the way its kind says."""
    vocab = args.vocab
    outcome = {"plain": 0, "streamed": 0, "cancelled": 0, "bad": 0, "rejected_429": 0, "lost": 0}
    lost_examples = []
    memory = [(0.0, rss_mib(pid))]
    before = metrics(url)
    start = time.perf_counter()
    stop_at = start + args.soak
    limits = httpx.Limits(max_connections=128, max_keepalive_connections=64)

    def lose(kind, detail):
        outcome["lost"] += 1
        if len(lost_examples) < 5:
            lost_examples.append(f"{kind}: {detail}")

    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        async def client(worker: int):
            local = random.Random(rng.random() + worker)
            while time.perf_counter() < stop_at:
                kind = local.choices(["plain", "streamed", "cancelled", "bad"], [4, 4, 2, 1])[0]
                length = local.randrange(1, args.input_len + 1)
                body = {"prompt": [local.randrange(vocab) for _ in range(length)],
                        "max_tokens": local.randrange(1, args.output_len + 1), "ignore_eos": True,
                        "temperature": local.choice([0, 0.8]), "seed": local.randrange(100)}
                if kind == "bad":
                    bad, status = local.choice(BAD_BODIES)
                    resp = await http.post(f"{url}/v1/completions", json={**body, **bad})
                    if resp.status_code == status and "error" in resp.json():
                        outcome["bad"] += 1
                    else:
                        lose(kind, f"{resp.status_code} for {bad}")
                elif kind == "plain":
                    resp = await http.post(f"{url}/v1/completions", json=body)
                    if resp.status_code == 429:
                        outcome["rejected_429"] += 1
                    elif resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == body["max_tokens"]:
                        outcome["plain"] += 1
                    else:
                        lose(kind, f"{resp.status_code}: {resp.text[:200]}")
                else:
                    cancel = local.randrange(1, 4) if kind == "cancelled" else None
                    body.update(stream=True, stream_options={"include_usage": True}, max_tokens=args.output_len)
                    record = await stream_request(http, url, body, cancel)
                    if record["status"] == 429:
                        outcome["rejected_429"] += 1
                    elif record.get("cancelled"):
                        outcome["cancelled"] += 1
                    elif record["status"] == 200 and record["done"] and not record["error"] and (
                            record["tokens"] == body["max_tokens"]):
                        outcome["streamed"] += 1
                    else:
                        lose(kind, str({k: record.get(k) for k in ("status", "done", "error", "tokens")}))
                await asyncio.sleep(local.random() * 0.2)

        async def sample_memory():
            while time.perf_counter() < stop_at:
                await asyncio.sleep(5)
                memory.append((time.perf_counter() - start, rss_mib(pid)))

        workers = [client(i) for i in range(args.soak_clients)]
        await asyncio.gather(sample_memory(), *workers)

    # Drained: nothing may be left running or waiting.
    drained = False
    for _ in range(100):
        after = metrics(url)
        if after.get("gptj_requests_running", 1) == 0 and after.get("gptj_requests_waiting", 1) == 0:
            drained = True
            break
        await asyncio.sleep(0.1)
    memory.append((time.perf_counter() - start, rss_mib(pid)))
    counted_cancels = after.get("gptj_requests_cancelled_total", 0) - before.get("gptj_requests_cancelled_total", 0)
    warm = [m for t, m in memory if t >= 10] or [memory[-1][1]]
    return {
        "seconds": time.perf_counter() - start, "clients": args.soak_clients, "outcomes": outcome,
        "answered": sum(v for k, v in outcome.items() if k != "lost"), "lost": outcome["lost"],
        "lost_examples": lost_examples, "drained": drained,
        "server_cancels_counted": counted_cancels,
        "rss_mib": {"start": memory[0][1], "after_10s": warm[0], "max": max(m for _, m in memory),
                    "end": memory[-1][1]},
        "rss_growth_after_warmup_mib": memory[-1][1] - warm[0],
        "rss_series_mib": [[round(t), round(m)] for t, m in memory],
    }


# ---- report -----------------------------------------------------------------------------------------


def ms(value) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def table(levels: list[dict]) -> str:
    lines = ["| concurrency | requests | req/s | output tok/s | TTFT mean / median / p99 (ms) | "
             "TPOT mean / median / p99 (ms) | ITL mean / median / p99 (ms) |", "|---|---|---|---|---|---|---|"]
    for r in levels:
        cells = [" / ".join(ms(r[key][s]) for s in ("mean", "median", "p99")) for key in ("ttft_s", "tpot_s", "itl_s")]
        lines.append(f"| {r['concurrency']} | {r['requests']} ({r['failed']} failed) | {r['request_throughput']:.2f} | "
                     f"{r['output_tokens_per_s']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", help="a running server (default: start run_server.py with the bench-small shape)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=0, help="requests per level (default: max(8, 3 x concurrency))")
    p.add_argument("--request-rate", type=float, default=0.0, help="Poisson arrivals per second (0: all at once)")
    p.add_argument("--level-seconds", type=float, default=120.0, help="stop sending new requests of a level after this")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="server torch threads (1: steadiest on a busy machine)")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--soak", type=float, default=0.0, help="seconds of the mixed soak (0: none)")
    p.add_argument("--soak-clients", type=int, default=24)
    p.add_argument("--skip-levels", action="store_true", help="only the soak")
    p.add_argument("--quick", action="store_true", help="tiny model and short levels (a smoke run)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--adapters", type=int, default=0, metavar="K",
                   help="K LoRA adapters over one base against one merged model (benchmarks/bench_serving_adapters.py)")
    p.add_argument("--adapter-rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=1, help="with --adapters: both servers take turns R times, best counts")
    args = p.parse_args(argv)
    if args.quick:
        args.concurrency, args.input_len, args.output_len = [1, 4], 16, 16
        args.num_prompts = args.num_prompts or 4
    if args.adapters:
        return adapters_main(args)

    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args)
    try:
        load_before = os.getloadavg()
        models = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]
        args.vocab = 1000  # ids below every tokenizer's size used here (bundled: 1024)
        rng = random.Random(0)
        header = {"cpu": describe(), "model": models["id"], "max_model_len": models["max_model_len"],
                  "input_len": args.input_len, "output_len": args.output_len, "precision": args.precision,
                  "server_threads": args.threads, "max_batch_size": args.max_batch_size,
                  "request_rate": args.request_rate or "inf", "load_average_start": load_before}
        print(json.dumps(header), flush=True)
        asyncio.run(run_level(url, 2, 2, args, rng))  # warm-up
        levels = []
        if not args.skip_levels:
            for c in args.concurrency:
                result = asyncio.run(run_level(url, c, args.num_prompts or max(8, 3 * c), args, rng))
                result["load_average"] = os.getloadavg()
                levels.append(result)
                print(json.dumps(result), flush=True)
        summary = dict(header, levels=levels, load_average_end=os.getloadavg())
        by_c = {r["concurrency"]: r for r in levels}
        if 1 in by_c and 16 in by_c:
            summary["tokens_per_s_ratio_c16_c1"] = by_c[16]["output_tokens_per_s"] / by_c[1]["output_tokens_per_s"]
            ttft = by_c[16]["ttft_s"]
            summary["ttft_p99_over_median_c16"] = ttft["p99"] / ttft["median"] if ttft["median"] else None
        if args.soak:
            pid = proc.pid if proc is not None else None
            if pid is None:
                raise SystemExit("--soak measures the server's memory: let the benchmark start the server")
            summary["soak"] = asyncio.run(soak(url, pid, args, rng))
            summary["load_average_end"] = os.getloadavg()
        print()
        print(f"CPU: {header['cpu']} | load average start {load_before} end {summary['load_average_end']}")
        if levels:
            print(table(levels))
        for key in ("tokens_per_s_ratio_c16_c1", "ttft_p99_over_median_c16"):
            if summary.get(key) is not None:
                print(f"{key}: {summary[key]:.2f}")
        if "soak" in summary:
            print("soak: " + json.dumps(summary["soak"]))
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
        lost = summary.get("soak", {}).get("lost", 0)
        failed = sum(r["failed"] for r in levels)
        return 1 if lost or failed else 0
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)


def adapters_main(args) -> int:
    from benchmarks.bench_serving_adapters import report, run_adapters

    if args.url:
        raise SystemExit("--adapters starts its own servers: drop --url")
    if args.concurrency == [1, 4, 16, 64]:
        args.concurrency = [16]
    args.vocab, args.gpt2_tokenizer = 1000, GPT2_TOKENIZER
    load_before = os.getloadavg()
    result = run_adapters(args, start_server, run_level, rss_mib)
    result.update(cpu=describe(), precision=args.precision, input_len=args.input_len, output_len=args.output_len,
                  shape="tiny" if args.quick else "bench-small", load_average_start=load_before,
                  load_average_end=os.getloadavg())
    print()
    print(f"CPU: {result['cpu']} | load average start {load_before} end {result['load_average_end']}")
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
