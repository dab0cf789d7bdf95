"""GPT-J 6B dimensions on one GPU, random bf16 weights: training MFU and decode bandwidth.

    python -m benchmarks.gpu_bench                 # on an H100/H200, < 8 minutes
    python -m benchmarks.gpu_bench --smoke         # tiny shape on CPU, a few seconds
    python -m benchmarks.gpu_bench --out DIR       # default: $OUT, else benchmarks/results

Sections (each in try/except: an error is recorded and the next section runs; a global time
budget skips what no longer fits):

1. machine: device name, measured bf16 matmul FLOP/s and device-copy bandwidth (read + write).
2. training: GPTJ with as many 6B-shaped blocks as fit (chosen with execution.planner from the
   free device memory and the host memory), bf16 weights + ShardedAdamW fp32 master, with and
   without optimizer offload; tokens/s and MFU (ModelConfig.flops_per_token: 6 M + 12 L d s
   per token, M the matmul weights, embedding excluded) against the measured matmul limit
   and the card's datasheet peak. Hugging Face (GPTJForCausalLM, fp32
   weights + torch.autocast(bf16) + fused AdamW, the Trainer's bf16 path) on the same blocks
   where it fits.
3. decode: the full 28-block model, greedy, batch 1, 16 and 64; tokens/s and the fraction of
   the measured bandwidth (bytes per step = weights without the embedding + KV cache read),
   ours (eager, and with CUDA graphs via compile_decode) and Hugging Face generate; then the
   same model weight-only quantized on the device: int4 (group 128, torch's tinygemm kernel,
   eager and with CUDA graphs) and int8 (dequantize + matmul, fused by the compiled step).

Writes gpu_bench.json and gpu_bench.md under the output folder and prints the table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmarks.machine import describe, measure_matmul_flops, measure_memory_bandwidth
from gptj import GPTJ, ModelConfig

# Dense bf16 datasheet peaks (no sparsity), FLOP/s, by device-name fragment.
DATASHEET_BF16 = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 NVL": 835e12,
                  "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12}
GiB = 2**30


class Budget:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def timed(fn, device: torch.device, repeats: int) -> list[float]:
    """Seconds per call, with CUDA events on a GPU and perf_counter on CPU."""
    times = []
    for _ in range(repeats):
        sync(device)
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(stop) / 1000)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return times


@torch.no_grad()
def random_init(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights drawn on the device (speed only; values are GPT-J-like in scale)."""
    for name, p in model.named_parameters():
        if "ln" in name:
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0.0, 0.02)
    return model


def datasheet_peak(name: str) -> float | None:
    return next((v for k, v in DATASHEET_BF16.items() if k in name), None)


# ---- machine ---------------------------------------------------------------------------------------


def section_machine(device: torch.device, smoke: bool) -> dict:
    name = describe(device)
    out = {
        "device": name,
        "torch": torch.__version__,
        "matmul_bf16_flops": measure_matmul_flops(torch.bfloat16, 256 if smoke else None, device),
        "bandwidth": measure_memory_bandwidth(16 if smoke else None, device),
        "datasheet_bf16_flops": datasheet_peak(name),
    }
    if device.type == "cuda":
        free_memory(device)  # the measurement buffers above go back before counting free memory
        free, total = torch.cuda.mem_get_info(device)
        out.update(device_free=free, device_total=total)
    return out


# ---- training --------------------------------------------------------------------------------------


def host_available() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 64 * GiB


def choose_blocks(base: ModelConfig, seq: int, batch: int, offload: bool, device_bytes: float,
                  host_bytes: float, max_blocks: int) -> int:
    """The most blocks the planner says fit (10% margin on device and host memory)."""
    from execution.planner import Layout, Machine, plan_layout

    machine = Machine(name="measured", devices_per_node=1, nodes=1, device_memory=0.9 * device_bytes,
                      host_memory=0.9 * host_bytes, intra_bandwidth=0.0, inter_bandwidth=0.0,
                      host_link_bandwidth=25e9, matmul_flops=1e15, reserved=0.0,
                      shared_host=False)
    best = 0
    for k in range(1, max_blocks + 1):
        row = plan_layout(base.replace(num_layers=k), Layout(1, 1, offload, False, False), machine, seq=seq,
                          micro_batch=batch, global_batch=batch, precision="bf16")
        if not row["fits"]:
            break
        best = k
    return best


