"""Precision names, their torch dtypes, and the device a process runs on.

The one table of names ("fp32", "bf16", "fp16") to dtypes: configs, command-line choices, the
loaders, the KV cache and the server all read it here.
"""

from __future__ import annotations

import os

import torch

from gptj.errors import UsageError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = tuple(DTYPES)  # ("fp32", "bf16", "fp16")
PRECISION_CHOICES = ("auto", *PRECISIONS)  # "auto": chosen for the hardware (runtime/defaults.py)
DEVICE_CHOICES = ("auto", "cpu", "cuda")


def parse_dtype(name: str) -> torch.dtype:
    """The torch dtype of a precision name ("fp32" | "bf16" | "fp16")."""
    if name not in DTYPES:
        raise UsageError(f"unknown precision {name!r}; expected one of {', '.join(PRECISIONS)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The precision name of a torch dtype ("fp32" | "bf16" | "fp16")."""
    return next(name for name, known in DTYPES.items() if known == dtype)


def pick_device(asked: str | torch.device | None = "auto", local_rank: int | None = None) -> torch.device:
    """The device of this process. "auto" (or None): this rank's GPU when CUDA is available, else
    the CPU; "cuda" without a GPU is a UsageError. A bare "cuda" is this rank's GPU
    (`local_rank`, default torchrun's LOCAL_RANK)."""
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if asked in (None, "auto"):
        asked = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(asked)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise UsageError("device cuda was asked for but no CUDA GPU is available")
    if device.index is None:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device
