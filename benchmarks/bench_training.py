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

Shapes (`--shape`): bench-small (77 M parameters, batch 8 x 256: a quick regression check,
bound by overheads) and 6b-width (GPT-J 6B's widths, d 4096, ffn 16384, vocab 50400, with
`--layers` blocks, default 2: 815 M parameters; batch 1 x `--seq`, default 512), the shape full
fine-tuning of the real model runs at. At 6b-width three more rows run, each in its own process:

    ours fp32 r2    2 gloo processes, one replica each (optimizer state sharded 2 ways), a
                    micro-batch each: tokens/s of both together, peak RSS per process
    ours fp32 tp2   2 gloo processes, tensor parallel 2, the same micro-batch
    ours qlora-int4 LoRA rank 8 over an int4 base (activations in the precision `auto` picks),
                    with the frozen int4 projections' backward timed apart against the float
                    matmul peak of the same shape

MFU: model matmul FLOPs per second (6 M + 12 L d s a token, ModelConfig.flops_per_token) over
the matmul peak measured in the same run on the step's own shapes (the best of its forward and
backward products, each timed into a preallocated output).

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
from pathlib import Path

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


SHAPES = {"quick": ("tiny", 2, 32), "bench-small": ("bench-small", 8, 256), "6b-width": ("gptj-6b", 1, 512)}


def shape(quick: bool = False, name: str = "bench-small", layers: int | None = None, seq: int | None = None):
    """(model config, batch, seq) of the benchmark."""
    from gptj.model import ModelConfig

    preset, batch, default_seq = SHAPES["quick" if quick else name]
    config = ModelConfig.preset(preset)
    if name == "6b-width" and not quick:
        config = config.replace(num_layers=layers or 2)
    return config, batch, seq or default_seq


def sharded_adamw_step(model, trained=None):
    """One training step function of the project's own: loss, backward, ShardedAdamW over
    `trained` (the model itself, or its LoRA adapters), as train() runs it."""
    from gptj.execution.training.optimizer import ShardedAdamW

    optimizer = ShardedAdamW(trained if trained is not None else model, lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                             weight_decay=0.0, max_grad_norm=1.0)

    def step(inputs, labels):
        loss = model.loss(inputs, labels)
        loss.backward()
        optimizer.step(1e-4)
        return loss

    return step


def _our_step(config, precision: str):
    import torch

    from gptj.execution.runtime.model_loading import load_model

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = load_model(config, precision=dtype, trainable=True).model  # as train() builds it
    return sharded_adamw_step(model), ""


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


def _batch(config, batch: int, seq: int, impl: str):
    import torch

    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=gen)
    if impl == "hf":  # transformers shifts the labels itself
        return rows[:, :-1].contiguous(), rows[:, :-1].contiguous()
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def _timed_steps(step, inputs, labels, steps: int, max_seconds: float) -> tuple[list[float], list[float]]:
    """Warm-up step, then up to `steps` timed steps (at least 3 once past `max_seconds`)."""
    step(inputs, labels)  # warm-up: allocations, kernel selection
    times, losses = [], []
    start_all = time.perf_counter()
    while len(times) < steps:
        start = time.perf_counter()
        losses.append(float(step(inputs, labels).detach()))
        times.append(time.perf_counter() - start)
        if len(times) >= 3 and time.perf_counter() - start_all > max_seconds:
            break
    return times, losses


def measure_one(impl: str, precision: str, quick: bool = False, max_seconds: float = 20.0,
                shape_name: str = "bench-small", layers: int | None = None, seq: int | None = None) -> dict:
    """Run one configuration in this process; returns speed and memory numbers."""
    import torch

    if quick:  # tiny shapes: one thread avoids spinning on a busy machine; timing is not the point
        torch.set_num_threads(1)
    config, batch, seq = shape(quick, shape_name, layers, seq)
    steps = 2 if quick else (3 if shape_name == "6b-width" else 6)
    if impl in PARALLEL:
        return _measure_parallel(impl, config, batch, seq, steps, max_seconds)
    inputs, labels = _batch(config, batch, seq, impl)
    baseline = current_rss()
    extra = {}
    if impl == "ours-qlora":
        step, note, extra = _qlora_step(config, seq, batch)
    else:
        step, note = (_our_step if impl == "ours" else _hf_step)(config, precision)
    times, losses = _timed_steps(step, inputs, labels, steps, max_seconds)
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
        **extra,
    }


