"""Reading safetensors files with plain reads into freshly allocated tensors, never a mapping.

A memory-mapped file counts in the process's resident memory for every page a load touches: a
6B checkpoint read through a mapping peaks at the model plus the whole file (twice the model).
Here each tensor (or its rows) is read with `readinto` into a tensor that the caller owns, so a
load holds the model it builds plus the tensor in hand; the file's pages stay in the page cache,
which the kernel may drop.

The format: 8 bytes little-endian header length, a JSON header mapping each name to its dtype,
shape and [begin, end) byte offsets (relative to the end of the header), then the data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from gptj.errors import GPTJError

DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
}
# Bytes per readinto call (large calls are fine; a bound keeps one call's latency low).
READ_CHUNK = 64 << 20
HEADER_LIMIT = 100 * 2**20  # the format's own upper bound on the JSON header


class TensorFileError(GPTJError, ValueError):
    """A file that is not a readable safetensors file, named with the reason."""


def read_header(file) -> tuple[dict, int]:
    """(the JSON header, the byte offset where the data starts) of an open safetensors file."""
    length = int.from_bytes(file.read(8), "little")
    if length > HEADER_LIMIT:
        raise ValueError(f"a header of {length} bytes is beyond the format's limit")
    header = json.loads(file.read(length))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header, 8 + length


def current_umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def save_file(tensors: dict, file: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, leaving the mode every other file gets (`0666 & ~umask`).

    safetensors writes through a private temporary file, so what it leaves is mode 0600 whatever
    the umask: another user, or a container running as another uid, could not read the weights.
    """
    from safetensors.torch import save_file as save

    save(tensors, str(file), metadata=metadata)
    Path(file).chmod(0o666 & ~current_umask())


class SafetensorsFile:
    """One safetensors file: names, shapes and reads of whole tensors or of row ranges."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed in close()
        try:
            self.entries, self.data_start = self._read_header()
        except (ValueError, KeyError, TypeError) as err:
            self._file.close()
            raise TensorFileError(f"{self.path} is not a valid safetensors file: {err}") from err
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._file.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def _read_header(self) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...], int, int]], int]:
        header, data_start = read_header(self._file)
        header.pop("__metadata__", None)
        entries = {}
        for name, info in header.items():
            if info["dtype"] not in DTYPES:
                raise ValueError(f"tensor {name} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            entries[name] = (DTYPES[info["dtype"]], tuple(info["shape"]), begin, end)
        return entries, data_start

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def read(self, name: str, rows: tuple[int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor `name` (or its rows [start, stop) along dim 0), read into `out` or a new tensor."""
        dtype, shape, begin, end = self.entries[name]
        start, stop = rows if rows is not None else (0, shape[0] if shape else 1)
        row_bytes = (end - begin) // max(1, shape[0]) if shape else end - begin
        target_shape = (stop - start, *shape[1:]) if shape else ()
        if out is None:
            out = torch.empty(target_shape, dtype=dtype)
        elif tuple(out.shape) != target_shape or out.dtype != dtype or not out.is_contiguous():
            raise ValueError(f"{name}: cannot read {dtype} {target_shape} into {out.dtype} {tuple(out.shape)}")
        self._read_bytes(self.data_start + begin + start * row_bytes, out)
        return out

    def _read_bytes(self, offset: int, out: torch.Tensor) -> None:
        view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        self._file.seek(offset)
        done = 0
        while done < len(view):
            got = self._file.readinto(view[done : done + READ_CHUNK])
            if not got:
                raise TensorFileError(f"{self.path} ends early (truncated file?)")
            done += got

    def close(self) -> None:
        self._file.close()
