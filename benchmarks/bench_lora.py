"""LoRA against full fine-tuning, and against Hugging Face PEFT, on the bench-small shape.

One step = forward + backward + AdamW update on a [batch, seq] batch of random tokens.

    ours full     GPTJ + ShardedAdamW over every parameter (the full fine-tuning path)
    ours lora     frozen GPTJ + rank-8 adapters on q, k, v, out_proj, fc_in, fc_out,
                  ShardedAdamW over the adapters only
    ours qlora    the same adapters over an int4 base (groups of 128; 32 with --quick), quantized
                  while building; every base matmul dequantizes its weight (gptj/model/quantized_linear.py)
    peft lora     GPTJForCausalLM (sdpa) + peft.get_peft_model(LoraConfig(r=8, same targets)) +
                  torch.optim.AdamW(fused) over the adapters; bf16 = the model in bf16 with
                  the adapters in fp32 under torch.autocast(bf16) (PEFT's usual mixed precision)

each in fp32 and bf16 (ours: bf16 weights and adapters, fp32 master + Adam state), each in a
fresh process (peak memory = RSS high-water mark minus the RSS before the model is built),
in interleaved rounds keeping the best step time (see bench_training.py for why).

    python -m benchmarks.bench_lora [--quick] [--rank 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from benchmarks.bench_training import _summarise, current_rss, peak_rss, run_worker, shape

CONFIGS = [(impl, precision) for precision in ("fp32", "bf16") for impl in ("full", "lora", "qlora", "peft")]
TARGETS = ("q", "k", "v", "out_proj", "fc_in", "fc_out")


def _ours(config, precision: str, lora_rank: int, group_size: int = 0):
    import torch

    from gptj.execution.runtime.model_loading import NewAdapters, load_model
    from gptj.execution.training.optimizer import ShardedAdamW
    from gptj.model.lora import LoraSettings
    from gptj.model.quantized_linear import QuantSpec

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    # As run_finetuning.py builds it: an int4 base with group_size, LoRA adapters with lora_rank.
    loaded = load_model(config, precision=dtype, quantize=QuantSpec(4, group_size) if group_size else None,
                        adapters=NewAdapters(LoraSettings(rank=lora_rank)) if lora_rank else None,
                        trainable=True)
    model = loaded.model
    trained = loaded.adapters if lora_rank else model
    optimizer = ShardedAdamW(trained, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, max_grad_norm=1.0)

    def step(inputs, labels):
        loss = model.loss(inputs, labels)
        loss.backward()
        optimizer.step(1e-4)
        optimizer.zero_grad()
        return loss

    return step, sum(p.numel() for p in trained.parameters())


def _peft(config, precision: str, lora_rank: int):
    import peft
    import torch
    from transformers import GPTJForCausalLM

    from gptj.model.adapter_io import PEFT_TARGET

    torch.manual_seed(0)
    hf_config = config.to_hf()
    hf_config._attn_implementation = "sdpa"
    model = GPTJForCausalLM(hf_config)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    lora = peft.LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                           target_modules=[PEFT_TARGET[t] for t in TARGETS])
    model = peft.get_peft_model(model, lora, autocast_adapter_dtype=True)  # adapters in fp32
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), fused=True)

    def step(inputs, labels):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=inputs, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step, sum(p.numel() for p in params)


def measure_one(impl: str, precision: str, quick: bool, rank: int, max_seconds: float) -> dict:
    import torch

    if quick:
        torch.set_num_threads(1)
    config, batch, seq = shape(quick)
    rows = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    if impl == "peft":  # transformers shifts the labels itself
        inputs = labels = rows[:, :-1].contiguous()
    else:
        inputs, labels = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
    baseline = current_rss()
    if impl == "peft":
        step, trainable = _peft(config, precision, rank)
    else:
        step, trainable = _ours(config, precision, 0 if impl == "full" else rank,
                                group_size=(32 if quick else 128) if impl == "qlora" else 0)
    step(inputs, labels)  # warm-up
    times, losses = [], []
    start_all = time.perf_counter()
    while len(times) < (2 if quick else 6):
        start = time.perf_counter()
        losses.append(float(step(inputs, labels).detach()))
        times.append(time.perf_counter() - start)
        if len(times) >= 3 and time.perf_counter() - start_all > max_seconds:
            break
    return {"impl": impl, "precision": precision, "note": "", "batch": batch, "seq": seq, "step_times": times,
            "peak_memory_bytes": peak_rss() - baseline, "last_loss": losses[-1], "trainable_params": trainable,
            "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0]}


def _in_subprocess(impl, precision, quick, rank, timeout=600) -> dict:
    args = [impl, precision, "--rank", str(rank)] + (["--quick"] if quick else [])
    return run_worker("benchmarks.bench_lora", args, {"impl": impl, "precision": precision}, timeout)


def run(quick: bool = False, rank: int = 8, rounds: int | None = None, configs=CONFIGS) -> dict:
    config, batch, seq = shape(quick)
    rounds = rounds or (1 if quick else 2)
    collected = {c: [] for c in configs}
    for index in range(rounds):
        for impl, precision in (configs if index % 2 == 0 else list(reversed(configs))):
            collected[(impl, precision)].append(_in_subprocess(impl, precision, quick, rank))
    results = {f"{impl} {precision}": _summarise(collected[(impl, precision)], config, seq)
               for impl, precision in configs}
    ratios = {}
    for precision in ("fp32", "bf16"):
        full, lora, ref = (results.get(f"{i} {precision}", {}) for i in ("full", "lora", "peft"))
        qlora = results.get(f"qlora {precision}", {})
        if all("step_seconds" in r for r in (full, qlora)):
            ratios[f"{precision} qlora"] = {
                "qlora_over_full_step_time": qlora["step_seconds"] / full["step_seconds"],
                "qlora_over_full_peak_memory": qlora["peak_memory_bytes"] / full["peak_memory_bytes"],
            }
        if all("step_seconds" in r for r in (full, lora, ref)):
            ratios[precision] = {
                "lora_over_full_step_time": lora["step_seconds"] / full["step_seconds"],
                "lora_over_full_peak_memory": lora["peak_memory_bytes"] / full["peak_memory_bytes"],
                "peft_over_ours_step_time": ref["step_seconds"] / lora["step_seconds"],
                "peft_over_ours_peak_memory": ref["peak_memory_bytes"] / lora["peak_memory_bytes"],
            }
    for name, r in results.items():
        print(_line(name, r), file=sys.stderr, flush=True)
    return {"shape": {"preset": "tiny" if quick else "bench-small", "batch": batch, "seq": seq,
                      "parameters": config.num_parameters(), "lora_rank": rank, "targets": list(TARGETS)},
            "timing": f"best step over {rounds} interleaved rounds, a fresh process per configuration and round",
            "results": results, "ratios": ratios}


def _line(name: str, r: dict) -> str:
    if "error" in r:
        return f"  {name:10s} ERROR {r['error']}"
    return (f"  {name:10s} {r['step_seconds']:.3f} s/step  peak {r['peak_memory_bytes'] / 2**20:7.0f} MiB  "
            f"trainable {r['trainable_params']:,}  loss {r['last_loss']:.3f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "PRECISION"), help="measure one configuration")
    parser.add_argument("--quick", action="store_true", help="tiny shape, a few seconds")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure_one(*args.worker, quick=args.quick, rank=args.rank,
                                     max_seconds=5 if args.quick else 20)))
        return
    print(json.dumps(run(quick=args.quick, rank=args.rank, rounds=args.rounds), indent=1))


if __name__ == "__main__":
    main()
