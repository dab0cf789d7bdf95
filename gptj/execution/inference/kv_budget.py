"""How large the KV cache may grow: a byte budget for its rows x slots.

A server that allocated every row at full length up front would hold 16 rows x 2048 tokens
of a 6B model (0.9 MB a token in fp32: 30 GB) before its first request. Instead the cache
starts small and grows to the rows and lengths the running requests need, never beyond the
budget: the memory left after the weights, less a margin (`utilization`, as vLLM's
memory-utilisation setting keeps one), for activations and the rest of the process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from gptj.errors import UsageError

GIB = 1 << 30


def available_memory(device: torch.device) -> int:
    """Bytes this process could still take: free GPU memory, or MemAvailable on a CPU
    (gptj.execution.runtime.memory_fit.available_bytes, which the fit check before loading reads too)."""
    from gptj.execution.runtime.memory_fit import available_bytes

    found = available_bytes(device)
    if found is not None:
        return found[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # free pages: a lower bound


@dataclass(frozen=True)
class CacheBudget:
    bytes_per_token: int  # every layer's keys and values of one token (gptj.model.kv_cache.kv_bytes_per_token)
    budget_bytes: int
    max_rows: int
    max_length: int
    slot_step: int = 32  # cache lengths are multiples of this many slots
    growth: float = 1.5  # a longer cache is at least this many times the old length (few regrowths)

    def nbytes(self, rows: int, length: int) -> int:
        return rows * length * self.bytes_per_token

    def full_rows(self, length: int | None = None) -> int:
        """Rows of `length` slots (default: full length) the budget holds, at most max_rows."""
        return min(self.max_rows, self.budget_bytes // self.nbytes(1, length or self.max_length))

    def first_shape(self) -> tuple[int, int]:
        return 1, min(self.max_length, self.slot_step)

    def _slots(self, length: float) -> int:
        return min(self.max_length, -(-int(length) // self.slot_step) * self.slot_step)

    def shape_for(self, rows: int, length: int, current: tuple[int, int]) -> tuple[int, int] | None:
        """The cache shape (rows, slots) that holds rows 0..rows-1 of `length` slots, from the
        current shape: kept when it holds them; else grown (more rows: doubled when that fits; a
        longer length: rounded up to slot_step and at least `growth` x the old one, so a cache
        that keeps lengthening is copied a bounded number of times while holding at most
        `growth` x what its rows need); else shrunk to just what is asked; None when even
        that exceeds the budget."""
        have_rows, have_length = current
        if rows <= have_rows and length <= have_length:
            return current
        length = self._slots(length)
        grown_length = max(length, self._slots(have_length * self.growth)) if length > have_length else have_length
        grown_rows = min(self.max_rows, max(rows, 2 * have_rows)) if rows > have_rows else have_rows
        for candidate in (grown_rows, max(rows, have_rows), rows):
            if self.nbytes(candidate, grown_length) <= self.budget_bytes:
                return candidate, grown_length
        return (rows, length) if self.nbytes(rows, length) <= self.budget_bytes else None


def server_budget(bytes_per_token: int, max_rows: int, max_length: int, available: int,
                  utilization: float, dtype_name: str = "") -> tuple[CacheBudget, str]:
    """The KV cache budget of a server whose weights are loaded (`available`: the bytes left,
    `available_memory`), and the line that says what it holds (its keys and values in
    `dtype_name`). ValueError (one line) when not even one row of `max_length` tokens fits."""
    budget = CacheBudget(bytes_per_token, int(available * utilization), max_rows, max_length)
    row = budget.nbytes(1, max_length)
    full = budget.full_rows()
    left = f"{_size(budget.budget_bytes)} is left ({utilization:.0%} of {_size(available)} available after the weights)"
    if full < 1:
        fits = budget.budget_bytes // bytes_per_token
        remedies = ([f"--max-model-len {fits} would fit"] if fits >= 2 else []) + [
            "quantize the weights (--quantize int4)", "raise --memory-utilization"]
        raise UsageError(f"KV cache: one row of {max_length} tokens needs {_size(row)} but {left}: "
                         + ", or ".join(remedies))
    held_as = f"{dtype_name}, " if dtype_name else ""
    line = (f"KV cache ({held_as}{_size(bytes_per_token)} a token): up to {max_rows} rows x {max_length} tokens "
            f"asked, {full} rows at full length fit in {left}; allocated as rows fill")
    return budget, line


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"
