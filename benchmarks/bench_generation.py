"""Generation speed: this project's engine against transformers `generate`, same random model.

Shape: ModelConfig.preset("bench-small") (d 512, 8 layers, 8 heads, rotary 32, vocab 50400).
Greedy, no EOS (every row generates exactly max_new_tokens), prompts of 64 tokens. Cases:

    batch 1:  128 new tokens     batch 16: 64 new tokens     batch 64: 32 new tokens

Ours runs fp32, bf16, int8 and int4 (weight-only, group 128, fp32 activations: what
`run_inference.py --quantize` gives); transformers runs fp32 and bf16, and its best is the
reference. For each of ours:

    bytes per decode step = weights read (every projection, lm_head included, in its stored
        form; layer norms and biases; the embedding table is excluded: a step reads B rows)
      + KV cache attended (2 x layers x B x T x d x activation bytes, T = prompt + new / 2)
    bytes per token = bytes per step / B
    fraction of bandwidth = bytes per step / decode step time / measured copy bandwidth
        (benchmarks/machine.py: a large copy, read + write counted)

Every configuration has a time limit (--time-limit, seconds): from the warm-up's prefill and
step times, a run that would not fit in 40% of it generates fewer new tokens (reported as
`new_tokens`; further repeats stop at the limit), or the configuration is skipped with the
reason when not even 4 tokens fit, so the script finishes on any CPU.

    python benchmarks/bench_generation.py [--quick] [--json] [--threads N] [--time-limit S]
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

from gptj.model import GPTJ, ModelConfig  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
QUANTIZED = {"int8": 8, "int4": 4}
OURS = ["fp32", "bf16", "int8", "int4"]
GROUP_SIZE = 128


def hf_model(config: ModelConfig, dtype: torch.dtype):
    import transformers

    torch.manual_seed(0)
    return transformers.GPTJForCausalLM(config.to_hf()).eval().to(dtype)


def state_reader(state):
    return lambda name, dim, start, stop: state[name] if dim is None else state[name].narrow(dim, start, stop - start)


def our_model(config: ModelConfig, precision: str, state):
    """Our model with the HF model's weights: float, or quantized while loading."""
    if precision in DTYPES:
        model = GPTJ(config, dtype=DTYPES[precision])
        model.load_shards(state_reader(state))
        return model.eval()
    from gptj.model.quantized_linear import QuantSpec
    from gptj.model.quantized_model import quantize_from_reader

    spec = QuantSpec(QUANTIZED[precision], GROUP_SIZE)
    return quantize_from_reader(config, None, torch.float32, "cpu", spec, state_reader(state))


def build_models(config: ModelConfig, dtype: torch.dtype):
    """(hf model, our model) with identical random weights, in `dtype`."""
    hf = hf_model(config, dtype)
    return hf, our_model(config, "fp32" if dtype == torch.float32 else "bf16", hf.state_dict())


def time_ours(model, prompts, new_tokens, repeats, time_limit=None):
    from gptj.execution.inference.generation import GenerationEngine

    engine = GenerationEngine(model)
    start = time.perf_counter()
    engine.run(prompts, 4, None)  # warm-up: allocates the cache, first kernel calls
    warm = engine.stats
    new_tokens = _fit(new_tokens, warm.prefill_seconds, warm.decode_seconds / max(warm.decode_steps, 1), time_limit)
    if new_tokens is None:
        return {"skipped": f"the warm-up shows fewer than 4 new tokens fit the {time_limit} s limit"}
    best = None
    deadline = start + time_limit if time_limit else None
    for _ in range(repeats):
        t0 = time.perf_counter()
        results = engine.run(prompts, new_tokens, None)
        seconds = time.perf_counter() - t0
        if best is None or seconds < best[0]:
            best = (seconds, engine.stats, results)
        if deadline and time.perf_counter() + seconds > deadline:
            break
    seconds, stats, results = best
    return {
        "new_tokens": new_tokens,
        "tokens_per_s": len(prompts) * new_tokens / seconds,
        "decode_tokens_per_s": stats.decode_tokens_per_second,
        "decode_step_s": stats.decode_seconds / max(stats.decode_steps, 1),
        "seconds": seconds,
        "cache_bytes": engine.cache.nbytes(),
        "tokens": [r.token_ids for r in results],
    }


