"""What the machine-dependent defaults are based on: threads x precision per model size.

For the `tiny` and `bench-small` shapes, each combination of thread count (1 .. physical cores)
and precision (fp32, bf16, and fp16 with --fp16) is timed on
    train: one forward + backward + SGD-free step (loss.backward) on [batch, seq] random tokens
    decode: greedy decode tokens/s at batch 1 and 16 (prompt 16 tokens, 32 new tokens)
Best of 3 after a warm-up. Each combination runs in a fresh process with a time limit and is
reported as "timed out after N s" instead of holding up the rest (bf16 on a CPU without native
bf16, and fp16 on any CPU, run matmuls ~35x slower than fp32).

    python -m benchmarks.bench_defaults [--fp16] [--limit SECONDS] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from gptj.execution.runtime.hardware import detect
from gptj.model import GPTJ, ModelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = {"tiny": (32, 32), "bench-small": (8, 128)}  # (train batch, seq)


def _timed(fn, repeats: int = 3) -> float:
    """Best seconds of `fn` after a warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(shape: str, precision: str, threads: int) -> dict:
    """One combination, in this process."""
    from gptj.execution.inference.generation import GenerationEngine

    torch.set_num_threads(threads)
    config = ModelConfig.preset(shape)
    model = GPTJ(config, dtype=DTYPES[precision]).init_weights(seed=0)
    batch, seq = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=gen)

    def train_step():
        model.zero_grad(set_to_none=True)
        model.loss(rows[:, :-1], rows[:, 1:]).backward()

    model.train()
    out = {"shape": shape, "precision": precision, "threads": threads,
           "train_tokens_per_s": batch * seq / _timed(train_step)}
    model.eval()
    model.zero_grad(set_to_none=True)
    engine = GenerationEngine(model)
    for rows_n in (1, 16):
        prompts = torch.randint(0, config.vocab_size, (rows_n, 16), generator=gen).tolist()
        seconds = _timed(lambda p=prompts: engine.run(p, 32, None))
        out[f"decode_b{rows_n}_tokens_per_s"] = rows_n * 32 / seconds
    out["load_average"] = os.getloadavg()[0]
    return out


def measure_in_subprocess(shape: str, precision: str, threads: int, limit_s: float) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_defaults", "--worker", shape, precision, str(threads)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    timed_out = {"shape": shape, "precision": precision, "threads": threads,
                 "error": f"timed out after {limit_s:.0f} s", "load_average": os.getloadavg()[0]}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit_s, cwd=root)
    except subprocess.TimeoutExpired:
        return timed_out
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        return {**timed_out, "error": f"exit {done.returncode}: {tail}"}
    return json.loads(lines[-1])


def _line(r: dict) -> str:
    head = f"{r['shape']:12s} {r['precision']:5s} threads {r['threads']}: "
    if "error" in r:
        return head + r["error"]
    return (head + f"train {r['train_tokens_per_s']:8.0f} tok/s, decode b1 {r['decode_b1_tokens_per_s']:8.0f} "
            f"tok/s, b16 {r['decode_b16_tokens_per_s']:8.0f} tok/s (load {r['load_average']:.1f})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp16", action="store_true", help="also time fp16 (slow on CPUs)")
    parser.add_argument("--limit", type=float, default=120.0, help="seconds per combination")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", nargs=3, metavar=("SHAPE", "PRECISION", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        shape, precision, threads = args.worker
        print(json.dumps(measure(shape, precision, int(threads))))
        return
    hw = detect()
    print(f"# {hw.summary()}")
    precisions = ["fp32", "bf16"] + (["fp16"] if args.fp16 else [])
    results = []
    for shape in SHAPES:
        for precision in precisions:
            for threads in range(1, hw.physical_cores + 1):
                results.append(measure_in_subprocess(shape, precision, threads, args.limit))
                print(_line(results[-1]), flush=True)
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
