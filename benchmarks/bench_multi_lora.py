"""Per-row LoRA deltas of several adapters (gptj/model/multi_lora.py): the dense path against the
per-row gather, by number of loaded adapters, for one block's three delta calls.

    python -m benchmarks.bench_multi_lora            # bench-small width, rank 8, bf16, 1 thread

Rows are spread over the adapters (row b uses adapter 1 + b mod n). Reported per shape and
adapter count: microseconds per block for each path (the fastest of --repeats, the two paths
timed in turn) and gather / dense (> 1: dense is faster).
The cutoff `DENSE_MAX_ADAPTERS` is chosen from this table.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from gptj.model.config import ModelConfig
from gptj.model.lora import LoraAdapters, LoraSettings
from gptj.model.multi_lora import MultiLoRA

CALLS = (("q", "k", "v", "fc_in"), ("out_proj",), ("fc_out",))


def _adapters(config, n: int, rank: int, dtype) -> MultiLoRA:
    settings = LoraSettings(rank=rank)
    loras = {}
    for k in range(n):
        lora = LoraAdapters(config, settings)
        gen = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for p in lora.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        loras[f"a{k}"] = lora.to(dtype)
    return MultiLoRA(loras)


def _block_seconds(multi: MultiLoRA, inputs, outputs) -> float:
    """Seconds for one block's three `add` calls."""
    block = multi.blocks[0]
    start = time.perf_counter()
    for targets, x, y in zip(CALLS, inputs, outputs):
        block.add(targets, x, y)
    return time.perf_counter() - start


def measure(config, n: int, rows: int, tokens: int, rank: int, dtype, repeats: int) -> dict:
    """Both paths timed in turn, `repeats` times each; the fastest of each (the least disturbed
    by other processes on a shared machine)."""
    multi = _adapters(config, n, rank, dtype)
    multi.set_rows([1 + b % n for b in range(rows)])
    d, f = config.hidden_size, config.ffn_dim
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(rows, tokens, width, generator=gen).to(dtype) for width in (d, d, f)]
    outputs = [torch.zeros(rows, tokens, width, dtype=dtype) for width in (3 * d + f, d, d)]
    times = {"dense": [], "gather": []}
    with torch.inference_mode():
        for i in range(repeats + 2):  # the first two: warm-up (and the dense path's cached stacks)
            for path, limit in (("dense", n), ("gather", n - 1)):
                multi.dense_limit = limit
                seconds = _block_seconds(multi, inputs, outputs)
                if i >= 2:
                    times[path].append(seconds)
    result = {"adapters": n, "rows": rows, "tokens": tokens,
              **{f"{path}_us": 1e6 * min(t) for path, t in times.items()}}
    result["gather_over_dense"] = result["gather_us"] / result["dense_us"]
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="bench-small")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 2, 4, 8, 12, 16, 32])
    p.add_argument("--shapes", nargs="+", default=["16x1", "4x64", "16x64"], help="ROWSxTOKENS per call")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = ModelConfig.preset(args.preset).replace(num_layers=1)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    print("| rows x tokens | adapters | dense us | gather us | gather / dense |\n|---|---|---|---|---|")
    for shape in args.shapes:
        rows, tokens = (int(v) for v in shape.split("x"))
        for n in args.adapters:
            r = measure(config, n, rows, tokens, args.rank, dtype, args.repeats)
            print(f"| {rows} x {tokens} | {n} | {r['dense_us']:.0f} | {r['gather_us']:.0f} | "
                  f"{r['gather_over_dense']:.2f}x |", flush=True)
            print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