def _fit(new_tokens: int, fixed_s: float, per_token_s: float, time_limit: float | None) -> int | None:
    """New tokens that fit one run into a share of the time limit, judged by the warm-up's
    prefill (`fixed_s`) and decode step time (None: not even a few tokens fit)."""
    if not time_limit:
        return new_tokens
    affordable = int((0.4 * time_limit - fixed_s) / max(per_token_s, 1e-9))
    if affordable < 4:
        return None
    return min(new_tokens, affordable)


def time_hf(model, prompts, new_tokens, repeats, time_limit=None):
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)  # warm-up: ~ the prefill
        one = time.perf_counter()
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)
        four = time.perf_counter() - one
        new_tokens = _fit(new_tokens, one - start, max(four - (one - start), 0.0) / 3, time_limit)
        if new_tokens is None:
            return {"skipped": f"the warm-up shows fewer than 4 new tokens fit the {time_limit} s limit"}
        deadline = start + time_limit if time_limit else None
        best = None
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
            seconds = time.perf_counter() - t0
            best = seconds if best is None else min(best, seconds)
            if deadline and time.perf_counter() + seconds > deadline:
                break
    return {"new_tokens": new_tokens, "tokens_per_s": len(prompts) * new_tokens / best, "seconds": best,
            "tokens": out[:, ids.shape[1]:].tolist()}


def weight_bytes_per_step(model: GPTJ) -> int:
    """Bytes of weights one decode step reads: every parameter but the embedding table, and
    each quantized projection as its kernel reads it."""
    from gptj.model.packed_linear import PackedLinear
    from gptj.model.quantized_linear import QuantizedLinear

    total = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("embed."))
    total += sum(m.nbytes() for m in model.modules() if isinstance(m, PackedLinear))
    return total + sum(m.decode_bytes() for m in model.modules() if isinstance(m, QuantizedLinear))


def decode_bytes_per_step(model: GPTJ, batch: int, context: int) -> int:
    """Weights read by one decode step (embedding table excluded) + the KV cache it attends."""
    cfg = model.config
    kv = 2 * cfg.num_layers * batch * context * cfg.hidden_size * model.dtype.itemsize
    return weight_bytes_per_step(model) + kv


