"""Training checkpoints: per-rank safetensors shards + one JSON metadata file, written atomically.

Layout under OUTPUT_DIR/checkpoints:

    step-00000100/               a complete checkpoint (the name counts only with meta.json)
        rank-00000.safetensors   this rank's model shard ("model.*"), optimizer state
        rank-00001.safetensors   ("optimizer.*") and torch RNG state; numpy/python RNG in
        ...                      the safetensors metadata as JSON
        meta.json                step, resolved config, sampler state, loss scale, layout,
                                 and each shard's size and xxh3-128 checksum
    step-00000200.partial/       a write in progress (or one killed mid-way): never loaded

Every rank writes its shard into the `.partial` directory, then, once all ranks report success,
rank 0 writes meta.json last and renames the directory; a crash at any point leaves the
previous checkpoints as they were. A write that fails on any rank (disk full, no permission)
is reported on every rank as one `CheckpointWriteError` naming the path and the bytes needed,
and its partial files are removed. Before loading, a shard is checked against the size and
checksum meta.json records, so damaged weights are never loaded silently. Nothing is ever
unpickled.

xxh3-128 (a non-cryptographic 128-bit hash) guards against accidents (truncation, bit rot, a
stray write), not against tampering; it runs at memory speed (several times zlib's crc32 and
SHA-256; benchmarks/NOTES.md, "Checkpoint checksums"), so checking a multi-GB shard costs about
as much as reading it.
"""

from __future__ import annotations

import contextlib
import errno as errnos
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptj.errors import GPTJError
from gptj.execution.runtime.distributed import gather_ints
from gptj.model.json_files import read_json

CHECKPOINT_DIR = "checkpoints"
META_FILE = "meta.json"
_NAME = re.compile(r"^step-(\d{8})$")
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: written before shard sizes and checksums were recorded
CHECKSUM = "xxh3_128"


class CheckpointLoadError(GPTJError, RuntimeError):
    """A checkpoint that cannot be read or does not fit this run."""


class CheckpointDamagedError(CheckpointLoadError):
    """A checkpoint whose meta.json is unreadable or whose files do not match what it records."""


class CheckpointWriteError(GPTJError, RuntimeError):
    """A checkpoint that could not be written; every rank raises the same message."""


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def rank_file(directory: Path, rank: int) -> Path:
    return directory / f"rank-{rank:05d}.safetensors"


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (matching name and a meta.json), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir() and (path / META_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def step_dirs(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Every directory named like a checkpoint, complete or not, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), path) for path in root.iterdir()
                  if (m := _NAME.match(path.name)) and path.is_dir())


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def remove_partial(root: str | os.PathLike) -> list[Path]:
    """Delete leftovers of interrupted writes (rank 0 only, when no write is in progress)."""
    root = Path(root)
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if path.is_dir() and not _NAME.match(path.name) and path.name.startswith("step-"):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


# ---- RNG state as JSON-safe values -------------------------------------------------------------


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, json strings) capturing torch, CUDA, numpy and python RNG states."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                   "gauss": float(gauss)}
    version, internal, py_gauss = random.getstate()
    python_state = {"version": version, "state": list(internal), "gauss": py_gauss}
    return tensors, {"rng_numpy": json.dumps(numpy_state), "rng_python": json.dumps(python_state)}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    n = json.loads(meta["rng_numpy"])
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    p = json.loads(meta["rng_python"])
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


# ---- save ----------------------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename durable; best effort (some filesystems cannot sync a directory)."""
    with contextlib.suppress(OSError):
        _fsync(path)


def file_checksum(path: str | os.PathLike, chunk_bytes: int = 8 << 20) -> str:
    """xxh3-128 of a file's bytes (hex), read in chunks so any size fits in memory."""
    import xxhash

    digest = xxhash.xxh3_128()
    buffer = bytearray(chunk_bytes)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _write_shard(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str]) -> None:
    """safetensors' save_file, its I/O failures raised as OSError(errno, message, path)."""
    from gptj.model.tensor_files import save_file

    try:
        save_file(tensors, str(file), metadata=metadata)
    except OSError:
        raise
    except Exception as err:  # safetensors reports I/O failures as SafetensorError("... os error N")
        code = re.search(r"os error (\d+)|code: (\d+)", str(err))
        if code is None:
            raise
        number = int(code.group(1) or code.group(2))
        raise OSError(number, os.strerror(number), str(file)) from err


def _shard_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """Size of the safetensors file these tensors make (data + a generous header estimate)."""
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    header = sum(len(k) + 96 for k in tensors) + sum(len(k) + len(v) + 8 for k, v in metadata.items())
    return 8 + header + data


def _free_bytes(path: Path) -> int:
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return -1


