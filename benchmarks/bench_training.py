"""Training step speed and peak memory: this project against Hugging Face, same shape, same data.

One step = forward + backward + AdamW update on a [batch, seq] batch of random tokens.

Configurations (each in a fresh subprocess, so peak memory of one never mixes with another):

    ours fp32       GPTJ in fp32 + ShardedAdamW
    ours bf16       GPTJ with bf16 parameters + ShardedAdamW holding fp32 master weights and
                    Adam moments (the project's real mixed-precision training path)
    hf fp32         GPTJForCausalLM (sdpa attention) + torch.optim.AdamW(fused=True), the
                    optimizer the transformers Trainer picks by default
    hf bf16-autocast  fp32 model and optimizer, forward under torch.autocast(bfloat16): the
                    Trainer's `bf16=True`
    hf bf16-pure    model and AdamW state in bf16 (no master weights: lower memory, lossy updates)

Peak memory is the process RSS high-water mark minus the RSS just before the model is built.
Speed is the best step time over interleaved rounds (see `run`): on a shared machine other
processes only ever add time, so the minimum is the least disturbed estimate; the median is
reported next to it. (Timing both sides in one process, alternating steps, was tried and
rejected: transformers ran 1.5-1.7x slower next to our model than alone, a heap effect that
would have flattered this project.)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CONFIGS = [
    ("ours", "fp32"),
    ("ours", "bf16"),
    ("hf", "fp32"),
    ("hf", "bf16-autocast"),
    ("hf", "bf16-pure"),
]


def current_rss() -> int:
    """Resident set size of this process now, in bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """High-water mark of the resident set size of this process, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def shape(quick: bool):
    """(model config, batch, seq) of the benchmark."""
    from gptj.model import ModelConfig

    if quick:
        return ModelConfig.preset("tiny"), 2, 32
    return ModelConfig.preset("bench-small"), 8, 256


def _our_step(config, precision: str):
    import torch

    from gptj.execution.runtime.model_loading import load_model

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = load_model(config, precision=dtype, trainable=True).model  # as train() builds it
    note = ""
    try:
        from gptj.execution.training.optimizer import ShardedAdamW
    except ImportError:
        ShardedAdamW = None
    if ShardedAdamW is not None:
        optimizer = ShardedAdamW(
            model, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, max_grad_norm=1.0, offload=False
        )

        def update():
            optimizer.step(1e-4)
            optimizer.zero_grad()

    else:
        # The sharded optimizer is not in this tree yet: a plain AdamW on the parameters
        # (in bf16 this keeps bf16 state, i.e. no master weights; the memory is then lower).
        note = "gptj.execution.training.optimizer missing: torch.optim.AdamW(fused) on the parameters"
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)

        def update():
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def step(inputs, labels):
        loss = model.loss(inputs, labels)
        loss.backward()
        update()
        return loss

    return step, note


def _hf_step(config, precision: str):
    import torch
    from transformers import GPTJForCausalLM

    torch.manual_seed(0)
    hf_config = config.to_hf()
    hf_config._attn_implementation = "sdpa"
    model = GPTJForCausalLM(hf_config)
    if precision == "bf16-pure":
        model = model.to(torch.bfloat16)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    autocast = precision == "bf16-autocast"
    note = {
        "fp32": "fp32 model + AdamW(fused)",
        "bf16-autocast": "fp32 model + AdamW(fused), forward under torch.autocast(bf16)",
        "bf16-pure": "bf16 model + bf16 AdamW(fused) state, no master weights",
    }[precision]

    def step(inputs, labels):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=inputs, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step, note


def measure_one(impl: str, precision: str, quick: bool = False, max_seconds: float = 20.0) -> dict:
    """Run one configuration in this process; returns speed and memory numbers."""
    import torch

    if quick:  # tiny shapes: one thread avoids spinning on a busy machine; timing is not the point
        torch.set_num_threads(1)
    config, batch, seq = shape(quick)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=gen)
    if impl == "ours":
        inputs, labels = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
    else:  # transformers shifts the labels itself
        inputs = labels = rows[:, :-1].contiguous()

    baseline = current_rss()
    build = _our_step if impl == "ours" else _hf_step
    step, note = build(config, precision)

    step(inputs, labels)  # warm-up: allocations, kernel selection
    times, losses = [], []
    start_all = time.perf_counter()
    while len(times) < (2 if quick else 6):
        start = time.perf_counter()
        losses.append(float(step(inputs, labels).detach()))
        times.append(time.perf_counter() - start)
        if len(times) >= 3 and time.perf_counter() - start_all > max_seconds:
            break
    return {
        "impl": impl,
        "precision": precision,
        "note": note,
        "batch": batch,
        "seq": seq,
        "step_times": times,
        "peak_memory_bytes": peak_rss() - baseline,
        "last_loss": losses[-1],
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
    }


def _summarise(rounds: list[dict], config, seq: int) -> dict:
    """Merge the rounds of one configuration: best step time (other processes on a shared machine
    only ever add time), median for reference, the highest peak memory."""
    ok = [r for r in rounds if "error" not in r]
    if not ok:
        return rounds[-1]
    out = dict(ok[-1])
    times = sorted(t for r in ok for t in r.pop("step_times"))
    best, median = times[0], times[len(times) // 2]
    tokens = out["batch"] * out["seq"]
    out.update(
        rounds=len(ok), steps_timed=len(times), step_seconds=best, median_step_seconds=median,
        tokens_per_s=tokens / best, model_flops_per_s=config.flops_per_token(seq) * tokens / best,
        peak_memory_bytes=max(r["peak_memory_bytes"] for r in ok),
        load_average=[r["load_average"] for r in ok],
    )
    return out


# Seconds one configuration may take (a fresh process: start, build, warm-up and timed steps).
# bf16 on a CPU without AMX-BF16 / AVX512-BF16 runs far slower than fp32 (NOTES.md); it is reported as
# "timed out after N s" instead of holding up the whole benchmark.
TIME_LIMIT_S = {"quick": 120.0, "full": 300.0}


def measure_in_subprocess(impl: str, precision: str, quick: bool = False, timeout: float | None = None) -> dict:
    """One configuration in a fresh Python process (so each peak RSS is its own)."""
    timeout = timeout or TIME_LIMIT_S["quick" if quick else "full"]
    args = [impl, precision] + (["--quick"] if quick else [])
    return run_worker("benchmarks.bench_training", args, {"impl": impl, "precision": precision}, timeout)


def run_worker(module: str, args: list[str], label: dict, timeout: float) -> dict:
    """`python -m MODULE --worker ARGS` from the repository root: the last JSON line it prints,
    or `label` with an "error" saying why there is none (time limit, exit status, its stderr)."""
    cmd = [sys.executable, "-m", module, "--worker", *args]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root)
    except subprocess.TimeoutExpired:
        return {**label, "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        return {**label, "error": f"exit {done.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])


def run(quick: bool = False, limits: dict | None = None, configs=CONFIGS, rounds: int | None = None) -> dict:
    """Every configuration, plus MFU against the measured matmul limit of its precision.

    Configurations run in interleaved rounds (forward order, then reversed), each round in a
    fresh process, so a slow spell of a shared machine does not land on one side only.
    """
    from benchmarks.machine import capability

    config, batch, seq = shape(quick)
    print(f"  {capability()}", file=sys.stderr, flush=True)
    rounds = rounds or (1 if quick else 2)
    collected: dict[tuple[str, str], list[dict]] = {c: [] for c in configs}
    timed_out: set[tuple[str, str]] = set()
    for index in range(rounds):
        for impl, precision in (configs if index % 2 == 0 else list(reversed(configs))):
            if (impl, precision) in timed_out:
                continue  # it would only time out again
            result = measure_in_subprocess(impl, precision, quick)
            if result.get("error", "").startswith("timed out"):
                timed_out.add((impl, precision))
            collected[(impl, precision)].append(result)
    results = []
    for impl, precision in configs:
        result = _summarise(collected[(impl, precision)], config, seq)
        if limits and "error" not in result:
            key = "fp32" if precision == "fp32" else "bf16"
            result["mfu"] = result["model_flops_per_s"] / limits["matmul_flops"][key]
        results.append(result)
        print(_line(result), file=sys.stderr, flush=True)
    return {
        "capability": capability(),
        "time_limit_s": TIME_LIMIT_S["quick" if quick else "full"],
        "shape": {"preset": "tiny" if quick else "bench-small", "batch": batch, "seq": seq,
                  "parameters": config.num_parameters(), "flops_per_token": config.flops_per_token(seq)},
        "timing": f"best step over {rounds} interleaved rounds, a fresh process per configuration and round",
        "results": results,
    }


def _line(r: dict) -> str:
    if "error" in r:
        return f"  training {r['impl']:4s} {r['precision']:14s} ERROR {r['error']}"
    return (f"  training {r['impl']:4s} {r['precision']:14s} {r['tokens_per_s']:9.0f} tok/s  "
            f"{r['step_seconds']:.3f} s/step  peak {r['peak_memory_bytes'] / 2**20:7.0f} MiB  loss {r['last_loss']:.3f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "PRECISION"), help="measure one configuration")
    parser.add_argument("--quick", action="store_true", help="tiny shape, a few seconds")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure_one(*args.worker, quick=args.quick, max_seconds=5 if args.quick else 20)))
        return
    print(json.dumps(run(quick=args.quick), indent=1))


if __name__ == "__main__":
    main()