def train_ours(config, device, batch, seq, offload: bool, steps: int) -> dict:
    from execution.optimizer import ShardedAdamW

    model = random_init(GPTJ(config, dtype=torch.bfloat16, device=device))
    model.train()
    opt = ShardedAdamW(model, lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, max_grad_norm=1.0,
                       offload=offload)
    ids = torch.randint(0, config.vocab_size, (batch, seq + 1), device=device)

    def step():
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
        opt.step(1e-5)
        opt.zero_grad()

    timed(step, device, 1)  # warm-up
    return {"times": timed(step, device, steps), "peak": _peak(device)}  # model freed on return


def train_hf(config, device, batch, seq, steps: int) -> dict:
    from transformers import GPTJForCausalLM

    hf_config = config.to_hf()
    hf_config._attn_implementation = "sdpa"
    with torch.device(device):
        model = random_init(GPTJForCausalLM(hf_config))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=True)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    timed(step, device, 1)
    return {"times": timed(step, device, steps), "peak": _peak(device)}


def _peak(device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def section_training(device, machine: dict, smoke: bool, budget: Budget) -> dict:
    base = ModelConfig.preset("tiny") if smoke else ModelConfig.preset("gptj-6b")
    seq, batch = (64, 2) if smoke else (1024, 4)
    limit = machine["matmul_bf16_flops"]
    peak = machine.get("datasheet_bf16_flops")
    if device.type == "cuda":
        device_bytes = machine["device_free"]
    else:
        device_bytes = 2 * GiB
    host_bytes = host_available()
    runs = []
    for impl, offload in (("ours", False), ("ours", True), ("hf", False)):
        if budget.left() < (5 if smoke else 90):
            runs.append({"impl": impl, "offload": offload, "error": "skipped: time budget"})
            continue
        free_memory(device)
        record = {"impl": impl, "offload": offload}
        try:
            blocks = choose_blocks(base, seq, batch, offload, device_bytes, host_bytes,
                                   max_blocks=base.num_layers if not smoke else 2)
            if impl == "hf":  # HF on the same blocks as ours without offload
                blocks = next((r["blocks"] for r in runs if r.get("impl") == "ours" and not r["offload"]
                               and "blocks" in r), blocks)
            if blocks < 1:
                raise RuntimeError("not even one block fits in memory")
            config = base.replace(num_layers=blocks)
            steps = 2 if smoke else (2 if offload else 4)
            result = (train_hf(config, device, batch, seq, steps) if impl == "hf"
                      else train_ours(config, device, batch, seq, offload, steps))
            seconds = sorted(result["times"])[len(result["times"]) // 2]
            tokens = batch * seq
            flops = config.flops_per_token(seq) * tokens / seconds
            record.update(blocks=blocks, parameters=config.num_parameters(), batch=batch, seq=seq,
                          step_seconds=seconds, tokens_per_s=tokens / seconds, model_flops_per_s=flops,
                          mfu=flops / limit, mfu_datasheet=flops / peak if peak else None,
                          peak_device_bytes=result["peak"])
        except Exception as error:
            record["error"] = f"{type(error).__name__}: {error}"
            record["traceback"] = traceback.format_exc()[-2000:]
        runs.append(record)
        print(f"  training {record}", file=sys.stderr, flush=True)
    return {"runs": runs}


# ---- decode ----------------------------------------------------------------------------------------


def decode_bytes_per_step(config: ModelConfig, batch: int, context: int, element: int = 2) -> float:
    """Weights a decode step reads (all but the embedding table) + the KV cache it attends."""
    weights = config.num_parameters() - config.vocab_size * config.hidden_size
    kv = 2 * config.num_layers * batch * context * config.hidden_size
    return (weights + kv) * element


def model_decode_bytes(model, batch: int, context: int) -> float:
    """decode_bytes_per_step for a model as it is held: quantized projections count the bytes
    their kernel reads (gptj.quant.QuantizedLinear.decode_bytes), float parameters their own."""
    from gptj.quant import QuantizedLinear

    config = model.config
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("embed."))
    weights += sum(m.decode_bytes() for m in model.modules() if isinstance(m, QuantizedLinear))
    kv = 2 * config.num_layers * batch * context * config.hidden_size * model.embed.weight.element_size()
    return weights + kv


def decode_ours(model, prompts, new_tokens, compile_decode: bool) -> float:
    from execution.generation import GenerationEngine

    engine = GenerationEngine(model, compile_decode=compile_decode)
    engine.run(prompts, min(new_tokens, 8), None)  # warm-up (and compilation)
    engine.run(prompts, new_tokens, None)
    return engine.stats.decode_tokens_per_second


def decode_hf(model, prompts, new_tokens, device) -> float:
    ids = torch.tensor(prompts, device=device)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kwargs)
        times = {}
        for n in (1, new_tokens):  # decode rate = extra tokens over extra time (prefill cancels out)
            sync(device)
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
            sync(device)
            times[n] = time.perf_counter() - t
    return ids.shape[0] * (new_tokens - 1) / max(times[new_tokens] - times[1], 1e-9)


