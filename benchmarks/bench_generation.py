"""Generation speed: this project's engine against transformers `generate`, same random model.

Shape: ModelConfig.preset("bench-small") (d 512, 8 layers, 8 heads, rotary 32, vocab 50400).
Greedy, no EOS (every row generates exactly max_new_tokens). Cases:

    batch 1:  prompt 64 tokens, 128 new tokens
    batch 16: prompts of 64 tokens, 64 new tokens each

Each side runs in fp32 and bf16; the report gives every number and each side's best, the
ratio of the bests, and the fraction of measured memory bandwidth our batch-1 decode reaches
(bytes per decode step = weights read per step + KV cache read per step; the embedding
table is not counted, a step reads one row of it).

    python benchmarks/bench_generation.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptj import GPTJ, ModelConfig  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_models(config: ModelConfig, dtype: torch.dtype):
    """(hf model, our model) with identical random weights, in `dtype`."""
    import transformers

    torch.manual_seed(0)
    hf = transformers.GPTJForCausalLM(config.to_hf()).eval().to(dtype)
    state = hf.state_dict()
    ours = GPTJ(config, dtype=dtype)
    ours.load_shards(lambda name, dim, start, stop: state[name] if dim is None else state[name].narrow(dim, start, stop - start))
    return hf, ours.eval()


def time_ours(model, prompts, new_tokens, repeats):
    from execution.generation import GenerationEngine

    engine = GenerationEngine(model)
    engine.run(prompts, 4, None)  # warm-up: allocates the cache, first kernel calls
    best = None
    for _ in range(repeats):
        start = time.perf_counter()
        results = engine.run(prompts, new_tokens, None)
        seconds = time.perf_counter() - start
        if best is None or seconds < best[0]:
            best = (seconds, engine.stats, results)
    seconds, stats, results = best
    return {
        "tokens_per_s": len(prompts) * new_tokens / seconds,
        "decode_tokens_per_s": stats.decode_tokens_per_second,
        "decode_step_s": stats.decode_seconds / max(stats.decode_steps, 1),
        "seconds": seconds,
        "cache_bytes": engine.cache.nbytes(),
        "tokens": [r.token_ids for r in results],
    }


def time_hf(model, prompts, new_tokens, repeats):
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)
        best = None
        for _ in range(repeats):
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
            seconds = time.perf_counter() - start
            best = seconds if best is None else min(best, seconds)
    return {"tokens_per_s": len(prompts) * new_tokens / best, "seconds": best,
            "tokens": out[:, ids.shape[1]:].tolist()}


def decode_bytes_per_step(model: GPTJ, batch: int, context: int) -> int:
    """Weights read by one decode step (embedding table excluded) + the KV cache it attends."""
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("embed."))
    cfg = model.config
    kv = 2 * cfg.num_layers * batch * context * cfg.hidden_size * next(model.parameters()).element_size()
    return weights + kv


def run(quick: bool = False, threads: int | None = None) -> dict:
    """The report as a dict; `threads` sets torch's CPU threads for both sides (None: default)."""
    from benchmarks.machine import describe, measure_memory_bandwidth

    if threads:
        torch.set_num_threads(threads)

    config = ModelConfig.preset("bench-small")
    prompt_len = 64
    cases = [(1, 16 if quick else 128), (16, 8 if quick else 64)]
    repeats = 1 if quick else 3
    gen = torch.Generator().manual_seed(0)
    bandwidth = measure_memory_bandwidth(64 if quick else None)
    report = {"device": describe(), "model": "bench-small", "prompt_tokens": prompt_len,
              "memory_bandwidth_GBps": bandwidth / 1e9, "cases": {}}
    for batch, new_tokens in cases:
        prompts = torch.randint(0, config.vocab_size, (batch, prompt_len), generator=gen).tolist()
        case = {"batch": batch, "new_tokens": new_tokens, "ours": {}, "hf": {}}
        for precision, dtype in DTYPES.items():
            hf, ours = build_models(config, dtype)
            mine = time_ours(ours, prompts, new_tokens, repeats)
            theirs = time_hf(hf, prompts, new_tokens, repeats)
            agree = mine.pop("tokens") == theirs.pop("tokens")
            if batch == 1:
                step_bytes = decode_bytes_per_step(ours, batch, prompt_len + new_tokens // 2)
                mine["bandwidth_fraction"] = step_bytes / mine["decode_step_s"] / bandwidth
            case["ours"][precision], case["hf"][precision] = mine, theirs
            case.setdefault("same_tokens", {})[precision] = agree
            del hf, ours
        for side in ("ours", "hf"):
            best = max(case[side], key=lambda p: case[side][p]["tokens_per_s"])
            case[f"{side}_best"] = {"precision": best, "tokens_per_s": case[side][best]["tokens_per_s"]}
        case["ratio"] = case["ours_best"]["tokens_per_s"] / case["hf_best"]["tokens_per_s"]
        report["cases"][f"batch{batch}"] = case
    return report


def print_report(report: dict) -> None:
    print(f"{report['device']} | memory bandwidth {report['memory_bandwidth_GBps']:.1f} GB/s | "
          f"bench-small, prompt {report['prompt_tokens']} tokens, greedy")
    for name, case in report["cases"].items():
        print(f"{name} ({case['new_tokens']} new tokens):")
        for side in ("ours", "hf"):
            for precision, r in case[side].items():
                extra = ""
                if "decode_tokens_per_s" in r:
                    extra = f"  decode {r['decode_tokens_per_s']:8.1f} tok/s"
                if "bandwidth_fraction" in r:
                    extra += f"  {100 * r['bandwidth_fraction']:.0f}% of bandwidth"
                print(f"  {side:4s} {precision}: {r['tokens_per_s']:8.1f} tok/s{extra}")
        print(f"  best: ours {case['ours_best']['precision']} {case['ours_best']['tokens_per_s']:.1f} vs "
              f"hf {case['hf_best']['precision']} {case['hf_best']['tokens_per_s']:.1f} -> "
              f"ratio {case['ratio']:.2f}x  (same tokens: {case['same_tokens']})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short runs (< 20 s)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--threads", type=int, help="CPU threads for both sides (default: torch's choice); "
                   "1 gives steadier numbers on a busy machine")
    args = p.parse_args(argv)
    report = run(quick=args.quick, threads=args.threads)
    print(json.dumps(report, indent=2) if args.json else "", end="")
    if not args.json:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
