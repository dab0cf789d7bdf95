"""`bench_serving.py --adapters K`: K LoRA adapters served over one base against one merged model.

Mixed traffic (request i asks for adapter i mod K) at each --concurrency goes to one server
holding K adapters over the unmerged base (gptj/model/multi_lora.py); the same traffic then goes to
a server with one adapter merged into its weights (the cost of one fine-tune served alone).
Reported per level: output tokens/s of both and their ratio (target >= 0.8x); with --rounds R
the two servers take turns R times and each one's best round counts. Memory: the
weight bytes of K adapters over one base against K servers each holding a base, (base + K x
adapter) / (K x base) (target <= 0.3x), and the servers' resident memory as measured.
"""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
from pathlib import Path

import torch


def make_adapters(args, directory: Path) -> tuple[dict[str, str], dict]:
    """K random PEFT adapters of --adapter-rank for the server's model; (name -> dir, sizes)."""
    from gptj.execution.inference.pipelines import load_model_and_tokenizer
    from gptj.model.adapter_io import save_peft_adapter
    from gptj.model.lora import LoraAdapters, LoraSettings, adapter_parameter_count

    source = "random:tiny" if args.quick else "random:bench-small"
    tokenizer = None if args.quick or not args.gpt2_tokenizer.is_dir() else str(args.gpt2_tokenizer)
    model, _ = load_model_and_tokenizer(source, tokenizer, precision="fp32", device="cpu")
    config, base_params = model.config, sum(p.numel() for p in model.parameters())
    del model
    settings = LoraSettings(rank=args.adapter_rank, alpha=2.0 * args.adapter_rank)
    dirs = {}
    for k in range(args.adapters):
        adapters = LoraAdapters(config, settings)
        gen = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for p in adapters.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        dirs[f"task{k}"] = str(save_peft_adapter(adapters, directory / f"task{k}", None))
    element = 2 if args.precision == "bf16" else 4
    sizes = {"base_bytes": base_params * element,
             "adapter_bytes": adapter_parameter_count(config, settings) * element}
    return dirs, sizes


def run_adapters(args, start_server, run_level, rss_mib) -> dict:
    """Both servers up at once, levels sent to each in turn over the same requests, --rounds
    times; each server's best round counts (the one least slowed by other work on the machine)."""
    with tempfile.TemporaryDirectory() as tmp:
        dirs, sizes = make_adapters(args, Path(tmp))
        names = list(dirs)
        servers = {"adapters": ([a for name, d in dirs.items() for a in ("--adapter", f"{name}={d}")], names),
                   "merged": (["--adapter", dirs[names[0]]], None)}
        procs = {}
        try:
            for kind, (extra, models) in servers.items():
                procs[kind] = start_server(args, extra)
                asyncio.run(run_level(procs[kind][1], 2, 2, args, random.Random(1), models))  # warm-up
            best: dict[str, list[dict]] = {kind: [] for kind in servers}
            for _ in range(args.rounds):
                for kind, (_, models) in servers.items():
                    for i, c in enumerate(args.concurrency):  # the same prompts for both servers
                        level = asyncio.run(run_level(procs[kind][1], c, args.num_prompts or max(8, 3 * c), args,
                                                      random.Random(c), models))
                        print(json.dumps({"server": kind, **level}), flush=True)
                        kept = best[kind]
                        if len(kept) <= i:
                            kept.append(level)
                        elif level["output_tokens_per_s"] > kept[i]["output_tokens_per_s"]:
                            kept[i] = level
            runs = {kind: {"levels": best[kind], "rss_mib": rss_mib(proc.pid)} for kind, (proc, _) in procs.items()}
        finally:
            for proc, _ in procs.values():
                proc.terminate()
                proc.wait(30)
    k, base, adapter = args.adapters, sizes["base_bytes"], sizes["adapter_bytes"]
    ratios = [{"concurrency": a["concurrency"], "adapters_tokens_per_s": a["output_tokens_per_s"],
               "merged_tokens_per_s": m["output_tokens_per_s"],
               "ratio": a["output_tokens_per_s"] / m["output_tokens_per_s"]}
              for a, m in zip(runs["adapters"]["levels"], runs["merged"]["levels"])]
    return {"adapters": k, "adapter_rank": args.adapter_rank, "rounds": args.rounds, "throughput": ratios, **sizes,
            "weight_bytes_ratio": (base + k * adapter) / (k * base),
            "rss_mib": {kind: run["rss_mib"] for kind, run in runs.items()},
            "rss_ratio": runs["adapters"]["rss_mib"] / (k * runs["merged"]["rss_mib"]),
            "failed": sum(level["failed"] for run in runs.values() for level in run["levels"])}


def report(result: dict) -> str:
    lines = [f"{result['adapters']} adapters (rank {result['adapter_rank']}) over one base vs one merged model:",
             "| concurrency | adapters tok/s | merged tok/s | ratio |", "|---|---|---|---|"]
    for r in result["throughput"]:
        lines.append(f"| {r['concurrency']} | {r['adapters_tokens_per_s']:.1f} | {r['merged_tokens_per_s']:.1f} | "
                     f"{r['ratio']:.2f}x |")
    lines.append(f"weights: base {result['base_bytes'] / 2**20:.1f} MiB, adapter {result['adapter_bytes'] / 2**20:.2f} "
                 f"MiB each: one server {result['weight_bytes_ratio']:.3f}x of {result['adapters']} servers; "
                 f"resident memory {result['rss_mib']['adapters']:.0f} MiB vs {result['adapters']} x "
                 f"{result['rss_mib']['merged']:.0f} MiB ({result['rss_ratio']:.3f}x)")
    return "\n".join(lines)