def run(quick: bool = False, threads: int | None = None, time_limit: float | None = 120.0,
        batches: tuple[int, ...] = (1, 16, 64)) -> dict:
    """The report as a dict; `threads` sets torch's CPU threads for both sides (None: default)."""
    from benchmarks.machine import cpu_features, describe, measure_memory_bandwidth

    if threads:
        torch.set_num_threads(threads)

    config = ModelConfig.preset("bench-small")
    prompt_len = 64
    new_tokens_for = {1: 16 if quick else 128, 16: 8 if quick else 64, 64: 4 if quick else 32}
    repeats = 1 if quick else 3
    gen = torch.Generator().manual_seed(0)
    bandwidth = measure_memory_bandwidth(64 if quick else None)
    report = {"device": describe(), "cpu_features": cpu_features(), "model": "bench-small",
              "prompt_tokens": prompt_len, "memory_bandwidth_GBps": bandwidth / 1e9,
              "time_limit_s": time_limit, "cases": {}}
    for batch in batches:
        new_tokens = new_tokens_for.get(batch, 16)
        prompts = torch.randint(0, config.vocab_size, (batch, prompt_len), generator=gen).tolist()
        case = {"batch": batch, "new_tokens": new_tokens, "ours": {}, "hf": {}, "same_tokens": {}}
        reference_tokens = {}
        for precision, dtype in DTYPES.items():
            hf = hf_model(config, dtype)
            theirs = time_hf(hf, prompts, new_tokens, repeats, time_limit)
            reference_tokens[precision] = theirs.pop("tokens", None)
            case["hf"][precision] = theirs
            state = hf.state_dict()
            for ours_precision in ([precision, "int8", "int4"] if precision == "fp32" else [precision]):
                model = our_model(config, ours_precision, state)
                mine = time_ours(model, prompts, new_tokens, repeats, time_limit)
                tokens = mine.pop("tokens", None)
                if ours_precision in DTYPES and tokens is not None and reference_tokens[precision] is not None:
                    n = min(len(tokens[0]), len(reference_tokens[precision][0]))
                    case["same_tokens"][precision] = [t[:n] for t in tokens] == [t[:n] for t in reference_tokens[precision]]
                if "skipped" not in mine:
                    step_bytes = decode_bytes_per_step(model, batch, prompt_len + mine["new_tokens"] // 2)
                    mine["bytes_per_token"] = step_bytes / batch
                    mine["bandwidth_fraction"] = step_bytes / mine["decode_step_s"] / bandwidth
                case["ours"][ours_precision] = mine
                del model
            del hf, state
        for side in ("ours", "hf"):
            timed = {p: r for p, r in case[side].items() if "tokens_per_s" in r}
            if timed:
                best = max(timed, key=lambda p: timed[p]["tokens_per_s"])
                case[f"{side}_best"] = {"precision": best, "tokens_per_s": timed[best]["tokens_per_s"]}
        if "ours_best" in case and "hf_best" in case:
            case["ratio"] = case["ours_best"]["tokens_per_s"] / case["hf_best"]["tokens_per_s"]
        report["cases"][f"batch{batch}"] = case
    return report


def print_report(report: dict) -> None:
    print(f"{report['device']} {' '.join(report.get('cpu_features', []))} | memory bandwidth "
          f"{report['memory_bandwidth_GBps']:.1f} GB/s | bench-small, prompt {report['prompt_tokens']} tokens, greedy")
    for name, case in report["cases"].items():
        print(f"{name} ({case['new_tokens']} new tokens):")
        for side in ("ours", "hf"):
            for precision, r in case[side].items():
                if "skipped" in r:
                    print(f"  {side:4s} {precision}: skipped ({r['skipped']})")
                    continue
                extra = ""
                if "decode_tokens_per_s" in r:
                    extra = f"  decode {r['decode_tokens_per_s']:8.1f} tok/s"
                if "bandwidth_fraction" in r:
                    extra += (f"  {r['bytes_per_token'] / 1e6:7.1f} MB/token"
                              f"  {100 * r['bandwidth_fraction']:3.0f}% of bandwidth")
                if r.get("new_tokens", case["new_tokens"]) != case["new_tokens"]:
                    extra += f"  (time limit: {r['new_tokens']} new tokens)"
                print(f"  {side:4s} {precision}: {r['tokens_per_s']:8.1f} tok/s{extra}")
        if "ratio" in case:
            print(f"  best: ours {case['ours_best']['precision']} {case['ours_best']['tokens_per_s']:.1f} vs "
                  f"hf {case['hf_best']['precision']} {case['hf_best']['tokens_per_s']:.1f} -> "
                  f"ratio {case['ratio']:.2f}x  (same tokens as hf: {case['same_tokens']})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short runs (< 1 minute)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--threads", type=int, help="CPU threads for both sides (default: torch's choice); "
                   "1 gives steadier numbers on a busy machine")
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds per configuration (0: none)")
    p.add_argument("--batches", default="1,16,64", help="comma-separated batch sizes")
    args = p.parse_args(argv)
    batches = tuple(int(b) for b in args.batches.split(","))
    report = run(quick=args.quick, threads=args.threads, time_limit=args.time_limit or None, batches=batches)
    print(json.dumps(report, indent=2) if args.json else "", end="")
    if not args.json:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
