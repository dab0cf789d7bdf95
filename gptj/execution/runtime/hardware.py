"""What this machine runs fast: physical cores, native bf16 on the CPU or GPU.

`detect()` reads it once (Linux /sys and /proc/cpuinfo, torch's CPU capability table, CUDA);
tests replace it with monkeypatch to fake either kind of machine. Everything that chooses a
default from the hardware (gptj/execution/runtime/defaults.py) asks `detect()`, nothing else reads /proc.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

# CPU flags (as /proc/cpuinfo and torch.cpu.get_capabilities() spell them) whose presence means
# oneDNN runs bf16 matmuls natively. Without one of them a bf16 matmul falls to a reference
# kernel far slower than fp32 (NOTES.md, "Numbers behind code comments").
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class Hardware:
    cpu_name: str
    physical_cores: int  # cores this process may run on, SMT siblings counted once
    logical_cpus: int  # hardware threads this process may run on
    cpu_bf16: str | None  # the flag that makes CPU bf16 matmuls native ("amx_bf16", ...), or None
    cuda_name: str | None = None  # the first GPU, when CUDA is available
    cuda_bf16: bool = False

    def summary(self) -> str:
        """One line for logs and benchmark headers."""
        line = (f"CPU {self.cpu_name}: {self.physical_cores} physical cores, {self.logical_cpus} threads, "
                f"bf16 matmul {'native (' + self.cpu_bf16 + ')' if self.cpu_bf16 else 'not native'}")
        if self.cuda_name:
            line += f"; GPU {self.cuda_name}, bf16 {'yes' if self.cuda_bf16 else 'no'}"
        return line


def parse_cpuinfo(text: str) -> tuple[str | None, set[str], int | None]:
    """(model name, flags, physical cores) from the text of /proc/cpuinfo. Cores are counted as
    distinct (physical id, core id) pairs; None when the file does not list them."""
    name, flags, cores = None, set(), set()
    package = core = None
    for line in text.splitlines() + [""]:
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name" and name is None:
            name = value
        elif key == "flags" and not flags:
            flags = set(value.split())
        elif key == "physical id":
            package = value
        elif key == "core id":
            core = value
        elif not key:  # a blank line ends one logical CPU's block
            if core is not None:
                cores.add((package, core))
            package = core = None
    return name, flags, len(cores) or None


def sysfs_physical_cores(cpus: set[int], root: Path = Path("/sys/devices/system/cpu")) -> int | None:
    """Distinct (package, core siblings) among `cpus`, from Linux sysfs topology; None if unreadable."""
    cores = set()
    for cpu in cpus:
        topology = root / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text().strip()
            siblings_file = topology / "core_cpus_list"
            if not siblings_file.exists():  # kernels before 5.7
                siblings_file = topology / "thread_siblings_list"
            cores.add((package, siblings_file.read_text().strip()))
        except OSError:
            return None
    return len(cores) or None


def _allowed_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def _torch_cpu_capabilities() -> dict:
    get = getattr(getattr(torch, "cpu", None), "get_capabilities", None)
    try:
        return dict(get()) if get else {}
    except Exception:  # an older torch or an unknown CPU: fall back to /proc
        return {}


@functools.lru_cache(maxsize=1)
def detect() -> Hardware:
    """The hardware of this process (cached: it does not change while a program runs)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    name, flags, cpuinfo_cores = parse_cpuinfo(cpuinfo)
    caps = _torch_cpu_capabilities()
    allowed = _allowed_cpus()
    cores = sysfs_physical_cores(allowed)
    if cores is None:
        # /proc/cpuinfo and torch count the whole machine; a process limited to fewer CPUs by
        # its affinity mask gets no more threads than it may run.
        whole = cpuinfo_cores or caps.get("num_physical_cores")
        cores = min(whole, len(allowed)) if whole else len(allowed)
    native = next((flag for flag in BF16_FLAGS if flag in flags or caps.get(flag)), None)
    if not torch.backends.mkldnn.is_available():
        native = None  # bf16 matmuls on the CPU go through oneDNN
    cuda_name, cuda_bf16 = None, False
    if torch.cuda.is_available():
        cuda_name = torch.cuda.get_device_name(0)
        try:  # emulated bf16 (pre-Ampere GPUs) is slower than fp32: not native
            cuda_bf16 = bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # torch < 2.3 has no such argument
            cuda_bf16 = bool(torch.cuda.is_bf16_supported())
    return Hardware(cpu_name=name or caps.get("cpu_name") or "unknown CPU", physical_cores=cores,
                    logical_cpus=len(allowed), cpu_bf16=native, cuda_name=cuda_name,
                    cuda_bf16=cuda_bf16)
