"""Training checkpoints: per-rank safetensors shards + one JSON metadata file, written atomically.

Layout under OUTPUT_DIR/checkpoints:

    step-00000100/               a complete checkpoint (the name counts only with meta.json)
        rank-00000.safetensors   this rank's model shard ("model.*"), optimizer state
        rank-00001.safetensors   ("optimizer.*") and torch RNG state; numpy/python RNG in
        ...                      the safetensors metadata as JSON
        meta.json                step, resolved config, sampler state, loss scale, layout
    step-00000200.partial/       a write in progress (or one killed mid-way): never loaded

Every rank writes its shard into the `.partial` directory, then after a barrier rank 0 writes
meta.json last and renames the directory; a crash at any point leaves the previous checkpoints
as they were. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .distributed import barrier

CHECKPOINT_DIR = "checkpoints"
META_FILE = "meta.json"
_NAME = re.compile(r"^step-(\d{8})$")
FORMAT_VERSION = 1


class CheckpointLoadError(RuntimeError):
    """A checkpoint that cannot be read or does not fit this run."""


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


def save_checkpoint(root: str | os.PathLike, step: int, rank: int, model: torch.nn.Module,
                    optimizer, meta: dict[str, Any], keep: int) -> Path:
    """Collective: every rank writes its shard; rank 0 writes meta.json and renames.

    `meta` (JSON-safe) is only used on rank 0. Returns the final directory.
    """
    from safetensors.torch import save_file

    root = Path(root)
    final = step_dir(root, step)
    partial = final.with_name(final.name + ".partial")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()

    tensors = {f"model.{name}": p.detach().to("cpu").contiguous() for name, p in model.named_parameters()}
    for key, value in optimizer.state_dict().items():
        tensors[f"optimizer.{key}"] = value.detach().to("cpu").contiguous()
    rng_tensors, rng_meta = rng_state()
    tensors.update(rng_tensors)
    file = rank_file(partial, rank)
    save_file(tensors, str(file), metadata={"format": "pt", "rank": str(rank), **rng_meta})
    _fsync(file)
    barrier()

    if rank == 0:
        meta = {"format_version": FORMAT_VERSION, "step": step, **meta}
        meta_file = partial / META_FILE
        meta_file.write_text(json.dumps(meta, indent=2) + "\n")
        _fsync(meta_file)
        if final.exists():  # the same step saved again (e.g. at the end after a periodic save)
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        partial.rename(final)
        for _, path in list_checkpoints(root)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
    barrier()
    return final


# ---- load ----------------------------------------------------------------------------------------


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    directory = Path(directory)
    meta_file = directory / META_FILE
    if not meta_file.is_file():
        raise CheckpointLoadError(f"{directory} is not a complete checkpoint: {META_FILE} is missing")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointLoadError(f"cannot read {meta_file}: {err}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointLoadError(
            f"{meta_file} has format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    return meta


def load_checkpoint(directory: str | os.PathLike, rank: int, model: torch.nn.Module,
                    optimizer) -> dict[str, Any]:
    """Load this rank's model shard, optimizer state and RNG state; return the metadata."""
    from safetensors import safe_open

    directory = Path(directory)
    meta = read_meta(directory)
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