def section_decode(device, machine: dict, smoke: bool, budget: Budget) -> dict:
    """Eager ours, then Hugging Face, then ours with CUDA graphs (compilation is the slow part,
    so it runs last and only while the budget lasts)."""
    config = ModelConfig.preset("tiny") if smoke else ModelConfig.preset("gptj-6b")
    prompt_len, new_tokens = (16, 8) if smoke else (128, 128)
    gen = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(0, config.vocab_size, (b, prompt_len), generator=gen).tolist() for b in (1, 16, 64)}
    common = (budget, smoke, config, prompt_len, new_tokens, machine["bandwidth"])
    runs = []
    free_memory(device)
    model = random_init(GPTJ(config, dtype=torch.bfloat16, device=device)).eval()
    for batch, p in prompts.items():
        runs.append(_decode_run("ours", batch, False, *common, lambda p=p: decode_ours(model, p, new_tokens, False)))
    try:
        from transformers import GPTJForCausalLM

        with torch.device(device):
            hf = GPTJForCausalLM._from_config(config.to_hf(), dtype=torch.bfloat16)
        random_init(hf).eval()
        for batch, p in prompts.items():
            runs.append(_decode_run("hf", batch, False, *common, lambda p=p: decode_hf(hf, p, new_tokens, device)))
        hf = None  # free the weights before the next model
    except Exception as error:
        runs.append({"impl": "hf", "error": f"{type(error).__name__}: {error}"})
    free_memory(device)
    if device.type == "cuda":
        for batch, p in prompts.items():
            runs.append(_decode_run("ours", batch, True, *common, lambda p=p: decode_ours(model, p, new_tokens, True),
                                    min_left=90))
    runs += _quantized_decode_runs(model, prompts, new_tokens, device, common)
    model = None
    free_memory(device)
    return {"prompt_tokens": prompt_len, "new_tokens": new_tokens, "runs": runs}


def _quantized_decode_runs(model, prompts, new_tokens, device, common) -> list[dict]:
    """int8 and int4 (group 128) copies of the bf16 model, quantized on the device. On CUDA,
    int4 runs torch's tinygemm kernel eagerly and with CUDA graphs; int8 dequantizes inside the
    compiled decode step (inductor fuses it into the matmul; ATen's int8 CUDA kernel is naive)."""
    from gptj.quant import QuantSpec
    from gptj.quantized import quantized_copy

    runs = []
    for bits in (8, 4):
        try:
            quantized = quantized_copy(model, QuantSpec(bits, 128))
        except Exception as error:
            runs.append({"impl": "ours", "weights": f"int{bits}", "error": f"{type(error).__name__}: {error}"})
            continue
        modes = [False] if device.type != "cuda" else ([True] if bits == 8 else [False, True])
        for compiled in modes:
            for batch, p in prompts.items():
                record = _decode_run(
                    "ours", batch, compiled, *common, min_left=90 if compiled else 30, model=quantized,
                    fn=lambda p=p, c=compiled, m=quantized: decode_ours(m, p, new_tokens, c),
                )
                record["weights"] = f"int{bits}"
                runs.append(record)
        quantized = None
        free_memory(device)
    return runs


