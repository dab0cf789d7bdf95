"""benchmarks/gpu_bench.py's time budget and its results on disk: the budget counted from the
process start, the report rewritten atomically after every row (JSON and markdown), and the
watchdog that records the row in flight and exits when the budget runs out."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

GiB = 2**30
EXIT_BUDGET = 3  # stopped at the deadline; the rows measured so far are on disk


# ---- time budget -----------------------------------------------------------------------------------


def process_start_time() -> float:
    """Epoch seconds at which this process started (from /proc), else now."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat, counted after the ")" that ends field 2
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


class Budget:
    def __init__(self, seconds: float, since: float):
        self.seconds, self.end = seconds, since + seconds

    def left(self) -> float:
        return self.end - time.time()


# ---- the report, on disk after every row -----------------------------------------------------------


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Report:
    """The results so far; `finish_row` adds a row and rewrites gpu_bench.json and .md."""

    def __init__(self, out: Path, meta: dict):
        self.out = out
        self.data = {**meta, "complete": False, "machine": {}, "training": {"runs": []},
                     "decode": {"runs": []}}
        self.lock = threading.Lock()
        self.in_flight: tuple[str, dict, float] | None = None
        out.mkdir(parents=True, exist_ok=True)

    def start_row(self, section: str, record: dict) -> None:
        with self.lock:
            self.in_flight = (section, record, time.perf_counter())

    def finish_row(self, section: str, record: dict) -> None:
        with self.lock:
            self.in_flight = None
            self.data[section]["runs"].append(record)
            self._write()
        print(f"  {section} {_brief(record)}", file=sys.stderr, flush=True)

    def set(self, key: str, value) -> None:
        with self.lock:
            self.data[key] = value
            self._write()

    def _write(self) -> None:
        _write_atomic(self.out / "gpu_bench.json", json.dumps(self.data, indent=1, default=str))
        _write_atomic(self.out / "gpu_bench.md", markdown(self.data))

    def stop_at_deadline(self) -> None:
        """Watchdog: record the row in flight as stopped, write the files, end the process."""
        got = self.lock.acquire(timeout=10)
        try:
            if self.in_flight is not None:
                section, record, started = self.in_flight
                record["error"] = (f"stopped: the time budget ran out {time.perf_counter() - started:.0f} s "
                                   "into this row")
                self.data[section]["runs"].append(record)
            self.data["stopped_at_deadline"] = True
            self._write()
        finally:
            if got:
                self.lock.release()
        print(f"time budget reached: stopped; results so far in {self.out}", file=sys.stderr, flush=True)
        os._exit(EXIT_BUDGET)


def _brief(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("traceback", "kernels")}


def start_watchdog(budget: Budget, report: Report) -> threading.Timer:
    timer = threading.Timer(max(0.0, budget.left()), report.stop_at_deadline)
    timer.daemon = True
    timer.start()
    return timer


# ---- report ----------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    m = report.get("machine", {})
    lines = [f"# GPU benchmark: {m.get('device', '?')}", ""]
    if "matmul_bf16_flops" in m:
        lines.append(f"measured: bf16 matmul {m['matmul_bf16_flops'] / 1e12:.0f} TFLOP/s, device copy "
                     f"{m['bandwidth'] / 1e9:.0f} GB/s; datasheet bf16 "
                     f"{(m['datasheet_bf16_flops'] or 0) / 1e12:.0f} TFLOP/s; torch {m['torch']}")
    if not report.get("complete"):
        lines.append("\n**incomplete**: " + ("stopped at the time budget" if report.get("stopped_at_deadline")
                                             else "still running, or killed"))
    lines += ["", "| training | blocks | params | tokens/s | MFU (measured) | MFU (datasheet) | peak GiB |",
              "|---|---|---|---|---|---|---|"]
    for r in report.get("training", {}).get("runs", []):
        name = f"{r['impl']}{' + offload' if r['offload'] else ''}"
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:100]} | | | | | |")
            continue
        ds = f"{100 * r['mfu_datasheet']:.1f}%" if r.get("mfu_datasheet") else "-"
        pk = f"{r['peak_device_bytes'] / GiB:.1f}" if r.get("peak_device_bytes") else "-"
        lines.append(f"| {name} | {r['blocks']} | {r['parameters'] / 1e9:.2f} B | {r['tokens_per_s']:,.0f} | "
                     f"{100 * r['mfu']:.1f}% | {ds} | {pk} |")
    lines += ["", "| decode | weights | batch | tokens/s | MB read per token | fraction of bandwidth | compile |",
              "|---|---|---|---|---|---|---|"]
    for r in report.get("decode", {}).get("runs", []):
        lines.append(_decode_line(r))
    if "error" in m:
        lines.append(f"\nmachine: ERROR {m['error']}")
    lines.append("\nBytes per token = (weights a decode step reads, embedding excluded, quantized projections as "
                 "their kernel reads them + the KV cache slots the step attends) / batch; fraction = bytes per "
                 "step x steps/s / measured copy bandwidth. compile: frames compiled / recompiles / graph breaks "
                 "/ cudagraph skips.")
    lines.append("Targets: training >= 50% MFU; bf16 batch-1 decode >= 85% of the measured bandwidth; "
                 "int4 >= 2.5x bf16 tokens/s.")
    return "\n".join(lines) + "\n"


def _decode_line(r: dict) -> str:
    mode = " (CUDA graphs)" if r.get("cuda_graphs") else " (compiled)" if r.get("compiled") else ""
    name = r["impl"] + mode
    refused = len(r.get("kernels_refused") or {})
    weights = r.get("weights", "bf16") + (f", {refused} layer(s) dequantize" if refused else "")
    c = r.get("compile")
    compile_text = f"{c['frames_compiled']} / {c['recompiles']} / {c['graph_breaks']} / {c['cudagraph_skips']}" if c else ""
    if "error" in r:
        return f"| {name} | {weights} | {r.get('batch', '')} | error: {r['error'][:100]} | | | {compile_text} |"
    return (f"| {name} | {weights} | {r['batch']} | {r['tokens_per_s']:,.1f} | {r['bytes_per_token'] / 1e6:,.1f} | "
            f"{100 * r['bandwidth_fraction']:.1f}% | {compile_text} |")
