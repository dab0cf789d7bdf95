"""The fastest matmul path of a quantized layer on this CPU, measured once and remembered.

Which way of multiplying by a quantized weight wins depends on the CPU (AVX2, AVX-512 with or
without BF16 / VNNI, AMX), the thread count, the activation dtype, the number of rows and the
weight's shape: no fixed row cutoff is right everywhere (benchmarks/NOTES.md, "Which kernel").
So the first call of each (layer family, dtype, row bucket, shape) on a CPU times every
candidate path once on that layer's real weight, keeps the fastest, logs one line

    int8 matmul, 512 rows of 4096 -> 4096, bfloat16: dequantize+bf16 (3.10 ms) over packed (6.00 ms)

and stores the choice in a small JSON file keyed by the CPU's model name, so later processes
on the same kind of CPU reuse it without timing anything. A second layer of the same family
and shape in the same row bucket reuses the first one's choice.

    GPTJ_MATMUL_PROBE=0             no timing: the layers' fixed row cutoffs decide (tests set this)
    GPTJ_MATMUL_PROBE_CACHE=FILE    where the choices are kept (default ~/.cache/gptj/matmul_paths.json)

`configure(enabled=..., cache_file=...)` sets the same from code. Nothing here knows about
quantization: callers pass their candidates as functions (gptj/model/quantized_linear.py).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

PROBE_ENV = "GPTJ_MATMUL_PROBE"
CACHE_ENV = "GPTJ_MATMUL_PROBE_CACHE"
FILE_VERSION = 1
# Rows are grouped in powers of two (a call with 17..32 rows uses the choice measured at 32);
# past this many the choice is measured once, at this count: the matmul is compute-bound from
# far fewer rows on, and timing more rows of a 6B layer would only lengthen the first prefill.
MAX_BUCKET_ROWS = 512
# Each candidate runs once untimed (oneDNN builds its primitives, buffers are allocated), then
# all are timed in turn, round after round, until this long has been spent or TIMED_RUNS rounds
# were made; each one's fastest run counts. Taking turns spreads a busy machine's other load
# over every candidate instead of penalising whichever ran while it peaked.
TIMED_RUNS = 3
TIMING_SECONDS = 0.05

LOG = logging.getLogger("gptj.matmul")
_lock = threading.RLock()
_settings: dict[str, object] = {}  # configure()'s overrides of the environment
_tables: dict[Path, dict] = {}  # cache file -> its content, read once
_measured: dict[str, dict] = {}  # choices timed or read in this process, by key (see chosen())
timings_run = 0  # candidate paths timed in this process (tests check that a choice is reused)


def configure(enabled: bool | None = None, cache_file: str | Path | None = None) -> None:
    """Override GPTJ_MATMUL_PROBE / GPTJ_MATMUL_PROBE_CACHE for this process (None: the env's)."""
    with _lock:
        _settings["enabled"], _settings["cache_file"] = enabled, cache_file


def enabled() -> bool:
    if _settings.get("enabled") is not None:
        return bool(_settings["enabled"])
    return os.environ.get(PROBE_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def cache_file() -> Path:
    chosen = _settings.get("cache_file") or os.environ.get(CACHE_ENV)
    if chosen:
        return Path(chosen).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "gptj" / "matmul_paths.json"


def row_bucket(rows: int) -> int:
    """The row count a call's choice is measured at: the next power of two, at most MAX_BUCKET_ROWS."""
    bucket = 1
    while bucket < rows and bucket < MAX_BUCKET_ROWS:
        bucket *= 2
    return bucket


# The instruction sets that decide which path wins. Virtual machines often report only a family
# name ("AMD EPYC") for CPUs as different as AVX2-only and AVX-512 + BF16 parts, so the cache
# key names them beside the model name.
DECIDING_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo) and its deciding instruction sets: the key of the
    cache file's table, e.g. "AMD EPYC [avx2 avx512f avx512_bf16 avx512_vnni avx_vnni]"."""
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                    break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "unknown CPU"
    flags = _cpu_flags()
    return f"{name} [{' '.join(flag for flag in DECIDING_FLAGS if flag in flags)}]"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return set(value.split())
    except OSError:
        pass
    return set()


_int8_flag: list[str | None] = []


def int8_dot_products() -> str | None:
    """The instruction set through which `torch._int_mm` runs oneDNN's int8 kernels here
    ("amx_int8" or "avx512_vnni"), or None: there torch multiplies int8 in a scalar loop, far
    slower than any float path, so int8 activations are never used."""
    if not _int8_flag:
        flag = None
        if torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled:
            try:  # what torch's own dispatch asks (cpuinfo), else the kernel's flags
                flags = {name for name, value in torch.cpu.get_capabilities().items() if value is True}
            except (AttributeError, RuntimeError):
                flags = _cpu_flags()
            if "avx512_vnni" in flags:
                flag = "amx_int8" if "amx_int8" in flags else "avx512_vnni"
        _int8_flag.append(flag)
    return _int8_flag[0]


def native_bf16() -> bool:
    """Whether oneDNN multiplies bf16 natively here (AVX512-BF16 or AMX-BF16). Where it does, a
    bf16 matmul beats the fp32 one of the same shape, so the probe does not time the fp32 one for
    bf16 activations (at 6B that saves seconds per row bucket on the first prefill)."""
    try:
        caps = torch.cpu.get_capabilities()
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    except (AttributeError, RuntimeError):
        return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def _key(family: str, dtype: torch.dtype, bucket: int, out_features: int, in_features: int) -> str:
    dtype_name = str(dtype).removeprefix("torch.")
    return (f"{family} {dtype_name} rows<={bucket} {out_features}x{in_features} "
            f"threads={torch.get_num_threads()} torch={torch.__version__}")


def _read_table(path: Path) -> dict:
    """The cache file's choices for this CPU ({} when missing or unreadable: measured again)."""
    if path not in _tables:
        content: dict = {}
        try:
            content = json.loads(path.read_text())
            if not isinstance(content, dict) or content.get("version") != FILE_VERSION:
                content = {}
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as err:
            _say(f"matmul paths: ignoring {path} ({err}); measuring again", warning=True)
        content = {"version": FILE_VERSION, "cpus": content.get("cpus", {})}
        _tables[path] = content
    return _tables[path]["cpus"].setdefault(cpu_model(), {})


def _write(path: Path) -> None:
    """Write the cache file whole, under a temporary name first (never a half-written file),
    keeping what other processes wrote since it was read (their choices for other keys)."""
    try:
        on_disk = json.loads(path.read_text())
        for cpu, table in on_disk.get("cpus", {}).items():
            for key, record in table.items():
                _tables[path]["cpus"].setdefault(cpu, {}).setdefault(key, record)
    except (OSError, ValueError, AttributeError):
        pass  # nothing there yet, or unreadable: ours replaces it
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_tables[path], indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as err:  # a read-only home: the choice holds for this process only
        _say(f"matmul paths: cannot write {path} ({err}); the choice holds for this process", warning=True)


def _say(line: str, warning: bool = False) -> None:
    """One line to the log where logging is set up to show it, else to stderr."""
    level = logging.WARNING if warning else logging.INFO
    if LOG.hasHandlers() and LOG.isEnabledFor(level):
        LOG.log(level, line)
    else:
        print(line, file=sys.stderr)


def _time(run: Callable[[], object]) -> float:
    """Seconds one call of `run` takes."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _time_all(candidates: dict[str, Callable[[], object]]) -> tuple[dict[str, float], dict[str, str]]:
    """({name: fastest seconds}, {name: why it failed}) of the candidates, timed in turns."""
    global timings_run
    runs, refused = {}, {}
    for name, run in candidates.items():
        try:
            run()  # untimed: one-time setup of the path; a path that fails is left out here
            runs[name] = run
        except RuntimeError as err:
            refused[name] = str(err).splitlines()[0]
    timings_run += len(runs)
    times, spent = dict.fromkeys(runs, float("inf")), 0.0
    for _ in range(TIMED_RUNS):
        for name, run in runs.items():
            took = _time(run)
            times[name], spent = min(times[name], took), spent + took
        if spent >= TIMING_SECONDS:
            break
    return times, refused


def choose(family: str, dtype: torch.dtype, rows: int, out_features: int, in_features: int,
           candidates: dict[str, Callable[[], object]]) -> str:
    """The fastest of `candidates` (name -> a call of that path on `row_bucket(rows)` rows)
    for this layer kind on this CPU: from this process's table or the cache file, else timed
    now, stored and logged. A candidate that raises RuntimeError is left out."""
    bucket = row_bucket(rows)
    key = _key(family, dtype, bucket, out_features, in_features)
    with _lock:
        path = cache_file()
        table = _read_table(path)
        record = table.get(key)
        if isinstance(record, dict) and record.get("path") in candidates:
            _measured.setdefault(key, record)
            return record["path"]
        times, refused = _time_all(candidates)
        if not times:
            raise RuntimeError(f"every matmul path failed for {key}: {refused}")
        best = min(times, key=times.get)
        record = {"path": best, "ms": {name: round(t * 1e3, 4) for name, t in times.items()}}
        if refused:
            record["refused"] = refused
        table[key] = _measured[key] = record
        _write(path)
        others = ", ".join(f"{name} ({t * 1e3:.2f} ms)" for name, t in sorted(times.items(), key=lambda i: i[1])
                           if name != best)
        dtype_name = str(dtype).removeprefix("torch.")
        _say(f"{family} matmul, {bucket} rows of {in_features} -> {out_features}, {dtype_name}: "
             f"{best} ({times[best] * 1e3:.2f} ms)" + (f" over {others}" if others else "")
             + (f"; refused: {', '.join(refused)}" if refused else ""))
        return best


def chosen() -> dict[str, dict]:
    """The choices this process made or read, by key: {"path", "ms" per candidate (when timed
    in the process that wrote them)}. For benchmarks that name each prefill's path."""
    with _lock:
        return {key: dict(record) for key, record in _measured.items()}


def forget() -> None:
    """Drop what this process read or measured (tests: as if a new process started)."""
    with _lock:
        _tables.clear()
        _measured.clear()
