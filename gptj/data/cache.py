"""On-disk cache of tokenized data as .npz files (numpy arrays only, never pickle).

Files are named by a hash of everything that determines their content, written under a
temporary name and renamed into place so that a crash or a concurrent writer never leaves a
half-written file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

CACHE_ENV = "GPTJ_DATA_CACHE"
FORMAT_VERSION = 1  # bump when the layout of cached arrays changes


def cache_root(cache_dir=None) -> Path:
    """Argument, else $GPTJ_DATA_CACHE, else ~/.cache/gptj-data."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gptj-data"


def cache_key(parts: dict) -> str:
    blob = json.dumps({"version": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def cache_path(root: Path, kind: str, key: str) -> Path:
    return root / f"{kind}-{key}.npz"


def load(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when absent or unreadable (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        print(f"data: ignoring unreadable cache file {path}: {e}", file=sys.stderr)
        return None


def save(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def pack_strings(strings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings as one uint8 UTF-8 buffer + int64 offsets (no object arrays)."""
    encoded = [s.encode("utf-8") for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


def unpack_strings(buffer: np.ndarray, offsets: np.ndarray) -> list[str]:
    raw = buffer.tobytes()
    return [raw[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]


def pack_json(obj) -> np.ndarray:
    return np.frombuffer(json.dumps(obj).encode("utf-8"), dtype=np.uint8).copy()


def unpack_json(buffer: np.ndarray):
    return json.loads(buffer.tobytes().decode("utf-8"))
