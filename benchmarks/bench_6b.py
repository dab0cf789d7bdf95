"""GPT-J 6B at its real size on one machine: load, memory, first token and decode, per precision.

    python -m benchmarks.bench_6b                       # full 6B (writes /work/ckpt-6b once)
    python -m benchmarks.bench_6b --layers 2            # 6B width, 2 layers: a quick check
    python -m benchmarks.bench_6b --only int4 --only int4-prequantized
    python -m benchmarks.bench_6b --smoke --dir /tmp/x  # a tiny shape, seconds (the test suite)

A random checkpoint in the Hugging Face layout (bf16 shards of ~2 GB + index, config.json,
GPT-2 tokenizer) is written shard by shard and reused when present. Every row runs in a fresh
process: load time, peak RSS (the child's ru_maxrss, load included), time to first token of a
32-token prompt (the first request after loading, and again warm), decode tokens/s at batch 1
and 16, bytes read per decode step and the fraction of the read bandwidth measured in the same
run (a sum over a 2 GiB tensor with the same threads). Rows: bf16, int8, int4 (quantized while
loading), int4-prequantized (`gptj-quantize` output, written once), transformers
bf16 and CTranslate2 int8 when installed. Two more rows on the int4 checkpoint have tables of
their own: server-int4 (run_server.py under 1 and 16 concurrent requests: benchmarks/bench_6b_server.py)
and qlora-int4 (LoRA rank 8 training steps against the planner's memory prediction:
benchmarks/bench_6b_qlora.py). A row that cannot fit is one line (the fit check's).
JSON and markdown are rewritten after every row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("bf16", "int8", "int4", "w8a8", "int4-prequantized", "transformers-bf16", "ctranslate2-int8", "server-int4",
        "qlora-int4")
PREQUANTIZED = ("int4-prequantized", "server-int4", "qlora-int4")  # rows on the stored int4 checkpoint
QUANTIZE = {"bf16": None, "int8": "int8", "int4": "int4", "w8a8": "w8a8", "int4-prequantized": None}
# The bf16 row keeps its name's precision (fp32 6B would not fit 24 GB); the quantized rows run
# in what `--precision auto` picks, as a user's would: bf16 where the CPU has native bf16
# matmuls, fp32 where it has not (AVX2), where bf16 prefill and attention run several times slower.
PRECISION = {"bf16": "bf16"}
PEAK_PRECISIONS = ("bf16", "fp32")  # matmul peaks measured beside the bandwidth
DEFAULT_DIR = Path("/work/ckpt-6b")
GiB = 2**30


# ---- the child: one row, one process ----------------------------------------------------------
def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _prompts(vocab: int, rows: int, length: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(0, min(vocab, 50257), (rows, length), generator=g).tolist()


def measure_bandwidth(megabytes: int, matmul: bool = True) -> dict:
    """Read bandwidth: the best of several sums over one large fp32 tensor; and the bf16 and
    fp32 matmul peaks (2048^3 products, seconds of them: left out of the smoke run), so that a
    prefill compares with the peak of the precision it ran in."""
    import torch

    from benchmarks.machine import measure_matmul_flops
    from gptj.execution.runtime.precision import DTYPES

    x = torch.ones(megabytes * 2**20 // 4)
    x.sum()
    best = min(_timed(x.sum) for _ in range(5))
    out = {"read_bandwidth_GBps": x.numel() * 4 / best / 1e9}
    if matmul:
        for name in PEAK_PRECISIONS:
            out[f"{name}_matmul_GFLOPs"] = measure_matmul_flops(DTYPES[name], budget_s=10.0) / 1e9
    return out


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_ours(model_dir: str, quantize: str | None, shape: dict, precision: str = "auto") -> dict:
    import torch

    from benchmarks.bench_generation import weight_bytes_per_step
    from gptj.execution.inference.generation import GenerationEngine
    from gptj.execution.inference.pipelines import load_model_and_tokenizer
    from gptj.execution.runtime.precision import dtype_name

    start = time.perf_counter()
    model, _ = load_model_and_tokenizer(model_dir, precision=precision, device="cpu", quantize=quantize)
    out = {"load_s": time.perf_counter() - start, "load_peak_rss": _peak_rss(),
           "precision": dtype_name(model.dtype)}
    engine = GenerationEngine(model)
    prompts = _prompts(model.config.vocab_size, shape["batch"], shape["prompt_tokens"])
    new = shape["new_tokens"]
    with torch.inference_mode():
        for key in ("ttft_s", "ttft_warm_s"):
            engine.run(prompts[:1], 1, None)
            out[key] = engine.stats.time_to_first_token
        engine.run(prompts[:1], new, None)
        out["decode_b1_tok_s"] = engine.stats.decode_tokens_per_second
        engine.run(prompts, new, None, batch_size=len(prompts))
        out[f"decode_b{len(prompts)}_tok_s"] = engine.stats.decode_tokens_per_second
        long = shape.get("prefill_tokens", 0)
        if long:  # one long prompt's first token: the prefill, at compute speed or not
            # Twice: the first time a process meets this many rows, the probe may time the
            # quantized layers' paths (once per CPU kind: the choice is cached on disk).
            for key in ("prefill_first_s", "prefill_s"):
                engine.run(_prompts(model.config.vocab_size, 1, long), 1, None)
                out[key] = engine.stats.time_to_first_token
            out["prefill_tokens"] = long
            out["prefill_GFLOPs"] = prefill_flops(model.config, long) / out["prefill_s"] / 1e9
    cache = engine.cache.layers[0].keys.element_size()
    kv = 2 * model.config.num_layers * model.config.hidden_size * cache * (shape["prompt_tokens"] + new // 2)
    out["bytes_per_token"] = weight_bytes_per_step(model) + kv
    out["kernels"] = sorted({m.kernel_name for m in model.modules() if hasattr(m, "kernel_name")})
    out["paths"] = chosen_paths()
    return out


def chosen_paths() -> dict[str, list[str]]:
    """The matmul paths the probe chose in this process, by row bucket ("rows<=512": the
    prefill's; "rows<=1": batch-1 decode's)."""
    from gptj.model import matmul_probe

    paths: dict[str, set[str]] = {}
    for key, record in matmul_probe.chosen().items():
        bucket = next(part for part in key.split() if part.startswith("rows<="))
        paths.setdefault(bucket, set()).add(record["path"])
    return {bucket: sorted(names) for bucket, names in sorted(paths.items(), key=lambda i: int(i[0][6:]))}


def prefill_flops(config, tokens: int) -> float:
    """Matmul FLOPs of a prompt's forward: 2 x the block projections' weights per token, the
    attention scores and values (causal: half the square), lm_head for the last token only."""
    d, layers = config.hidden_size, config.num_layers
    projections = layers * (4 * d * d + 2 * d * config.ffn_dim)
    attention = layers * 2 * d * tokens * (tokens + 1) / 2
    return 2 * (projections * tokens + attention + config.vocab_size * d)


def measure_transformers(model_dir: str, shape: dict) -> dict:
    import torch
    from transformers import GPTJForCausalLM

    from gptj.execution.runtime.memory_fit import check_model

    check_model(model_dir, precision="bf16")  # one line, not an out-of-memory kill
    start = time.perf_counter()
    model = GPTJForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    out = {"load_s": time.perf_counter() - start, "load_peak_rss": _peak_rss(), "precision": "bf16"}
    prompts = torch.tensor(_prompts(model.config.vocab_size, shape["batch"], shape["prompt_tokens"]))
    new = shape["new_tokens"]

    def generate(ids, tokens):
        return _timed(lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                             min_new_tokens=tokens, do_sample=False, pad_token_id=0))

    with torch.inference_mode():
        out["ttft_s"] = generate(prompts[:1], 1)
        out["ttft_warm_s"] = generate(prompts[:1], 1)
        out["decode_b1_tok_s"] = (new - 1) / max(1e-9, generate(prompts[:1], new) - out["ttft_warm_s"])
        first = generate(prompts, 1)
        out[f"decode_b{len(prompts)}_tok_s"] = len(prompts) * (new - 1) / max(1e-9, generate(prompts, new) - first)
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "wte" not in n)
    cfg = model.config
    out["bytes_per_token"] = weights + 2 * cfg.n_layer * cfg.n_embd * 2 * (shape["prompt_tokens"] + new // 2)
    return out


def measure_ctranslate2(model_dir: str, shape: dict, threads: int) -> dict:
    try:
        import ctranslate2
    except ImportError:
        return {"error": "not installed"}
    converted = Path(f"{model_dir}-ct2-int8")
    if not (converted / "model.bin").is_file():
        return {"error": f"{converted} was not converted (see the conversion line)"}
    start = time.perf_counter()
    generator = ctranslate2.Generator(str(converted), device="cpu", compute_type="int8", intra_threads=threads)
    out = {"load_s": time.perf_counter() - start, "load_peak_rss": _peak_rss(), "precision": "int8 compute"}
    names = _token_names(Path(model_dir))
    tokens = [[names[i] for i in p] for p in _prompts(len(names), shape["batch"], shape["prompt_tokens"])]
    new = shape["new_tokens"]

    def generate(batch, n):
        return _timed(lambda: generator.generate_batch(batch, max_length=n, min_length=n, sampling_topk=1,
                                                       include_prompt_in_result=False))

    out["ttft_s"] = generate(tokens[:1], 1)
    out["ttft_warm_s"] = generate(tokens[:1], 1)
    out["decode_b1_tok_s"] = (new - 1) / max(1e-9, generate(tokens[:1], new) - out["ttft_warm_s"])
    first = generate(tokens, 1)
    out[f"decode_b{len(tokens)}_tok_s"] = len(tokens) * (new - 1) / max(1e-9, generate(tokens, new) - first)
    long = shape.get("prefill_tokens", 0)
    if long:  # the same long prompt's first token as our rows (int8 x int8 arithmetic)
        out["prefill_tokens"], out["prefill_s"] = long, generate([[names[i] for i in _prompts(len(names), 1, long)[0]]], 1)
        config = json.loads((Path(model_dir) / "config.json").read_text())
        from gptj.model import ModelConfig

        out["prefill_GFLOPs"] = prefill_flops(ModelConfig.from_hf(config), long) / out["prefill_s"] / 1e9
    # Its int8 weights as written, less the embedding (int8, one row read a token): the bytes a step reads.
    vocab, width = len(names), json.loads((Path(model_dir) / "config.json").read_text())["n_embd"]
    out["bytes_per_token"] = (converted / "model.bin").stat().st_size - vocab * width
    return out


CONVERT_SCRIPT = """
import json, resource, sys, time
import ctranslate2
start = time.perf_counter()
ctranslate2.converters.TransformersConverter(sys.argv[1]).convert(sys.argv[2], quantization="int8", force=True)
print(json.dumps({"convert_s": time.perf_counter() - start,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def convert_ctranslate2(model_dir: Path, args) -> dict:
    """CTranslate2's int8 copy of the checkpoint, converted once in its own process (so the row's
    peak RSS is that of serving it, not of the conversion, which loads the float model whole)."""
    output = Path(f"{model_dir}-ct2-int8")
    if (output / "model.bin").is_file():
        return {"reused": True}
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        return {"error": "ctranslate2 not installed"}
    return _run_json([sys.executable, "-c", CONVERT_SCRIPT, str(model_dir), str(output)], args.timeout)


def _token_names(model_dir: Path) -> list[str]:
    """Token strings by id (CTranslate2 takes tokens, not ids), from vocab.json or tokenizer.json."""
    file = model_dir / "vocab.json"
    vocab = json.loads(file.read_text()) if file.is_file() else \
        json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]
    return [name for name, _ in sorted(vocab.items(), key=lambda item: item[1])]


def measure_server_row(model_dir: str, shape: dict, threads: int) -> dict:
    import httpx

    from benchmarks.bench_6b_server import CONCURRENCY, measure_server

    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    try:
        return measure_server(model_dir, shape, threads, _prompts(vocab, CONCURRENCY, shape["prompt_tokens"]))
    except (RuntimeError, httpx.HTTPError) as err:  # the server's last line (a fit check), a refused request
        return {"error": str(err).splitlines()[0]}


def measure_qlora_row(model_dir: str, shape: dict, threads: int) -> dict:
    """The training row, or one line when the planner says it cannot fit in the memory free now."""
    from benchmarks.bench_6b_qlora import measure_qlora, predicted

    need = predicted(model_dir, shape, recompute=False)["predicted_peak"]
    available = mem_available() * GiB
    if need > available:
        return {"error": f"QLoRA needs {need / GiB:.1f} GiB (planner) but {available / GiB:.1f} GiB is available"}
    return measure_qlora(model_dir, shape, threads)


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    shape = json.loads(args.shape)
    try:
        if args.child == "bandwidth":
            result = measure_bandwidth(shape["bandwidth_MiB"], shape.get("prefill_tokens", 0) > 16)
        elif args.child == "transformers-bf16":
            result = measure_transformers(args.model, shape)
        elif args.child == "ctranslate2-int8":
            result = measure_ctranslate2(args.model, shape, args.threads)
        elif args.child == "server-int4":
            result = measure_server_row(args.model, shape, args.threads)
        elif args.child == "qlora-int4":
            result = measure_qlora_row(args.model, shape, args.threads)
        else:
            result = measure_ours(args.model, QUANTIZE[args.child], shape, PRECISION.get(args.child, "auto"))
    except (ValueError, MemoryError) as err:  # the fit check's line, a bad checkpoint
        result = {"error": str(err).splitlines()[0]}
    return {**result, "peak_rss": _peak_rss()}


# ---- the parent: checkpoint, rows, report -----------------------------------------------------
def run_child(kind: str, model: str, args, shape: dict) -> dict:
    """One row in a fresh interpreter; its result line, or the reason there is none."""
    command = [sys.executable, "-m", "benchmarks.bench_6b", "--child", kind, "--model", model,
               "--threads", str(args.threads), "--shape", json.dumps(shape)]
    return _run_json(command, args.timeout)


def _run_json(command: list[str], timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        try:
            subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=err, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        out.seek(0)
        err.seek(0)
        lines = [line for line in out.read().splitlines() if line.startswith("{")]
        if lines:
            return json.loads(lines[-1])
        tail = [line for line in err.read().splitlines() if line.strip()]
        return {"error": f"no result: {tail[-1] if tail else 'killed (out of memory?)'}"}


def prequantize(model_dir: Path, args) -> tuple[Path, dict]:
    """The int4 checkpoint `gptj-quantize` writes, written once beside the source."""
    output = model_dir.with_name(model_dir.name + "-int4")
    if output.exists():
        return output, {"reused": True}
    command = [sys.executable, "-c", QUANTIZE_SCRIPT, str(model_dir), str(output)]
    start = time.perf_counter()
    result = _run_json(command, args.timeout)
    return output, {**result, "quantize_s": time.perf_counter() - start}


QUANTIZE_SCRIPT = """
import json, resource, sys
from gptj.commands.quantize import main
code = main(["--model", sys.argv[1], "--quantize", "int4", "--output", sys.argv[2], "--no-progress"])
print(json.dumps({"exit": code, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def warm_page_cache(directory: Path) -> float:
    """Read every file of `directory` once (the page cache then holds it, memory allowing): the
    seconds that took, the disk's part of a cold load."""
    start = time.perf_counter()
    for file in sorted(directory.iterdir()):
        if file.is_file():
            with open(file, "rb", buffering=0) as f:
                while f.read(64 << 20):
                    pass
    return time.perf_counter() - start


def model_config(args):
    from gptj.model import ModelConfig

    if args.smoke:
        return ModelConfig.preset("tiny")
    config = ModelConfig.preset("gptj-6b")
    return config.replace(num_layers=args.layers) if args.layers else config


def shape_of(args) -> dict:
    qlora = {"rank": 8, "group_size": 128, "seq": 32 if args.smoke else 256, "steps": args.qlora_steps}
    if args.smoke:
        return {"prompt_tokens": 8, "new_tokens": 4, "batch": 4, "bandwidth_MiB": 64, "prefill_tokens": 16,
                "server_tokens": args.server_tokens or 8, "qlora": qlora}
    return {"prompt_tokens": 32, "new_tokens": args.new_tokens, "batch": 16, "bandwidth_MiB": 2048,
            "prefill_tokens": 512,
            "server_tokens": args.server_tokens or (64 if args.layers else 256), "qlora": qlora}


def ensure_checkpoints(args, needs_prequantized: bool) -> tuple[Path, dict]:
    from benchmarks.random_checkpoint import GPT2_TOKENIZER, ensure_checkpoint

    config = model_config(args)
    directory = Path(args.dir) if args.dir else (
        DEFAULT_DIR if not args.layers else DEFAULT_DIR.with_name(f"{DEFAULT_DIR.name}-L{args.layers}"))
    tokenizer = Path(args.tokenizer) if args.tokenizer else (None if args.smoke else GPT2_TOKENIZER)
    start = time.perf_counter()
    directory, written = ensure_checkpoint(directory, config, tokenizer=tokenizer,
                                           log=lambda line: print(line, flush=True))
    info = {"dir": str(directory), "written_now": written, "write_s": time.perf_counter() - start,
            "parameters": config.num_parameters()}
    if needs_prequantized:
        int4_dir, info["prequantize"] = prequantize(directory, args)
        info["int4_dir"] = str(int4_dir)
    return directory, info


def row_line(row: dict, bandwidth: float) -> str:
    """One markdown table row; bytes per token x b1 tokens/s over the measured read bandwidth."""
    from benchmarks.bench_6b_qlora import qlora_line
    from benchmarks.bench_6b_server import server_line

    if row["row"] in OWN_TABLES:
        return {"server-int4": server_line, "qlora-int4": qlora_line}[row["row"]](row)
    if "error" in row and "decode_b1_tok_s" not in row:
        return f"| {row['row']} | {row['error']} ||||||||||"
    b16 = next((v for k, v in row.items() if k.startswith("decode_b") and k != "decode_b1_tok_s"), 0.0)
    fraction = row["bytes_per_token"] * row["decode_b1_tok_s"] / (bandwidth * 1e9) if "bytes_per_token" in row \
        and bandwidth else None
    row["bandwidth_fraction"] = fraction
    return (f"| {row['row']} | {row.get('precision', '')} | {row['load_s']:.1f} | {row['load_peak_rss'] / GiB:.2f} | {row['peak_rss'] / GiB:.2f} "
            f"| {row['ttft_s']:.2f} | {row['ttft_warm_s']:.2f} | {row['decode_b1_tok_s']:.2f} | {b16:.1f} "
            f"| {row.get('bytes_per_token', 0) / 1e9:.2f} | "
            + (f"{100 * fraction:.0f}%" if fraction is not None else "") + " |")


def _server_header() -> list[str]:
    from benchmarks.bench_6b_server import SERVER_HEADER

    return SERVER_HEADER


def _qlora_header() -> list[str]:
    from benchmarks.bench_6b_qlora import QLORA_HEADER

    return QLORA_HEADER


OWN_TABLES = {"server-int4": _server_header, "qlora-int4": _qlora_header}


def write_report(report: dict, out: Path) -> None:
    bandwidth = report.get("read_bandwidth_GBps", 0.0)
    lines = [f"# {report['model']}", "", f"CPU: {report['cpu']}; read bandwidth "
             f"{bandwidth:.1f} GB/s (sum over {report['shape']['bandwidth_MiB']} MiB); prompt "
             f"{report['shape']['prompt_tokens']} tokens, {report['shape']['new_tokens']} new, batch "
             f"{report['shape']['batch']}; MemAvailable at start {report['mem_available_GiB']:.1f} GiB"]
    decode_rows = [row for row in report["rows"] if row["row"] not in OWN_TABLES]
    if decode_rows:
        lines += ["", "| row | activations | load s | peak RSS after load GiB | peak RSS GiB | first token s | warm first token s "
                  f"| decode b1 tok/s | decode b{report['shape']['batch']} tok/s | GB read per token "
                  "| of read bandwidth |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [row_line(row, bandwidth) for row in decode_rows]
    best_float = max(((report.get(f"{p}_matmul_GFLOPs") or 0.0, p) for p in PEAK_PRECISIONS), default=(0.0, ""))
    for row in decode_rows:
        precision = row.get("precision", "bf16")
        # A row in int8 arithmetic (CTranslate2) is set against the best float peak.
        peak, peak_name = (report.get(f"{precision}_matmul_GFLOPs"), precision) if precision in PEAK_PRECISIONS \
            else best_float
        if "prefill_s" in row and peak:
            chosen = row.get("paths", {}).get(f"rows<={row['prefill_tokens']}")
            first = f" (the process's first: {row['prefill_first_s']:.2f} s)" if "prefill_first_s" in row else ""
            lines.append(f"\n{row['row']}: a {row['prefill_tokens']}-token prompt's first token in {row['prefill_s']:.2f} s{first}, "
                         f"{row['prefill_GFLOPs']:.0f} GFLOP/s (matmul FLOPs), {100 * row['prefill_GFLOPs'] / peak:.0f}% of "
                         f"the {peak_name} matmul peak measured in the same run ({peak:.0f} GFLOP/s, 2048^3)"
                         + (f"; quantized layers' path: {', '.join(chosen)}" if chosen else ""))
    for name, header in OWN_TABLES.items():
        rows = [row for row in report["rows"] if row["row"] == name]
        if rows:
            lines += ["", *header(), *(row_line(row, bandwidth) for row in rows)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def mem_available() -> float:
    from gptj.execution.runtime.memory_fit import available_bytes

    found = available_bytes("cpu")
    return found[0] / GiB if found else float("nan")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="GPT-J 6B on one machine: every precision, each in a fresh process.")
    p.add_argument("--dir", help=f"the random checkpoint (written when absent; default {DEFAULT_DIR}, "
                                 "or DIR-L{N} with --layers)")
    p.add_argument("--layers", type=int, help="a reduced-depth model of 6B width (e.g. 2) for a quick check")
    p.add_argument("--only", action="append", choices=ROWS, help="run only this row (repeatable)")
    p.add_argument("--out", help="JSON report path (markdown beside it; default benchmarks/results/bench_6b*.json)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--server-tokens", type=int, help="new tokens per server-int4 request (default 256; "
                                                      "64 with --layers, 8 with --smoke)")
    p.add_argument("--qlora-steps", type=int, default=3, help="optimizer steps of the qlora-int4 row (>= 2)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per row")
    p.add_argument("--tokenizer", help="a GPT-2 vocab.json + merges.txt directory (default ../shared/data/gpt2)")
    p.add_argument("--smoke", action="store_true", help="a tiny model and shape: proves the script runs")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return 0
    for option, value, least in (("--layers", args.layers, 1), ("--server-tokens", args.server_tokens, 1),
                                 ("--qlora-steps", args.qlora_steps, 2)):
        if value is not None and value < least:
            print(f"error: {option} must be >= {least}, got {value}", file=sys.stderr)
            return 2
    from benchmarks.machine import cpu_features, describe

    rows = args.only or list(ROWS)
    shape = shape_of(args)
    try:
        directory, info = ensure_checkpoints(args, any(row in PREQUANTIZED for row in rows))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    name = "tiny" if args.smoke else f"GPT-J 6B{f' ({args.layers} layers)' if args.layers else ''}"
    suffix = "-smoke" if args.smoke else (f"-L{args.layers}" if args.layers else "")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"bench_6b{suffix}.json"
    import torch

    torch.set_num_threads(args.threads)
    report = {"model": name, "cpu": " ".join([describe(), *cpu_features()]), "threads": args.threads, "shape": shape, "checkpoint": info,
              "mem_available_GiB": mem_available(), "rows": []}
    bandwidth = run_child("bandwidth", "", args, shape)
    report["read_bandwidth_GBps"] = bandwidth.get("read_bandwidth_GBps", 0.0)
    for precision in PEAK_PRECISIONS:
        report[f"{precision}_matmul_GFLOPs"] = bandwidth.get(f"{precision}_matmul_GFLOPs")
    print(f"read bandwidth {report.get('read_bandwidth_GBps', 0):.1f} GB/s with {args.threads} threads", flush=True)
    for row in rows:
        model = info.get("int4_dir", "") if row in PREQUANTIZED else str(directory)
        if row == "ctranslate2-int8":
            info["ctranslate2"] = convert_ctranslate2(directory, args)
        if row == "int4-prequantized":  # its load is measured from a warm page cache (the goal's terms)
            info["int4_page_cache_fill_s"] = warm_page_cache(Path(model))
        result = {"row": row, **run_child(row, model, args, shape)}
        report["rows"].append(result)
        write_report(report, out)
        print(row_line(dict(result), report.get("read_bandwidth_GBps", 0.0)), flush=True)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
