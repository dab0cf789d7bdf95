"""Decode speed when another process shares the cores: how much is lost, and to what.

    python -m benchmarks.bench_sharing --model /work/ckpt-6b-int4
    python -m benchmarks.bench_sharing --model /work/ckpt-6b-L2-int4 --new-tokens 16   # quick

One model is loaded once; batch-1 greedy decode tokens/s is then measured with torch using
each thread count asked (default: all cores, and one), first alone and then beside 1 .. cores
busy processes (a Python spin loop each, which takes a whole core when it runs). A process that
loses a share s of the cores should keep about (1 - s) of its speed; a parallel kernel whose
threads meet at a barrier after every matmul loses more: each barrier waits for the thread the
scheduler took off its core. The table gives, per row, tokens/s and its ratio to the alone row
of the same thread count, beside the fair share (cores / (cores + busy processes) when every
runnable thread gets an equal slice). The machine is named in the report, with OpenMP's wait
policy (set OMP_WAIT_POLICY=PASSIVE or ACTIVE in the environment to compare: how torch's
threads wait at each barrier, spinning or asleep).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time


def _spin(stop) -> None:
    while not stop.is_set():
        for _ in range(100_000):
            pass


def _decode_rate(engine, prompt: list[int], new_tokens: int) -> float:
    engine.run([prompt], new_tokens, None)
    return engine.stats.decode_tokens_per_second


def measure(model_dir: str, quantize: str | None, threads: list[int], new_tokens: int, repeats: int) -> list[dict]:
    import torch

    from gptj.execution.inference.generation import GenerationEngine
    from gptj.execution.inference.pipelines import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(model_dir, precision="bf16", device="cpu", quantize=quantize)
    engine = GenerationEngine(model)
    prompt = [(7 * i) % model.config.vocab_size for i in range(32)]
    cores = os.cpu_count() or 1
    rows = []
    with torch.inference_mode():
        _decode_rate(engine, prompt, 4)  # warm
        for count in threads:
            torch.set_num_threads(count)
            alone = None
            for busy in range(cores + 1):
                stop = multiprocessing.Event()
                spinners = [multiprocessing.Process(target=_spin, args=(stop,), daemon=True) for _ in range(busy)]
                for p in spinners:
                    p.start()
                time.sleep(0.5)
                rate = max(_decode_rate(engine, prompt, new_tokens) for _ in range(repeats))
                stop.set()
                for p in spinners:
                    p.join()
                alone = alone or rate
                fair = min(1.0, cores / (count + busy)) / min(1.0, cores / count)
                rows.append({"threads": count, "busy_processes": busy, "decode_tok_s": rate,
                             "of_alone": rate / alone, "fair_share": fair})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_sharing", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a checkpoint directory (float, or a quantized one)")
    p.add_argument("--quantize", choices=("int8", "int4"), help="quantize a float checkpoint while loading")
    p.add_argument("--threads", type=int, action="append", help="torch threads (repeatable; default: all cores, 1)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args(argv)
    from benchmarks.machine import cpu_features, describe

    threads = args.threads or sorted({os.cpu_count() or 1, 1}, reverse=True)
    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    print(" ".join([describe(), *cpu_features()]), f"({os.cpu_count()} cores), OMP_WAIT_POLICY {policy}")
    rows = measure(args.model, args.quantize, threads, args.new_tokens, args.repeats)
    print("| threads | busy processes | decode tok/s | of alone | fair share |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['threads']} | {r['busy_processes']} | {r['decode_tok_s']:.2f} | {r['of_alone']:.2f} | "
              f"{r['fair_share']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
