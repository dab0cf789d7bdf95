"""The byte layout of torch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`), built from and
read back to this project's stored int4 format (two values a byte, column 2i in the high nibble).

The model holds each int4 weight once, in the kernel's layout (gptj/model/quantized_linear.py), so
building it is on every int4 load's path and reading values back is on every dequantize's.
"""

from __future__ import annotations

import functools

import torch

# The CPU int4 kernel stores rows in blocks of 64 where torch built it for AVX-512 and of 32 for
# AVX2 and the rest (kernel_block_rows tells which); row slices aligned to this multiple of both
# are block-aligned in either layout.
CPU_INT4_BLOCK_ROWS = 64
BLOCK_ROWS_CANDIDATES = (64, 32)
# Stored bytes rearranged into that layout at a time: few large steps (small ones cost more in
# per-call overhead than they gain in cache reuse, measured at 6B shapes).
PACK_BYTES = 1 << 24


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 values in [0, 15], [N, K]."""
    return torch.stack((packed >> 4, packed & 15), dim=-1).flatten(-2)


# ---- the CPU int4 kernel's layout ---------------------------------------------------------------
# `torch._convert_weight_to_int4pack_for_cpu` reorders the values [N, K] for its vector width: each
# block of B rows (B = 64 for AVX-512, 32 for AVX2) becomes [K, B / 2] bytes, row j in the low
# nibble and row B / 2 + j in the high one; the rows after the last full block become [K, rest / 2]
# bytes, rows 2i (low) and 2i + 1 (high). A block's bytes depend on that block alone, so the values
# read back from any block-aligned rows. The full blocks are rearranged here from the stored bytes
# directly (nibble masks and one byte transpose, no int32 copy of the values: far faster than
# torch's converter, which a 6B model's load would otherwise spend most of its time in); the short
# tail goes through torch's converter. A probe finds B once per process; where neither candidate
# reads back what torch packed, the kernel is not used.


def _pack_full_blocks(qweight: torch.Tensor, out: torch.Tensor, chunk_blocks: int, block: int) -> None:
    """out[:full] = the kernel layout of the full `block`-row blocks of stored `qweight` [N, K/2].

    Stored byte (n, c) holds column 2c (high nibble) and 2c + 1 (low). For a block with rows
    lo = 0..B/2-1 and hi = B/2..B-1, kernel byte (2c, j) = lo[j, 2c] | hi[j, 2c] << 4, and
    (2c + 1, j) = lo[j, 2c + 1] | hi[j, 2c + 1] << 4."""
    half = qweight.shape[1]
    blocks = qweight.shape[0] // block
    stored = qweight[: blocks * block].view(blocks, 2, block // 2, half)
    kernel = out[: blocks * block].view(blocks, half, 2, block // 2)
    for start in range(0, blocks, chunk_blocks):  # cache-sized chunks: the temporaries stay small
        lo, hi = stored[start : start + chunk_blocks, 0], stored[start : start + chunk_blocks, 1]
        even = (lo >> 4) | (hi & 0xF0)
        odd = (lo & 15) | (hi << 4)
        kernel[start : start + chunk_blocks] = torch.stack((even.transpose(1, 2), odd.transpose(1, 2)), dim=2)


def _pack_with_torch(values: torch.Tensor) -> torch.Tensor:
    return torch._convert_weight_to_int4pack_for_cpu(values.to(torch.int32), 1)


def _probe_values() -> torch.Tensor:
    """Random values [4 * 32 + 16, 256]: full blocks and a 16-row tail in either layout."""
    return torch.randint(0, 16, (4 * 32 + 16, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@functools.cache
def kernel_block_rows() -> int | None:
    """The rows per block of this torch's CPU int4 layout (64 or 32), or None where torch has no
    such kernel or packs in a layout int4_cpu_unpack does not read."""
    values = _probe_values()
    try:
        expected = _pack_with_torch(values)
    except (RuntimeError, AttributeError):
        return None
    for block in BLOCK_ROWS_CANDIDATES:
        if torch.equal(_unpack(expected, 0, values.shape[0], block), values):
            return block
    return None


@functools.cache
def _direct_packing_matches() -> bool:
    """Whether the full blocks _pack_full_blocks writes equal torch's converter's here."""
    block = kernel_block_rows()
    if block is None:
        return False
    values = _probe_values()
    expected = _pack_with_torch(values)
    packed = torch.empty_like(expected)
    _pack_full_blocks((values[:, 0::2] << 4) | values[:, 1::2], packed, 1, block)
    full = values.shape[0] // block * block
    return torch.equal(packed[:full], expected[:full])


def int4_cpu_unpack(packed: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Values uint8 [stop - start, K] of rows [start, stop) of a CPU int4 kernel weight [N, K/2].

    `start` must be a multiple of CPU_INT4_BLOCK_ROWS; `stop` too, or N."""
    block = kernel_block_rows()
    if block is None:
        raise RuntimeError("this torch has no CPU int4 layout this project reads")
    return _unpack(packed, start, stop, block)


def _unpack(packed: torch.Tensor, start: int, stop: int, block: int) -> torch.Tensor:
    n, k = packed.shape[0], packed.shape[1] * 2
    full = n // block * block
    pieces = []
    if start < min(stop, full):
        end = min(stop, full)
        v = packed[start:end].reshape(-1, k, block // 2)
        pieces.append(torch.stack((v & 15, v >> 4), dim=1).transpose(2, 3).reshape(end - start, k))
    if stop > full:
        v = packed[full:].reshape(k, (n - full) // 2)
        tail = torch.stack((v & 15, v >> 4), dim=-1).reshape(k, n - full).t()
        pieces.append(tail[max(start, full) - full : stop - full])
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def int4_cpu_pack(qweight: torch.Tensor) -> torch.Tensor | None:
    """The CPU kernel's weight for stored int4 `qweight` [N, K/2], or None where the kernel does
    not take the shape or packs in another layout than int4_cpu_unpack reads."""
    block = kernel_block_rows()
    if block is None:
        return None
    n, k = qweight.shape[0], qweight.shape[1] * 2
    full = n // block * block
    packed = torch.empty_like(qweight)
    try:
        if _direct_packing_matches():
            _pack_full_blocks(qweight, packed, max(1, PACK_BYTES // (k * block // 2)), block)
            if full < n:
                packed[full:] = _pack_with_torch(unpack_int4(qweight[full:]))
            return packed
        return _checked_torch_pack(qweight, packed)
    except RuntimeError:  # e.g. N not a multiple of 16
        return None


def _checked_torch_pack(qweight: torch.Tensor, packed: torch.Tensor) -> torch.Tensor | None:
    """Every row through torch's converter in bounded chunks, the first and last checked against
    the layout int4_cpu_unpack reads (None when it differs)."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    rows = max(CPU_INT4_BLOCK_ROWS, (1 << 22) // k // CPU_INT4_BLOCK_ROWS * CPU_INT4_BLOCK_ROWS)
    full = n // CPU_INT4_BLOCK_ROWS * CPU_INT4_BLOCK_ROWS
    starts = [*range(0, full, rows), *([full] if full < n else [])]
    for start in starts:
        stop = min(start + rows, full) if start < full else n
        values = unpack_int4(qweight[start:stop])
        packed[start:stop] = _pack_with_torch(values)
        if (start == 0 or stop == n) and not torch.equal(int4_cpu_unpack(packed, start, stop), values):
            return None
    return packed