def _decode_run(impl, batch, compiled, budget, smoke, config, prompt_len, new_tokens, bandwidth, fn,
                min_left: float = 30, model=None) -> dict:
    record = {"impl": impl, "batch": batch, "cuda_graphs": compiled, "weights": "bf16"}
    if budget.left() < (2 if smoke else min_left):
        record["error"] = "skipped: time budget"
        return record
    try:
        rate = fn()
        context = prompt_len + new_tokens // 2
        step_bytes = (decode_bytes_per_step(config, batch, context) if model is None
                      else model_decode_bytes(model, batch, context))
        record["bytes_per_token"] = step_bytes / batch
        steps_per_s = rate / batch
        record.update(tokens_per_s=rate, bandwidth_fraction=step_bytes * steps_per_s / bandwidth)
    except Exception as error:
        record["error"] = f"{type(error).__name__}: {error}"
        record["traceback"] = traceback.format_exc()[-2000:]
    print(f"  decode {record}", file=sys.stderr, flush=True)
    return record


# ---- report ----------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# GPU benchmark: {m.get('device', '?')}", ""]
    if "error" not in m:
        lines.append(f"measured: bf16 matmul {m['matmul_bf16_flops'] / 1e12:.0f} TFLOP/s, device copy "
                     f"{m['bandwidth'] / 1e9:.0f} GB/s; datasheet bf16 "
                     f"{(m['datasheet_bf16_flops'] or 0) / 1e12:.0f} TFLOP/s; torch {m['torch']}")
    lines += ["", "| training | blocks | params | tokens/s | MFU (measured) | MFU (datasheet) | peak GiB |",
              "|---|---|---|---|---|---|---|"]
    for r in report.get("training", {}).get("runs", []):
        name = f"{r['impl']}{' + offload' if r['offload'] else ''}"
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:80]} | | | | | |")
            continue
        ds = f"{100 * r['mfu_datasheet']:.1f}%" if r.get("mfu_datasheet") else "-"
        pk = f"{r['peak_device_bytes'] / GiB:.1f}" if r.get("peak_device_bytes") else "-"
        lines.append(f"| {name} | {r['blocks']} | {r['parameters'] / 1e9:.2f} B | {r['tokens_per_s']:,.0f} | "
                     f"{100 * r['mfu']:.1f}% | {ds} | {pk} |")
    lines += ["", "| decode | weights | batch | tokens/s | MB read per token | fraction of bandwidth |",
              "|---|---|---|---|---|---|"]
    for r in report.get("decode", {}).get("runs", []):
        name = r["impl"] + (" (CUDA graphs)" if r.get("cuda_graphs") else "")
        weights = r.get("weights", "bf16")
        if "error" in r:
            lines.append(f"| {name} | {weights} | {r.get('batch', '')} | error: {r['error'][:80]} | | |")
        else:
            lines.append(f"| {name} | {weights} | {r['batch']} | {r['tokens_per_s']:,.1f} | "
                         f"{r['bytes_per_token'] / 1e6:,.1f} | {100 * r['bandwidth_fraction']:.1f}% |")
    for name in ("machine", "training", "decode"):
        if "error" in report.get(name, {}):
            lines.append(f"\n{name}: ERROR {report[name]['error']}")
    lines.append("\nBytes per token = (weights a decode step reads, embedding excluded, quantized projections as "
                 "stored for their kernel + KV cache attended) / batch; fraction = bytes per step x steps/s / "
                 "measured copy bandwidth.")
    lines.append("Targets: training >= 50% MFU; bf16 batch-1 decode >= 85% of the measured bandwidth; "
                 "int4 >= 2.5x bf16 tokens/s.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shape (CPU works): checks the script runs")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default $OUT or benchmarks/results)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 450)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["training", "decode"])
    args = parser.parse_args(argv)
    out = args.out or Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    budget = Budget(args.budget or (120 if args.smoke else 450))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if not args.smoke and device.type != "cuda":
        print("no CUDA device: run with --smoke for the CPU check", file=sys.stderr)
        return 2
    if args.smoke:
        torch.set_num_threads(1)
    report = {"smoke": args.smoke, "started": time.time()}

    def section(name, fn):
        t = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as error:
            report[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
        report[name]["seconds"] = time.perf_counter() - t
        print(f"[{name}] {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)

    section("machine", lambda: section_machine(device, args.smoke))
    machine = report["machine"]
    if "error" not in machine:
        if "training" not in args.skip:
            section("training", lambda: section_training(device, machine, args.smoke, budget))
        if "decode" not in args.skip:
            section("decode", lambda: section_decode(device, machine, args.smoke, budget))
    text = markdown(report)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_bench.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_bench.md").write_text(text)
    print(f"wrote {out / 'gpu_bench.json'} and {out / 'gpu_bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