# Parallel rows: (tensor parallel, replicas) of 2 gloo processes on this machine.
PARALLEL = {"ours-r2": (1, 2), "ours-tp2": (2, 1)}


def _parallel_rank(rank: int, world: int, port: int, tp: int, config: dict, batch: int, seq: int,
                   steps: int, max_seconds: float, out_dir: str) -> None:
    """One process of a parallel row: ShardedAdamW over the layout, its own peak RSS."""
    import torch
    import torch.distributed as dist

    from gptj.model import GPTJ, ModelConfig, ParallelContext

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        baseline = current_rss()
        config = ModelConfig(**config)
        ctx = ParallelContext.from_process_group(tp)
        model = GPTJ(config, ctx).init_weights(seed=0)
        model.train()
        step = sharded_adamw_step(model)
        inputs, labels = _batch(config, batch, seq, "ours")
        times, losses = _timed_steps(step, inputs, labels, steps, max_seconds)
        result = {"step_times": times, "last_loss": losses[-1], "peak_memory_bytes": peak_rss() - baseline,
                  "threads": torch.get_num_threads()}
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def _measure_parallel(impl: str, config, batch: int, seq: int, steps: int, max_seconds: float) -> dict:
    import socket
    import tempfile

    import torch.multiprocessing as mp

    tp, replicas = PARALLEL[impl]
    world = tp * replicas
    # Each replica holds the whole fp32 model and its gradients: refuse, saying so, a row whose
    # processes cannot fit together (instead of the kernel killing one of them).
    per_process = config.num_parameters() / tp * (4 + 4 + 8 / replicas)
    available = _available_memory()
    if available and world * per_process > 0.85 * available:
        return {"impl": impl, "precision": "fp32", "error": (
            f"does not fit: {world} processes x {per_process / 2**30:.1f} GiB (fp32 weights + gradients + "
            f"1/{replicas} of the Adam moments, before activations) > 85% of the {available / 2**30:.1f} GiB "
            f"available; try fewer --layers")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_parallel_rank, args=(world, port, tp, config.to_dict(), batch, seq, steps,
                                                 max_seconds, out_dir), nprocs=world, start_method="spawn")
        ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]
    # A step ends when the slowest rank's does; tokens: one micro-batch per replica.
    times = [max(per_rank) for per_rank in zip(*(r["step_times"] for r in ranks))]
    return {
        "impl": impl, "precision": "fp32",
        "note": f"{world} gloo processes: tensor parallel {tp} x {replicas} replicas, {ranks[0]['threads']} threads each",
        "batch": batch * replicas, "seq": seq, "step_times": times,
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in ranks),
        "peak_memory_per_process": [r["peak_memory_bytes"] for r in ranks],
        "last_loss": ranks[0]["last_loss"], "threads": sum(r["threads"] for r in ranks),
        "load_average": os.getloadavg()[0],
    }


