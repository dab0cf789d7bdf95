"""Defaults the machine decides: CPU threads and compute precision for a model of a given size,
and one warning line when an explicit precision has no native kernels here.

Config values: `threads: auto` (the default) and `precision: auto` (the default) are resolved
here; an explicit number / dtype is kept as given. Measured on a 2-core AMD EPYC with
AVX512-BF16 (benchmarks/NOTES.md, "Machine-dependent defaults"):

- models under SMALL_MODEL_MATMUL_WEIGHTS (the `tiny` preset) train and decode faster on one
  thread: each op is too small to split, and a second thread only adds a barrier per op. Larger
  models (bench-small: d 512, 8 layers) are faster on every physical core. SMT
  siblings are not counted: they share the core's matmul units.
- bf16 matmuls run several times faster than fp32 where the CPU has AMX-BF16 or AVX512-BF16;
  without them they fall to a reference kernel far slower than fp32, and fp16 matmuls have no fast
  CPU kernel at all. Small models stay in fp32: their steps take milliseconds either way, and
  fp32 keeps their results exact and the same on every machine.
"""

from __future__ import annotations

import os
import sys

import torch

from gptj.execution.runtime import hardware
from gptj.model import ModelConfig

SMALL_MODEL_MATMUL_WEIGHTS = 2_000_000

# Whole training-step slowdown against fp32, measured on bench-small / tiny (NOTES.md).
SLOWDOWN = {"bf16": "15-35x", "fp16": "15-35x"}


def is_small(model_config: ModelConfig) -> bool:
    return model_config.matmul_parameters() < SMALL_MODEL_MATMUL_WEIGHTS


def processes_per_machine() -> int:
    """Processes sharing this machine's cores: torchrun's LOCAL_WORLD_SIZE; else WORLD_SIZE
    (launchers that start every rank on one machine set only that); else 1."""
    for name in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        try:
            return max(1, int(os.environ[name]))
        except (KeyError, ValueError):
            continue
    return 1


def resolve_threads(setting: int | str | None, model_config: ModelConfig,
                    hw: hardware.Hardware | None = None) -> int | None:
    """CPU threads for torch: an explicit count as given; None / 0 leave torch's own default
    (returns None); "auto": 1 for small models, else this process's share of the physical cores."""
    if setting == "auto":
        if is_small(model_config):
            return 1
        hw = hw or hardware.detect()
        return max(1, hw.physical_cores // processes_per_machine())
    return setting or None


def resolve_precision(setting: str, device: torch.device | str, model_config: ModelConfig,
                      hw: hardware.Hardware | None = None) -> str:
    """"auto": bf16 where the device runs it natively (a GPU with bf16; a CPU with AMX-BF16 or
    AVX512-BF16, for models that are not small), else fp32. Anything else is kept."""
    if setting != "auto":
        return setting
    hw = hw or hardware.detect()
    if torch.device(device).type == "cuda":
        return "bf16" if hw.cuda_bf16 else "fp32"
    return "bf16" if hw.cpu_bf16 and not is_small(model_config) else "fp32"


def slow_precision_warning(precision: str, device: torch.device | str,
                           hw: hardware.Hardware | None = None) -> str | None:
    """One line when `precision` has no native matmul on `device` (None when it has)."""
    if torch.device(device).type != "cpu" or precision not in SLOWDOWN:
        return None
    hw = hw or hardware.detect()
    if precision == "bf16" and hw.cpu_bf16:
        return None
    reason = ("CPUs have no fast fp16 matmul kernel" if precision == "fp16"
              else f"this CPU ({hw.cpu_name}) has neither AMX-BF16 nor AVX512-BF16")
    return (f"warning: precision {precision} on the CPU: {reason}, so steps run about "
            f"{SLOWDOWN[precision]} slower than fp32; continuing (use --precision auto or fp32)")


def warn_slow_precision(precision: str, device: torch.device | str,
                        hw: hardware.Hardware | None = None, file=None) -> str | None:
    """Print slow_precision_warning's line (if any) to stderr; return it."""
    line = slow_precision_warning(precision, device, hw)
    if line:
        print(line, file=file or sys.stderr, flush=True)
    return line


def auto_choices(model_config: ModelConfig, precision_setting: str, precision: str,
                 threads_setting, threads: int) -> str:
    """What the "auto" settings chose for this model and why, appended to the `machine:` line
    ("" when nothing was auto). A real tokenizer's vocabulary makes even the tiny model's
    lm_head large, so it leaves the small-model fp32 / one-thread rule: this says so."""
    chosen = [precision] if precision_setting == "auto" else []
    if threads_setting == "auto":
        chosen.append(f"{threads} thread{'' if threads == 1 else 's'}")
    if not chosen:
        return ""
    weights = model_config.matmul_parameters() / 1e6
    limit = SMALL_MODEL_MATMUL_WEIGHTS / 1e6
    size = (f"a small model ({weights:.1f} M matmul weights, under {limit:.0f} M)" if is_small(model_config)
            else f"{weights:.1f} M matmul weights (vocabulary {model_config.vocab_size}), not a small model "
                 f"(under {limit:.0f} M: fp32 on one thread)")
    return f"; auto chose {' and '.join(chosen)} for {size}"
