"""Every benchmark in one run: this project against Hugging Face on the same machine.

    python -m benchmarks.run_all            # full run (a few minutes on 2 CPU cores)
    python -m benchmarks.run_all --quick    # tiny shapes, < 60 s: checks the suite works

Measures the machine's limits first (matmul FLOP/s in fp32 and bf16, memory bandwidth; again at
the end, keeping the best of the two), then
training (bench_training), generation (bench_generation) and the data layer (bench_data) when
those files exist, prints one table (ours, theirs, ratio, fraction of the machine's limit) and
writes everything to benchmarks/results/latest.json (or --out).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "latest.json"

# What this project promises on a CPU machine (speed is reported, never asserted in tests).
TARGETS = {
    "train_best_ratio": 1.5,
    "train_fp32_ratio": 1.0,
    "decode_b1_ratio": 2.5,
    "decode_b1_bandwidth_fraction": 0.8,
    "decode_b16_ratio": 2.0,
}


def _optional(name: str):
    """Import benchmarks.<name> if the file exists; None (with the reason) when it does not."""
    if not (HERE / f"{name}.py").exists():
        return None, f"benchmarks/{name}.py not present: skipped"
    return importlib.import_module(f"benchmarks.{name}"), None


def _section(name: str, fn) -> dict:
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as error:  # one broken section must not hide the others
        result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
    if isinstance(result, dict):
        result["section_seconds"] = time.perf_counter() - start
    print(f"[{name}] done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return result


def run_generation(quick: bool) -> dict:
    module, skipped = _optional("bench_generation")
    if module is None:
        return {"skipped": skipped}
    return module.run(quick=quick)


def run_data(quick: bool) -> dict:
    module, skipped = _optional("bench_data")
    if module is None:
        return {"skipped": skipped}
    params = inspect.signature(module.run).parameters
    if quick and "repeats" in params:
        return module.run(repeats=1)
    return module.run()


def _best(results: list[dict], impl: str) -> dict | None:
    ok = [r for r in results if r.get("impl") == impl and "error" not in r]
    return max(ok, key=lambda r: r["tokens_per_s"], default=None)


def _find(results: list[dict], impl: str, precision: str) -> dict | None:
    return next((r for r in results if r.get("impl") == impl and r.get("precision") == precision
                 and "error" not in r), None)


def _row(metric, ours, theirs, ratio, limit=None, note="") -> dict:
    return {"metric": metric, "ours": ours, "theirs": theirs, "ratio": ratio, "limit_fraction": limit, "note": note}


def build_table(report: dict) -> list[dict]:
    rows = []
    training = report.get("training", {})
    results = training.get("results", [])
    ours32, hf32 = _find(results, "ours", "fp32"), _find(results, "hf", "fp32")
    if ours32 and hf32:
        rows.append(_row("train tok/s fp32", ours32["tokens_per_s"], hf32["tokens_per_s"],
                         ours32["tokens_per_s"] / hf32["tokens_per_s"], ours32.get("mfu"), "limit = MFU vs fp32 matmul"))
        rows.append(_row("train peak MiB fp32", ours32["peak_memory_bytes"] / 2**20, hf32["peak_memory_bytes"] / 2**20,
                         ours32["peak_memory_bytes"] / hf32["peak_memory_bytes"], None, "ratio < 1: ours smaller"))
    ours_best, hf_best = _best(results, "ours"), _best(results, "hf")
    if ours_best and hf_best:
        label = f"ours {ours_best['precision']} / hf {hf_best['precision']}"
        rows.append(_row("train tok/s best", ours_best["tokens_per_s"], hf_best["tokens_per_s"],
                         ours_best["tokens_per_s"] / hf_best["tokens_per_s"], ours_best.get("mfu"), label))
        rows.append(_row("train peak MiB best", ours_best["peak_memory_bytes"] / 2**20,
                         hf_best["peak_memory_bytes"] / 2**20,
                         ours_best["peak_memory_bytes"] / hf_best["peak_memory_bytes"], None, label))
    generation = report.get("generation", {})
    # bench_generation measures bandwidth itself, at another moment; rescale its fraction to the
    # limit measured at the start of this run so every "of limit" uses the same number.
    rescale = 1.0
    if generation.get("memory_bandwidth_GBps") and report.get("machine", {}).get("memory_bandwidth"):
        rescale = generation["memory_bandwidth_GBps"] * 1e9 / report["machine"]["memory_bandwidth"]
    for name, case in generation.get("cases", {}).items():
        ours, hf = case.get("ours_best"), case.get("hf_best")
        if not ours or not hf:
            continue
        fraction = case["ours"].get(ours["precision"], {}).get("bandwidth_fraction")
        fraction = fraction * rescale if fraction is not None else None
        rows.append(_row(f"generate tok/s {name}", ours["tokens_per_s"], hf["tokens_per_s"], case["ratio"], fraction,
                         f"ours {ours['precision']} / hf {hf['precision']}"
                         + ("; limit = decode bytes/s vs memory bandwidth" if fraction is not None else "")))
    data = report.get("data", {})
    if "ours_tokens_per_s" in data:
        rows.append(_row("data tok/s (load+tokenize+pack)", data["ours_tokens_per_s"],
                         data["ours_tokens_per_s"] / data["speedup"], data["speedup"], None, "theirs = datasets.map"))
    return rows


def check_targets(table: list[dict]) -> dict:
    by_metric = {r["metric"]: r for r in table}

    def ratio(metric):
        return by_metric[metric]["ratio"] if metric in by_metric else None

    b1 = by_metric.get("generate tok/s batch1", {})
    measured = {
        "train_best_ratio": ratio("train tok/s best"),
        "train_fp32_ratio": ratio("train tok/s fp32"),
        "decode_b1_ratio": ratio("generate tok/s batch1"),
        "decode_b1_bandwidth_fraction": b1.get("limit_fraction"),
        "decode_b16_ratio": ratio("generate tok/s batch16"),
    }
    return {k: {"target": TARGETS[k], "measured": v, "met": None if v is None else v >= TARGETS[k]}
            for k, v in measured.items()}


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and abs(value) < 10:
        return f"{value:.2f}"
    return f"{value:,.0f}"


def format_table(report: dict) -> str:
    limits = report["machine"]
    lines = [
        f"machine: {limits['device']}; features {' '.join(limits.get('features', [])) or '-'}; "
        f"load average at start {report['load_average_start'][0]:.1f}, end {report['load_average_end'][0]:.1f}",
        limits.get("capability", ""),
        f"limits: matmul fp32 {limits['matmul_flops']['fp32'] / 1e9:.0f} GFLOP/s, bf16 "
        f"{limits['matmul_flops']['bf16'] / 1e9:.0f} GFLOP/s, memory {limits['memory_bandwidth'] / 1e9:.1f} GB/s",
        f"{'metric':34s} {'ours':>12s} {'theirs':>12s} {'ratio':>7s} {'of limit':>9s}  note",
    ]
    for r in report["table"]:
        limit = "-" if r["limit_fraction"] is None else f"{100 * r['limit_fraction']:.1f}%"
        lines.append(f"{r['metric']:34s} {_fmt(r['ours']):>12s} {_fmt(r['theirs']):>12s} "
                     f"{_fmt(r['ratio']):>7s} {limit:>9s}  {r['note']}")
    for name in ("training", "generation", "data"):
        section = report.get(name, {})
        if "error" in section:
            lines.append(f"{name}: ERROR {section['error']}")
        elif "skipped" in section:
            lines.append(f"{name}: {section['skipped']}")
    for r in report.get("training", {}).get("results", []):
        if "error" in r:
            lines.append(f"training {r['impl']} {r['precision']}: ERROR {r['error']}")
        elif r.get("note") and r["impl"] == "ours":
            lines.append(f"training ours {r['precision']}: {r['note']}")
    lines.append("targets: " + ", ".join(
        f"{k} {_fmt(v['measured'])} (>= {v['target']}) {'met' if v['met'] else ('-' if v['met'] is None else 'MISSED')}"
        for k, v in report["targets"].items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run under a minute")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    parser.add_argument("--skip", nargs="*", default=[], choices=["training", "generation", "data"],
                        help="sections to leave out")
    args = parser.parse_args(argv)

    from benchmarks import bench_training
    from benchmarks.machine import machine_limits

    report = {"quick": args.quick, "load_average_start": os.getloadavg(), "started": time.time()}
    report["machine"] = _section("machine", lambda: machine_limits(quick=args.quick))
    if "error" in report["machine"]:
        print(f"cannot measure the machine: {report['machine']['error']}", file=sys.stderr)
        return 1
    if "training" not in args.skip:
        report["training"] = _section("training", lambda: bench_training.run(args.quick, report["machine"]))
    if "generation" not in args.skip:
        report["generation"] = _section("generation", lambda: run_generation(args.quick))
    if "data" not in args.skip:
        report["data"] = _section("data", lambda: run_data(args.quick))
    report["load_average_end"] = os.getloadavg()
    # Measure the limits again at the end and keep the best of both: on a shared machine a busy
    # moment at the start would otherwise understate the limit and overstate every fraction.
    again = _section("machine (again)", lambda: machine_limits(quick=args.quick))
    if "error" not in again:
        first = report["machine"]
        report["machine_start"] = {"matmul_flops": dict(first["matmul_flops"]),
                                   "memory_bandwidth": first["memory_bandwidth"]}
        report["machine_end"] = {"matmul_flops": again["matmul_flops"], "memory_bandwidth": again["memory_bandwidth"]}
        for key, value in again["matmul_flops"].items():
            first["matmul_flops"][key] = max(first["matmul_flops"][key], value)
        first["memory_bandwidth"] = max(first["memory_bandwidth"], again["memory_bandwidth"])
        for result in report.get("training", {}).get("results", []):
            if "mfu" in result:
                key = "fp32" if result["precision"] == "fp32" else "bf16"
                result["mfu"] = result["model_flops_per_s"] / first["matmul_flops"][key]
    report["table"] = build_table(report)
    report["targets"] = check_targets(report["table"])

    text = format_table(report)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