def _available_memory() -> int:
    """MemAvailable of /proc/meminfo in bytes (0 where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _qlora_step(config, seq: int, batch: int):
    """LoRA rank 8 over an int4 base (group 128) as gptj-finetune builds it, plus the time of the
    frozen int4 in_proj's backward (grad of its input) against the float matmul of that shape."""
    import torch

    from gptj.execution.runtime.model_loading import NewAdapters, load_model
    from gptj.model.lora import LoraSettings
    from gptj.model.quantized_linear import QuantSpec, linear

    loaded = load_model(config, precision="auto", quantize=QuantSpec(4, 128),
                        adapters=NewAdapters(LoraSettings(rank=8)), trainable=True)
    model, adapters = loaded.model, loaded.adapters
    step = sharded_adamw_step(model, adapters)

    weight = model.blocks[0].in_proj_weight
    dtype = model.embed.weight.dtype
    rows = batch * seq
    out_features, in_features = weight.shape if isinstance(weight, torch.Tensor) else (weight.out_features,
                                                                                       weight.in_features)
    x = torch.randn(rows, in_features, dtype=dtype, requires_grad=True)
    grad = torch.randn(rows, out_features, dtype=dtype)
    flops = 2.0 * rows * in_features * out_features

    def backward_once():
        y = linear(x, weight)
        start = time.perf_counter()
        y.backward(grad)
        return time.perf_counter() - start

    backward_once()
    quantized_s = min(backward_once() for _ in range(3))
    dense = torch.randn(out_features, in_features, dtype=dtype)
    out = torch.empty(rows, in_features, dtype=dtype)
    torch.matmul(grad, dense, out=out)
    float_s = min(_time(lambda: torch.matmul(grad, dense, out=out)) for _ in range(3))
    extra = {"frozen_backward": {
        "shape": f"[{rows}, {out_features}] @ [{out_features}, {in_features}] ({str(dtype).removeprefix('torch.')})",
        "int4_gflops": flops / quantized_s / 1e9, "float_gflops": flops / float_s / 1e9,
        "fraction_of_float": float_s / quantized_s}}
    note = f"LoRA rank 8 over int4 (group 128), {str(dtype).removeprefix('torch.')} activations"
    return step, note, extra


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_matmul_peak(config, tokens: int, dtype_name: str = "fp32", repeats: int = 3) -> dict:
    """Best FLOP/s of the step's own matmuls ([T, d] x the weights forward, the transposed
    products backward), each timed into a preallocated output: the peak the step's MFU uses."""
    import torch

    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    d, f, v = config.hidden_size, config.ffn_dim, config.padded_vocab_size(1)
    shapes = {"qkv+fc_in": (tokens, d, 3 * d + f), "out_proj": (tokens, d, d), "fc_out": (tokens, f, d),
              "lm_head": (tokens, d, v), "weight grad (fc_in)": (f, tokens, d)}
    best = {}
    for name, (m, k, n) in shapes.items():
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        out = torch.empty(m, n, dtype=dtype)
        torch.matmul(a, b, out=out)
        seconds = min(_time(lambda a=a, b=b, out=out: torch.matmul(a, b, out=out)) for _ in range(repeats))
        best[name] = 2.0 * m * k * n / seconds
        del a, b, out
    return {"per_shape_flops": best, "peak_flops": max(best.values())}


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
# bf16 on a CPU without AMX-BF16 / AVX512-BF16 runs ~35x slower than fp32; it is reported as
# "timed out after N s" instead of holding up the whole benchmark.
TIME_LIMIT_S = {"quick": 120.0, "full": 300.0, "6b-width": 1200.0}
WIDE_CONFIGS = CONFIGS + [("ours-r2", "fp32"), ("ours-tp2", "fp32"), ("ours-qlora", "int4")]


def measure_in_subprocess(impl: str, precision: str, quick: bool = False, timeout: float | None = None,
                          shape_args: tuple[str, ...] = ()) -> dict:
    """One configuration in a fresh Python process (so each peak RSS is its own)."""
    wide = "6b-width" in shape_args
    timeout = timeout or TIME_LIMIT_S["quick" if quick else "6b-width" if wide else "full"]
    args = [impl, precision, *shape_args] + (["--quick"] if quick else [])
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


