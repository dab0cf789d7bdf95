"""What this machine can do at best: matmul FLOP/s per precision and memory bandwidth.

Every benchmark reports its speed as a fraction of these measured limits, so a number means
the same thing on a laptop, a 2-core CPU box or an H100. Measured, not read from a datasheet:
the datasheet is a ceiling nobody reaches, the measured limit is what a good kernel gets.
"""

from __future__ import annotations

import os
import platform
import time

import torch


def _device(device) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, device: torch.device, repeats: int, min_seconds: float) -> float:
    """Best wall time of one call over `repeats` runs (after two warm-up calls)."""
    fn()
    fn()
    _sync(device)
    best = float("inf")
    start_all = time.perf_counter()
    for i in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
        if i >= 2 and time.perf_counter() - start_all > min_seconds:
            break
    return best


def _size_within(budget_s: float, dtype: torch.dtype, size: int, dev: torch.device) -> int:
    """The largest size <= `size` (halving) whose ~5 timed products fit in `budget_s`, estimated
    from one small product: a CPU without native bf16 runs bf16 matmuls ~35x slower than fp32,
    and a full-size measurement there would take minutes."""
    probe = min(size, 256)
    a = torch.randn(probe, probe, device=dev).to(dtype)
    torch.matmul(a, a)
    _sync(dev)
    start = time.perf_counter()
    torch.matmul(a, a)
    _sync(dev)
    per_flop = (time.perf_counter() - start) / (2.0 * probe**3)
    while size > probe and 5 * per_flop * 2.0 * size**3 > budget_s:
        size //= 2
    return size


def measure_matmul_flops(dtype: torch.dtype = torch.float32, size: int | None = None, device=None,
                         budget_s: float = 30.0) -> float:
    """FLOP/s of a large square matmul (2 n^3 FLOPs per product), best of a few runs; the size
    shrinks when the product is so slow that the measurement would exceed `budget_s`."""
    dev = _device(device)
    if size is None:
        size = 8192 if dev.type == "cuda" else 2048
    size = _size_within(budget_s, dtype, size, dev)
    a = torch.randn(size, size, device=dev).to(dtype)
    b = torch.randn(size, size, device=dev).to(dtype)
    out = torch.empty(size, size, device=dev, dtype=dtype)
    seconds = _best_time(lambda: torch.matmul(a, b, out=out), dev, repeats=30, min_seconds=3.0)
    return 2.0 * size**3 / seconds


def measure_memory_bandwidth(megabytes: int | None = None, device=None) -> float:
    """Bytes/s of a large tensor copy, counting the read and the write (2 x size)."""
    dev = _device(device)
    if megabytes is None:
        megabytes = 2048 if dev.type == "cuda" else 512
    numel = megabytes * 2**20 // 4
    src = torch.ones(numel, device=dev, dtype=torch.float32)
    dst = torch.empty_like(src)
    seconds = _best_time(lambda: dst.copy_(src), dev, repeats=20, min_seconds=3.0)
    return 2.0 * src.numel() * src.element_size() / seconds


def capability() -> str:
    """The CPU (and GPU) line every benchmark header carries: model, physical cores, native bf16."""
    from gptj.execution.runtime.hardware import detect

    return detect().summary()


def describe(device=None) -> str:
    dev = _device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def cpu_features() -> list[str]:
    """The CPU flags that decide matmul speed (AVX-512, AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return sorted(f for f in set(flags) if f.startswith(("avx512f", "avx512_bf16", "amx")))


def machine_limits(quick: bool = False, device=None) -> dict:
    """Measured limits: matmul FLOP/s for fp32 and bf16, memory bandwidth in bytes/s."""
    dev = _device(device)
    size = 512 if quick else None
    megabytes = 64 if quick else None
    return {
        "device": describe(dev),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "features": cpu_features() if dev.type == "cpu" else [],
        "capability": capability(),
        "torch": torch.__version__,
        "matmul_flops": {
            "fp32": measure_matmul_flops(torch.float32, size, dev),
            "bf16": measure_matmul_flops(torch.bfloat16, size, dev),
        },
        "memory_bandwidth": measure_memory_bandwidth(megabytes, dev),
    }


if __name__ == "__main__":
    limits = machine_limits()
    print(limits["capability"])
    for name, value in limits["matmul_flops"].items():
        print(f"matmul {name}: {value / 1e9:.0f} GFLOP/s")
    print(f"memory bandwidth: {limits['memory_bandwidth'] / 1e9:.1f} GB/s")
