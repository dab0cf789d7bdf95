"""The timing and memory helpers every benchmarks/gpu_bench.py row uses, and the machine row
(device, measured matmul FLOP/s and copy bandwidth, free memory, host memory)."""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

from benchmarks.gpu_bench_report import Budget
from benchmarks.machine import describe, measure_matmul_flops, measure_memory_bandwidth

# Dense bf16 datasheet peaks (no sparsity), FLOP/s, by device-name fragment.
DATASHEET_BF16 = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 NVL": 835e12,
                  "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12}


# ---- small helpers ---------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def timed(fn, device: torch.device, repeats: int, budget: Budget | None = None, reserve: float = 0.0) -> list[float]:
    """Seconds per call, with CUDA events on a GPU and perf_counter on CPU. Stops after the
    first call once less than `reserve` seconds of the budget would be left after another."""
    times: list[float] = []
    for _ in range(repeats):
        if times and budget is not None and budget.left() - max(times) < reserve:
            break
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


def host_meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (values given in kB), {} where there is none."""
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except (OSError, ValueError):
        pass
    return out


# ---- machine ---------------------------------------------------------------------------------------


def section_machine(device: torch.device, smoke: bool) -> dict:
    name = describe(device)
    out = {
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "matmul_bf16_flops": measure_matmul_flops(torch.bfloat16, 256 if smoke else None, device),
        "bandwidth": measure_memory_bandwidth(16 if smoke else None, device),
        "datasheet_bf16_flops": datasheet_peak(name),
        "host_meminfo": host_meminfo(),
    }
    if device.type == "cuda":
        free_memory(device)  # the measurement buffers above go back before counting free memory
        free, total = torch.cuda.mem_get_info(device)
        out.update(device_free=free, device_total=total)
    return out
