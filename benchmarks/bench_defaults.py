"""What the machine-dependent defaults are based on: threads x precision per model size.

For the `tiny` and `bench-small` shapes, each combination of thread count (1 .. physical cores)
and precision (fp32, bf16, and fp16 with --fp16) is timed on
    train: one forward + backward + SGD-free step (loss.backward) on [batch, seq] random tokens
    decode: greedy decode tokens/s at batch 1 and 16 (prompt 16 tokens, 32 new tokens)
Best of a few repeats; each measurement has a time limit and reports "timed out after N s"
instead of hanging (bf16 on a CPU without native bf16 can be 100x slower than fp32).

    python -m benchmarks.bench_defaults [--fp16] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from execution.hardware import detect
from gptj import GPTJ, ModelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = {"tiny": (32, 32), "bench-small": (8, 128)}  # (train batch, seq)


def _timed(fn, repeats: int, limit_s: float) -> float | str:
    """Best seconds of `fn` after a warm-up, or "timed out after N s" when the warm-up alone
    exceeds the limit (the next calls would too)."""
    start = time.perf_counter()
    fn()
    if time.perf_counter() - start > limit_s:
        return f"timed out after {limit_s:.0f} s"
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(shape: str, precision: str, threads: int, limit_s: float) -> dict:
    from execution.generation import GenerationEngine

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
    step = _timed(train_step, 3, limit_s)
    out = {"shape": shape, "precision": precision, "threads": threads,
           "train_tokens_per_s": batch * seq / step if isinstance(step, float) else step}
    model.eval()
    model.zero_grad(set_to_none=True)
    engine = GenerationEngine(model)
    for rows_n in (1, 16):
        prompts = torch.randint(0, config.vocab_size, (rows_n, 16), generator=gen).tolist()
        seconds = _timed(lambda p=prompts: engine.run(p, 32, None), 3, limit_s)
        out[f"decode_b{rows_n}_tokens_per_s"] = (
            rows_n * 32 / seconds if isinstance(seconds, float) else seconds)
    out["load_average"] = os.getloadavg()[0]
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp16", action="store_true", help="also time fp16 (slow on CPUs)")
    parser.add_argument("--limit", type=float, default=60.0, help="seconds per measurement")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    hw = detect()
    print(f"# {hw.summary()}")
    precisions = ["fp32", "bf16"] + (["fp16"] if args.fp16 else [])
    results = []
    for shape in SHAPES:
        for precision in precisions:
            for threads in range(1, hw.physical_cores + 1):
                r = measure(shape, precision, threads, args.limit)
                results.append(r)
                cells = [f"{r[k]:8.0f}" if isinstance(r[k], float) else f"{r[k]:>8s}"
                         for k in ("train_tokens_per_s", "decode_b1_tokens_per_s", "decode_b16_tokens_per_s")]
                print(f"{shape:12s} {precision:5s} threads {threads}: train {cells[0]} tok/s, "
                      f"decode b1 {cells[1]} tok/s, b16 {cells[2]} tok/s (load {r['load_average']:.1f})",
                      flush=True)
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
