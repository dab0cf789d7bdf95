"""GPT-J 6B dimensions on one GPU, random bf16 weights: training MFU and decode bandwidth.

    python -m benchmarks.gpu_bench                 # on an H100/H200: ends within 7 minutes of its start
    python -m benchmarks.gpu_bench --smoke         # tiny shape on CPU, through the compiled decode path
    python -m benchmarks.gpu_bench --out DIR       # default: $OUT, else benchmarks/results
    bash benchmarks/gpu_run.sh                     # the prepared device run (env.txt, log.txt, results)

Rows run in this order, headline rows first, each in try/except (an error is recorded and the
next row runs):

1. machine: device name, measured bf16 matmul FLOP/s and device-copy bandwidth (read + write),
   free device memory, the host's /proc/meminfo.
2. headline: training without offload (ours: as many 6B-shaped blocks as the planner fits, or
   --blocks; bf16 weights + ShardedAdamW fp32 master; tokens/s and MFU, 6 M + 12 L d s FLOPs a
   token, against the measured matmul limit and the datasheet peak); bf16 decode of the full
   28-block model at batch 1 and 16, eager then with CUDA graphs; int4 decode at batch 1, eager
   then with CUDA graphs.
3. then, while the budget lasts: Hugging Face decode and training (GPTJForCausalLM, fp32 weights
   + autocast + fused AdamW on the same blocks), batch 64 and the remaining int4 rows, int8 at
   batch 1 with CUDA graphs, training with optimizer offload.

Decode rows: greedy, tokens/s and the fraction of the measured bandwidth, bytes per step = the
weights a step reads (embedding excluded, quantized projections as their kernel reads them) +
the KV cache slots the step attends (the whole cache for a compiled step). Quantized rows list
each layer's kernel and any packing the kernel refused.

int8 on CUDA (gptj.model.quantized_linear `_int8_cuda_matmul`, `F.linear(x, q.to(bf16)) * scale`) runs only at
batch 1 with CUDA graphs and inductor's coordinate-descent tuning: only there does inductor
turn the matmul into a reduction that reads the int8 weight directly; at more rows, or eager,
it writes a bf16 copy of the weight first (~5 bytes a weight), a detour not worth the budget.

Compiled rows: `torch._dynamo.reset()` before each (every engine compiles the same decode
function: without it the ninth configuration would hit dynamo's recompile limit), and each row
records its compiled frames, recompiles, graph breaks and inductor's cudagraph skips; a row
that asked for CUDA graphs fails when inductor skipped them.

Time budget (--budget, default 420 s counted from this process's start, or from --since): a
row starts only when its estimated cost fits in what is left, training steps stop early when
time runs short, and at the deadline a watchdog records the row in flight as stopped, writes the
files and exits with code 3. gpu_bench.json and gpu_bench.md are rewritten (atomically) after
every row, so a kill keeps every row measured before it; "complete" turns true at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.gpu_bench_bytes import (
    decode_step_bytes,
    hf_decode_bytes_per_step,
    layer_kernels,
    model_weight_bytes,  # noqa: F401  (re-exported)
)
from benchmarks.gpu_bench_compile import (
    compile_counters,  # noqa: F401  (re-exported)
    compile_report,
    configure_compiler,
    decode_step_compilations,  # noqa: F401  (re-exported)
    prepare_compiled_row,
)
from benchmarks.gpu_bench_machine import (
    DATASHEET_BF16,  # noqa: F401  (re-exported)
    datasheet_peak,  # noqa: F401  (re-exported)
    free_memory,
    host_meminfo,
    random_init,
    section_machine,
    sync,
    timed,
)
from benchmarks.gpu_bench_report import (
    EXIT_BUDGET,  # noqa: F401  (re-exported)
    Budget,
    GiB,
    Report,
    markdown,
    process_start_time,
    start_watchdog,
)
from gptj.model import GPTJ, ModelConfig

DEFAULT_BUDGET_S = 420.0  # 7 minutes from the process start
SMOKE_BUDGET_S = 300.0


# ---- the models decode rows share ------------------------------------------------------------------


class Models:
    """Models built on first use and kept for the following rows; `clear` frees them."""

    def __init__(self, config: ModelConfig, device: torch.device):
        self.config, self.device, self._held = config, device, {}

    def get(self, kind: str):
        if kind not in self._held:
            self._held[kind] = self._build(kind)
        return self._held[kind]

    def _build(self, kind: str):
        if kind == "bf16":
            return random_init(GPTJ(self.config, dtype=torch.bfloat16, device=self.device)).eval()
        if kind in ("int8", "int4"):
            from gptj.execution.runtime.model_loading import load_model
            from gptj.model.quantized_linear import QuantSpec

            return load_model(self.get("bf16"), quantize=QuantSpec(int(kind[3:]), 128)).model
        if kind == "hf":
            from transformers import GPTJForCausalLM

            with torch.device(self.device):
                hf = GPTJForCausalLM._from_config(self.config.to_hf(), dtype=torch.bfloat16)
            return random_init(hf).eval()
        raise ValueError(f"unknown model kind {kind!r}")

    def clear(self) -> None:
        self._held.clear()
        free_memory(self.device)


@dataclass
class Bench:
    """What every row needs: the device, shapes, measured limits, shared models, the budget."""

    device: torch.device
    smoke: bool
    machine: dict
    budget: Budget
    blocks: int | None = None  # --blocks: training blocks instead of the planner's choice
    models: Models | None = None
    prompt_len: int = 128
    new_tokens: int = 128
    prompts: dict = field(default_factory=dict)
    training_blocks: int | None = None  # what ours without offload ran (HF trains the same)

    def __post_init__(self):
        config = self.model_config()
        self.models = Models(config, self.device)
        if self.smoke:
            self.prompt_len, self.new_tokens = 16, 8
        gen = torch.Generator().manual_seed(0)
        self.prompts = {b: torch.randint(0, config.vocab_size, (b, self.prompt_len), generator=gen).tolist()
                        for b in (1, 16, 64)}

    def model_config(self) -> ModelConfig:
        return ModelConfig.preset("tiny") if self.smoke else ModelConfig.preset("gptj-6b")


# ---- decode rows -----------------------------------------------------------------------------------


def decode_ours(model, prompts, new_tokens: int, compiled: bool):
    """Decode tokens/s and the engine that ran (after a warm-up run that compiles)."""
    from gptj.execution.inference.generation import GenerationEngine

    engine = GenerationEngine(model, compile_decode=compiled)
    engine.run(prompts, min(new_tokens, 8), None)  # warm-up (compilation, graph recording)
    engine.run(prompts, new_tokens, None)
    return engine.stats.decode_tokens_per_second, engine


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


def decode_row_ours(bench: Bench, record: dict) -> None:
    weights, batch, compiled = record["weights"], record["batch"], record["compiled"]
    model = bench.models.get(weights)
    if weights != "bf16":
        record["kernels"], record["kernels_refused"] = layer_kernels(model)
    before = prepare_compiled_row() if compiled else None
    tuning = record.get("coordinate_descent_tuning", False)
    import torch._inductor.config as inductor_config

    with inductor_config.patch(coordinate_descent_tuning=tuning):
        rate, engine = decode_ours(model, bench.prompts[batch], bench.new_tokens, compiled)
    record["compile"], failure = compile_report(before, record["cuda_graphs"]) if compiled else (None, None)
    if failure:
        record["error"] = failure
    slots = engine.stats.mean_attended_slots
    cache_element = engine.cache.layers[0].keys.element_size()
    step = decode_step_bytes(model, batch, slots, cache_element)
    _rate_fields(record, rate, batch, step["weight_bytes"] + step["kv_bytes"], bench.machine["bandwidth"])
    record.update(step, attended_slots=slots, cache_dtype=str(engine.cache.layers[0].keys.dtype))


def decode_row_hf(bench: Bench, record: dict) -> None:
    batch = record["batch"]
    rate = decode_hf(bench.models.get("hf"), bench.prompts[batch], bench.new_tokens, bench.device)
    slots = bench.prompt_len + bench.new_tokens / 2  # its cache grows: the filled slots, on average
    step = hf_decode_bytes_per_step(bench.model_config(), batch, slots)
    _rate_fields(record, rate, batch, step, bench.machine["bandwidth"])
    record["attended_slots"] = slots


def _rate_fields(record: dict, rate: float, batch: int, step_bytes: float, bandwidth: float) -> None:
    record.update(tokens_per_s=rate, bytes_per_token=step_bytes / batch,
                  bandwidth_fraction=step_bytes * (rate / batch) / bandwidth)


# ---- training rows ---------------------------------------------------------------------------------


def host_available() -> float:
    return host_meminfo().get("MemAvailable", 64 * GiB)


def choose_blocks(base: ModelConfig, seq: int, batch: int, offload: bool, device_bytes: float,
                  host_bytes: float, max_blocks: int) -> int:
    """The most blocks the planner says fit (10% margin on device and host memory)."""
    from gptj.execution.training.planner import Layout, Machine, plan_layout

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


def train_ours(config, device, batch, seq, offload: bool, steps: int, budget: Budget) -> dict:
    from gptj.execution.training.optimizer import ShardedAdamW

    model = random_init(GPTJ(config, dtype=torch.bfloat16, device=device))
    model.train()
    opt = ShardedAdamW(model, lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, max_grad_norm=1.0,
                       offload=offload)
    ids = torch.randint(0, config.vocab_size, (batch, seq + 1), device=device)

    def step():
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
        opt.step(1e-5)  # zeroes the gradients itself

    timed(step, device, 1)  # warm-up
    return {"times": timed(step, device, steps, budget, reserve=10), "peak": _peak(device)}  # model freed on return


def train_hf(config, device, batch, seq, steps: int, budget: Budget) -> dict:
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
    return {"times": timed(step, device, steps, budget, reserve=10), "peak": _peak(device)}


def _peak(device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def training_row(bench: Bench, record: dict) -> None:
    bench.models.clear()  # the decode models' memory goes to training
    base = bench.model_config()
    seq, batch = (64, 2) if bench.smoke else (1024, 4)
    impl, offload = record["impl"], record["offload"]
    blocks = _training_blocks(bench, base, seq, batch, offload, impl)
    config = base.replace(num_layers=blocks)
    steps = 2 if bench.smoke or offload else 4
    result = (train_hf(config, bench.device, batch, seq, steps, bench.budget) if impl == "hf"
              else train_ours(config, bench.device, batch, seq, offload, steps, bench.budget))
    if impl == "ours" and not offload:
        bench.training_blocks = blocks
    seconds = sorted(result["times"])[len(result["times"]) // 2]
    tokens = batch * seq
    flops = config.flops_per_token(seq) * tokens / seconds
    peak = bench.machine.get("datasheet_bf16_flops")
    record.update(blocks=blocks, parameters=config.num_parameters(), batch=batch, seq=seq,
                  steps_timed=len(result["times"]), step_seconds=seconds, tokens_per_s=tokens / seconds,
                  model_flops_per_s=flops, mfu=flops / bench.machine["matmul_bf16_flops"],
                  mfu_datasheet=flops / peak if peak else None, peak_device_bytes=result["peak"])
    bench.models.clear()


def _training_blocks(bench: Bench, base: ModelConfig, seq: int, batch: int, offload: bool, impl: str) -> int:
    if bench.blocks:
        return bench.blocks
    if impl == "hf" and bench.training_blocks:  # HF on the same blocks as ours without offload
        return bench.training_blocks
    device_bytes = bench.machine["device_free"] if bench.device.type == "cuda" else 2 * GiB
    blocks = choose_blocks(base, seq, batch, offload, device_bytes, host_available(),
                           max_blocks=2 if bench.smoke else base.num_layers)
    if blocks < 1:
        raise RuntimeError("not even one block fits in memory (--blocks N overrides the planner)")
    return blocks


# ---- the plan --------------------------------------------------------------------------------------


@dataclass
class Row:
    section: str  # "training" | "decode"
    fields: dict  # what identifies the row in the report
    cost_s: float  # seconds it needs left to start (an estimate: compilation dominates)
    run: Callable[[Bench, dict], None]

    @property
    def name(self) -> str:
        f = self.fields
        if self.section == "training":
            return f"training {f['impl']}{' offload' if f['offload'] else ''}"
        mode = "graphs" if f.get("cuda_graphs") else "compiled" if f.get("compiled") else "eager"
        return f"decode {f['impl']} {f['weights']} {mode} b{f['batch']}"


def _train(impl: str, offload: bool, cost: float) -> Row:
    return Row("training", {"impl": impl, "offload": offload}, cost, training_row)


def _decode(weights: str, batch: int, compiled: bool, cost: float, graphs: bool, **extra) -> Row:
    fields = {"impl": "ours", "weights": weights, "batch": batch, "compiled": compiled,
              "cuda_graphs": compiled and graphs, **extra}
    return Row("decode", fields, cost, decode_row_ours)


def _hf_decode(batch: int, cost: float) -> Row:
    fields = {"impl": "hf", "weights": "bf16", "batch": batch, "compiled": False, "cuda_graphs": False}
    return Row("decode", fields, cost, decode_row_hf)


def plan_rows(smoke: bool, on_cuda: bool) -> list[Row]:
    """Every row in run order: the headline rows first, then the rest by value for time."""
    if smoke:  # CPU: one compiled configuration (a cold inductor compile is slow: NOTES.md, "GPU benchmark")
        return [
            _train("ours", False, 5), _decode("bf16", 1, False, 2, False), _decode("bf16", 16, False, 2, False),
            _decode("bf16", 1, True, 5, False), _decode("int4", 1, False, 2, False),
            _decode("int8", 1, False, 2, False), _hf_decode(1, 2), _hf_decode(16, 2),
            _train("hf", False, 5), _decode("bf16", 64, False, 2, False), _decode("int4", 16, False, 2, False),
            _hf_decode(64, 2), _train("ours", True, 5),
        ]
    graphs = on_cuda
    return [
        _train("ours", False, 45),
        _decode("bf16", 1, False, 15, graphs), _decode("bf16", 16, False, 15, graphs),
        _decode("bf16", 1, True, 100, graphs), _decode("bf16", 16, True, 100, graphs),
        _decode("int4", 1, False, 20, graphs), _decode("int4", 1, True, 100, graphs),
        # the rest, while the budget lasts
        _hf_decode(1, 25), _hf_decode(16, 25), _train("hf", False, 60),
        _decode("bf16", 64, False, 15, graphs), _decode("int4", 16, False, 15, graphs),
        _decode("int4", 64, False, 15, graphs), _decode("int4", 16, True, 90, graphs),
        _decode("bf16", 64, True, 90, graphs), _decode("int4", 64, True, 90, graphs), _hf_decode(64, 30),
        _decode("int8", 1, True, 120, graphs, coordinate_descent_tuning=True),
        _train("ours", True, 120),
    ]


def row_selected(name: str, patterns: list[str] | None) -> bool:
    """--only: a pattern picks the rows whose name holds each of its words ("int4 graphs")."""
    words = set(name.split())
    return patterns is None or any(set(p.split()) <= words for p in patterns)


def run_row(bench: Bench, report: Report, row: Row) -> None:
    record = {**row.fields, "row": row.name}
    if bench.budget.left() < row.cost_s:
        record["error"] = f"skipped: time budget ({bench.budget.left():.0f} s left, needs ~{row.cost_s:.0f} s)"
        report.finish_row(row.section, record)
        return
    report.start_row(row.section, record)
    started = time.perf_counter()
    try:
        row.run(bench, record)
    except Exception as error:
        record["error"] = f"{type(error).__name__}: {error}"[:2000]
        record["traceback"] = traceback.format_exc()[-3000:]
        bench.models.clear()  # an out-of-memory row must not starve the next one
    record["seconds"] = time.perf_counter() - started
    report.finish_row(row.section, record)


# ---- main ------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shape on CPU, through the compiled decode path")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default $OUT or benchmarks/results)")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds for the whole run, start-up included (default {DEFAULT_BUDGET_S:.0f}; "
                             f"smoke {SMOKE_BUDGET_S:.0f})")
    parser.add_argument("--since", type=float, default=None,
                        help="epoch seconds the budget counts from (default: this process's start)")
    parser.add_argument("--blocks", type=int, default=None, help="training blocks (default: as many as fit)")
    parser.add_argument("--only", nargs="*", default=None,
                        help="only the rows whose name holds every word of one of these, e.g. --only "
                             "'int4 graphs' 'training ours' (names: the row field of gpu_bench.json)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["training", "decode"])
    args = parser.parse_args(argv)
    if args.blocks is not None and args.blocks < 1:
        parser.error(f"--blocks must be >= 1, got {args.blocks}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out or Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    budget = Budget(args.budget or (SMOKE_BUDGET_S if args.smoke else DEFAULT_BUDGET_S),
                    args.since or process_start_time())
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if not args.smoke and device.type != "cuda":
        print("no CUDA device: run with --smoke for the CPU check", file=sys.stderr)
        return 2
    if args.smoke:
        torch.set_num_threads(1)
    configure_compiler()
    report = Report(out, {"smoke": args.smoke, "started": time.time(), "budget_s": budget.seconds,
                          "budget_left_at_start_s": budget.left(), "argv": sys.argv[1:]})
    watchdog = start_watchdog(budget, report)
    try:
        report.set("machine", section_machine(device, args.smoke))
    except Exception as error:
        report.set("machine", {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()})
        return 1
    bench = Bench(device, args.smoke, report.data["machine"], budget, blocks=args.blocks)
    for row in plan_rows(args.smoke, device.type == "cuda"):
        if row.section in args.skip or not row_selected(row.name, args.only):
            continue
        run_row(bench, report, row)
    bench.models.clear()
    watchdog.cancel()
    report.set("complete", True)
    print(markdown(report.data))
    print(f"wrote {out / 'gpu_bench.json'} and {out / 'gpu_bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