# What failed, for the status every rank sends after each stage of a write.
_STAGES = {1: "creating", 2: "writing", 3: "writing", 4: "renaming"}


def _stage_path(stage: int, rank: int, partial: Path, final: Path) -> Path:
    return {1: partial, 2: rank_file(partial, rank), 3: partial / META_FILE, 4: final}[stage]


def _status(stage: int, err: Exception | None, needed: int, partial: Path) -> list[int]:
    """[failed stage (0: none), errno, bytes this rank writes, bytes free] for gather_ints.

    A failure that is no OSError (no errno) is printed here, by the rank it happened on: the
    others only learn that it happened.
    """
    if err is None:
        return [0, 0, needed, 0]
    if not isinstance(err, OSError):
        print(f"error: checkpoint write: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
    return [stage, getattr(err, "errno", None) or 0, needed, _free_bytes(partial)]


def _raise_if_any_failed(statuses: list[list[int]], step: int, partial: Path, final: Path) -> None:
    """Collective outcome of one stage: the same CheckpointWriteError on every rank, or nothing."""
    failed = [(r, s) for r, s in enumerate(statuses) if s[0]]
    if not failed:
        return
    rank, status = failed[0]
    stage, code, free = status[0], status[1], status[3]
    reason = f"[Errno {code}] {os.strerror(code)}" if code else "an error (see that rank's log)"
    if code in errnos.errorcode:
        reason += f" ({errnos.errorcode[code]})"
    total = sum(s[2] for s in statuses)
    others = f"; {len(failed) - 1} more rank(s) failed too" if len(failed) > 1 else ""
    free_text = f", {free:,} bytes free there" if free >= 0 else ""
    raise CheckpointWriteError(
        f"cannot write checkpoint step {step}: rank {rank}, {_STAGES[stage]} "
        f"{_stage_path(stage, rank, partial, final)}: {reason}{others}. The checkpoint needs about "
        f"{total:,} bytes for its {len(statuses)} shard(s){free_text}; the partial files "
        "were removed and the previous checkpoints are intact")


def save_checkpoint(root: str | os.PathLike, step: int, rank: int, model: torch.nn.Module,
                    optimizer, meta: dict[str, Any], keep: int) -> Path:
    """Collective: every rank writes its shard; rank 0 writes meta.json and renames.

    `meta` (JSON-safe) is only used on rank 0. Returns the final directory. When the write fails
    on any rank (OSError: disk full, permission denied, read-only filesystem), every rank raises
    the same CheckpointWriteError after the partial files are removed.
    """
    root = Path(root)
    final = step_dir(root, step)
    partial = final.with_name(final.name + ".partial")

    tensors = {f"model.{name}": p.detach().to("cpu").contiguous() for name, p in model.named_parameters()}
    for key, value in optimizer.state_dict().items():
        tensors[f"optimizer.{key}"] = value.detach().to("cpu").contiguous()
    rng_tensors, rng_meta = rng_state()
    tensors.update(rng_tensors)
    file_meta = {"format": "pt", "rank": str(rank), **rng_meta}
    needed = _shard_bytes(tensors, file_meta)

    # Stage 1: rank 0 makes the directory; all ranks learn whether it could.
    error = None
    if rank == 0:
        try:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        except OSError as err:
            error = err
    statuses = gather_ints(_status(1, error, needed, partial), "checkpoint write status")
    _raise_if_any_failed(statuses, step, partial, final)

    # Stage 2: every rank writes, syncs and checksums its shard.
    file = rank_file(partial, rank)
    error, record = None, [0, 0, 0]
    try:
        _write_shard(tensors, file, file_meta)
        _fsync(file)
        digest = int(file_checksum(file), 16)
        record = [file.stat().st_size, *_int64_pair(digest)]
    except Exception as err:  # reported to every rank, so that none waits for this one
        error = err
    del tensors
    statuses = gather_ints(_status(2, error, needed, partial) + record, "checkpoint write status")
    if rank == 0 and any(s[0] for s in statuses):
        shutil.rmtree(partial, ignore_errors=True)
    _raise_if_any_failed(statuses, step, partial, final)

    # Stage 3: rank 0 records every shard's size and checksum in meta.json (written last), renames.
    error, stage = None, 0
    if rank == 0:
        files = {rank_file(partial, r).name: {"size": s[4], CHECKSUM: f"{_from_int64_pair(s[5], s[6]):032x}"}
                 for r, s in enumerate(statuses)}
        meta = {"format_version": FORMAT_VERSION, "step": step, **meta, "files": files}
        meta_file = partial / META_FILE
        try:
            stage = 3
            meta_file.write_text(json.dumps(meta, indent=2) + "\n")
            _fsync(meta_file)
            stage = 4
            if final.exists():  # the same step saved again (e.g. at the end after a periodic save)
                old = final.with_name(final.name + ".old")
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            partial.rename(final)
            _fsync_dir(root)
        except Exception as err:  # reported to every rank, so that none waits for rank 0
            error = err
            shutil.rmtree(partial, ignore_errors=True)
        if error is None:
            for _, path in list_checkpoints(root)[:-keep]:
                shutil.rmtree(path, ignore_errors=True)
    statuses = gather_ints(_status(stage, error, needed, partial), "checkpoint write status")
    _raise_if_any_failed(statuses, step, partial, final)
    return final


def _int64_pair(value: int) -> list[int]:
    """A 128-bit unsigned number as two signed int64 (for gather_ints)."""
    return [((value >> shift) & (2**64 - 1)) - (2**64 if (value >> shift) & (1 << 63) else 0)
            for shift in (64, 0)]


def _from_int64_pair(high: int, low: int) -> int:
    return ((high % 2**64) << 64) | (low % 2**64)


# ---- load ----------------------------------------------------------------------------------------


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """meta.json of a checkpoint; CheckpointDamagedError when it is missing or unreadable."""
    directory = Path(directory)
    meta_file = directory / META_FILE
    if not meta_file.is_file():
        raise CheckpointDamagedError(f"{directory} is not a complete checkpoint: {META_FILE} is missing")
    meta = read_json(meta_file, CheckpointDamagedError, "cannot read {file}")
    if not isinstance(meta, dict):
        raise CheckpointDamagedError(f"cannot read {meta_file}: not a JSON object")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointLoadError(
            f"{meta_file} has format_version {meta.get('format_version')!r}, this program reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}")
    return meta


def verify_shard(directory: str | os.PathLike, rank: int, meta: dict[str, Any]) -> bool:
    """Check this rank's shard against the size and checksum `meta` records.

    Returns False for a checkpoint written before checksums were recorded (nothing to check
    against); raises CheckpointDamagedError naming the file when it is missing, cut short or
    altered.
    """
    directory = Path(directory)
    files = meta.get("files")
    if files is None and meta.get("format_version") == 1:
        return False
    file = rank_file(directory, rank)
    try:
        want_size, want_sum = int(files[file.name]["size"]), str(files[file.name][CHECKSUM])
    except (KeyError, TypeError, ValueError):
        raise CheckpointDamagedError(
            f"{directory / META_FILE} records no size and {CHECKSUM} checksum for {file.name}") from None
    if not file.is_file():
        raise CheckpointDamagedError(f"{file} is missing")
    size = file.stat().st_size
    if size != want_size:
        raise CheckpointDamagedError(
            f"{file} has {size:,} bytes, {META_FILE} records {want_size:,} (cut short or overwritten)")
    if file_checksum(file) != want_sum:
        raise CheckpointDamagedError(
            f"{file} does not match the {CHECKSUM} checksum in {META_FILE} (its bytes were altered)")
    return True


def load_checkpoint(directory: str | os.PathLike, rank: int, model: torch.nn.Module,
                    optimizer, verify: bool = True) -> dict[str, Any]:
    """Load this rank's model shard, optimizer state and RNG state; return the metadata.

    With `verify` the shard is first checked against meta.json (CheckpointDamagedError if it
    does not match); pass False only when the caller has just verified it.
    """
    from safetensors import safe_open

    directory = Path(directory)
    meta = read_meta(directory)
    if verify:
        verify_shard(directory, rank, meta)
    file = rank_file(directory, rank)
    if not file.is_file():
        raise CheckpointLoadError(f"checkpoint {directory} has no shard for rank {rank} ({file.name})")
    try:
        with safe_open(str(file), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            file_meta = handle.metadata() or {}
    except Exception as err:  # safetensors raises several types for damaged files
        raise CheckpointLoadError(f"cannot read checkpoint shard {file}: {err}") from None

    with torch.no_grad():
        for name, param in model.named_parameters():
            key = f"model.{name}"
            if key not in tensors:
                raise CheckpointLoadError(f"{file} has no tensor {key}")
            value = tensors[key]
            if value.shape != param.shape:
                raise CheckpointLoadError(
                    f"{file}: {key} has shape {tuple(value.shape)}, this model expects {tuple(param.shape)}")
            param.copy_(value.to(param.dtype))
    optim_state = {k[len("optimizer."):]: v for k, v in tensors.items() if k.startswith("optimizer.")}
    try:
        optimizer.load_state_dict(optim_state)
    except (KeyError, ValueError, RuntimeError) as err:
        raise CheckpointLoadError(f"{file}: optimizer state does not fit this run: {err}") from None
    if "rng.torch" in tensors and "rng_numpy" in file_meta:
        set_rng_state(tensors, file_meta)
    return meta