def run(quick: bool = False, limits: dict | None = None, configs=None, rounds: int | None = None,
        shape_name: str = "bench-small", layers: int | None = None, seq: int | None = None) -> dict:
    """Every configuration, plus MFU against the measured matmul limit of its precision (at
    6b-width: against the peak of the step's own matmul shapes, measured here first).

    Configurations run in interleaved rounds (forward order, then reversed), each round in a
    fresh process, so a slow spell of a shared machine does not land on one side only.
    """
    from benchmarks.machine import capability

    wide = shape_name == "6b-width" and not quick
    configs = configs or (WIDE_CONFIGS if wide else CONFIGS)
    config, batch, seq = shape(quick, shape_name, layers, seq)
    shape_args = ("--shape", shape_name, "--seq", str(seq)) + (("--layers", str(config.num_layers)) if wide else ())
    print(f"  {capability()}", file=sys.stderr, flush=True)
    step_peaks = {}
    if wide:  # in this process, before the rows (each row's process has the machine to itself)
        step_peaks = {p: step_matmul_peak(config, batch * seq, p) for p in ("fp32", "bf16")}
        for p, peak in step_peaks.items():
            print(f"  step matmul peak {p}: {peak['peak_flops'] / 1e9:.0f} GFLOP/s", file=sys.stderr, flush=True)
    rounds = rounds or (1 if quick or wide else 2)
    collected: dict[tuple[str, str], list[dict]] = {c: [] for c in configs}
    timed_out: set[tuple[str, str]] = set()
    for index in range(rounds):
        for impl, precision in (configs if index % 2 == 0 else list(reversed(configs))):
            if (impl, precision) in timed_out:
                continue  # it would only time out again
            result = measure_in_subprocess(impl, precision, quick, shape_args=shape_args)
            if result.get("error", "").startswith("timed out"):
                timed_out.add((impl, precision))
            collected[(impl, precision)].append(result)
    results = []
    for impl, precision in configs:
        result = _summarise(collected[(impl, precision)], config, seq)
        if "error" not in result:
            key = "fp32" if precision == "fp32" else "bf16"
            if impl == "ours-qlora":
                from gptj.model.lora import LoraSettings, lora_flops_per_token

                flops = lora_flops_per_token(config, LoraSettings(rank=8), seq) * result["batch"] * seq
                result["model_flops_per_s"] = flops / result["step_seconds"]
            if step_peaks:
                result["mfu"] = result["model_flops_per_s"] / step_peaks[key]["peak_flops"]
            elif limits:
                result["mfu"] = result["model_flops_per_s"] / limits["matmul_flops"][key]
        results.append(result)
        print(_line(result), file=sys.stderr, flush=True)
    return {
        "capability": capability(),
        "time_limit_s": TIME_LIMIT_S["quick" if quick else "6b-width" if wide else "full"],
        "shape": {"preset": "tiny" if quick else shape_name, "layers": config.num_layers, "batch": batch, "seq": seq,
                  "parameters": config.num_parameters(), "flops_per_token": config.flops_per_token(seq)},
        "step_matmul_peak": step_peaks,
        "timing": f"best step over {rounds} interleaved round(s), a fresh process per configuration and round",
        "results": results,
    }


def _line(r: dict) -> str:
    if "error" in r:
        return f"  training {r['impl']:10s} {r['precision']:14s} ERROR {r['error']}"
    line = (f"  training {r['impl']:10s} {r['precision']:14s} {r['tokens_per_s']:9.0f} tok/s  "
            f"{r['step_seconds']:.3f} s/step  peak {r['peak_memory_bytes'] / 2**20:7.0f} MiB  loss {r['last_loss']:.3f}")
    if "mfu" in r:
        line += f"  MFU {r['mfu']:.0%}"
    if "peak_memory_per_process" in r:
        line += "  per process " + " / ".join(f"{b / 2**20:.0f}" for b in r["peak_memory_per_process"]) + " MiB"
    if "frozen_backward" in r:
        line += f"  frozen int4 backward at {r['frozen_backward']['fraction_of_float']:.0%} of float"
    return line


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "PRECISION"), help="measure one configuration")
    parser.add_argument("--quick", action="store_true", help="tiny shape, a few seconds")
    parser.add_argument("--shape", choices=["bench-small", "6b-width"], default="bench-small",
                        help="bench-small (77 M, a regression check) or GPT-J 6B's widths (default: bench-small)")
    parser.add_argument("--layers", type=int, default=None, help="blocks at 6b-width (default: 2)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (default: 256 bench-small, 512 6b-width)")
    parser.add_argument("--out", default=None, help="also write the JSON report to this file")
    args = parser.parse_args(argv)
    if args.worker:
        wide = args.shape == "6b-width"
        print(json.dumps(measure_one(*args.worker, quick=args.quick, max_seconds=5 if args.quick else 120 if wide else 20,
                                     shape_name=args.shape, layers=args.layers, seq=args.seq)))
        return
    report = run(quick=args.quick, shape_name=args.shape, layers=args.layers, seq=args.seq)
    text = json.dumps(report, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
