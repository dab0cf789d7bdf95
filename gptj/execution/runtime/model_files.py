"""A damaged weight file, named in one line.

The safetensors reader says only "incomplete metadata" (or similar) for a cut or garbled file,
without naming it. `model_file_errors(path)` wraps a load: when reading the weights fails, the
safetensors files under `path` are checked from their headers (no tensor is read), and the first
damaged one is reported as a `ModelFileError` (a ValueError, so the command lines exit 2).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from gptj.errors import GPTJError
from gptj.model.tensor_files import read_header


class ModelFileError(GPTJError, ValueError):
    """A weight file that cannot be read: cut short, or not a safetensors file at all."""


def safetensors_problem(file: Path) -> str | None:
    """What is wrong with this safetensors file's layout, or None when header and size agree."""
    size = file.stat().st_size
    if size < 8:
        return f"{size} bytes, too short for a safetensors header"
    with file.open("rb") as f:
        try:
            header, data_start = read_header(f)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "its header is not valid JSON"
        except ValueError as err:
            return str(err)
    if data_start > size:
        return f"header of {data_start - 8} bytes does not fit in the file's {size} bytes (cut short?)"
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        return "its header has a tensor without valid data_offsets"
    if data_start + end > size:
        return f"{size} bytes, the header needs {data_start + end} (cut short?)"
    return None


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files a model path stands for: the file itself, or those in the folder,
    its `hf/` export and its `adapter/`."""
    p = Path(path)
    if p.is_file():
        return [p] if p.suffix == ".safetensors" else []
    found = []
    for folder in (p, p / "hf", p / "adapter"):
        if folder.is_dir():
            found += sorted(folder.glob("*.safetensors"))
    return found


def find_damaged(paths) -> tuple[Path, str] | None:
    for path in paths:
        if not path:
            continue
        for file in weight_files(path):
            problem = safetensors_problem(file)
            if problem:
                return file, problem
    return None


@contextlib.contextmanager
def model_file_errors(*paths):
    """Turn a failure to read weights under `paths` (model, adapter) into a ModelFileError naming
    the damaged file. Errors with no damaged file behind them pass through unchanged."""
    try:
        yield
    except ModelFileError:
        raise
    except Exception as err:
        damaged = find_damaged(paths)
        if damaged is None:
            raise
        file, problem = damaged
        raise ModelFileError(f"damaged model file {file}: {problem}; "
                             f"reading it failed with {type(err).__name__}: {str(err).splitlines()[0] if str(err) else '-'}") from err
