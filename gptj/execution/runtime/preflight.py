"""Checks of user input that run before any work: where results go and which model is meant.

Both command lines call these first, so a bad path or model name costs one line on stderr and
exit code 2, not a traceback after minutes of loading, training or generating (and never the
loss of results that were already computed).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from gptj.errors import UsageError


class InputError(UsageError):
    """A path or name from the user that cannot work, explained in one line."""


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def _check_writable_directory(directory: Path, what: str) -> None:
    """`directory` exists: it must be a directory in which a file can be created."""
    if not directory.is_dir():
        raise InputError(f"{what}: {directory} is a file, not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
            pass
    except OSError as err:
        raise InputError(f"{what}: cannot write in {directory} ({err.strerror or err})") from None


def check_output_file(path: str | Path, option: str = "--output") -> Path:
    """A file that can be written (created with its missing parent directories) later."""
    path = Path(path).expanduser()
    what = f"{option} {path}"
    if path.is_dir():
        raise InputError(f"{what} is a directory; name a file")
    if path.exists():
        try:
            with path.open("a"):  # appending nothing leaves the file as it is
                pass
        except OSError as err:
            raise InputError(f"{what}: cannot write it ({err.strerror or err})") from None
        return path
    _check_writable_directory(_nearest_existing(path.parent), what)
    return path


def check_output_dir(path: str | Path, option: str = "--output-dir") -> Path:
    """A directory that exists and is writable, or can be created."""
    path = Path(path).expanduser()
    what = f"{option} {path}"
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} is a file, not a directory")
    _check_writable_directory(_nearest_existing(path), what)
    return path


def looks_local(name: str) -> bool:
    """A name meant as a local path: Hub ids are `name` or `org/name` (unless `org` is a local
    directory, as `runs` in `runs/tiny`)."""
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        return True
    return "/" in name and Path(name).parent.is_dir()


def resolve_model_source(name_or_path: str, option: str = "--model") -> str:
    """The model directory behind every accepted `--model` form.

    `random:PRESET` and Hub ids (`org/name`) are returned as they are; a local path is resolved
    by gptj/execution/runtime/run_dirs.py (a model directory, or a run_finetuning.py output
    directory's hf/ export), which raises an InputError naming what is wrong.
    """
    from gptj.execution.runtime.run_dirs import resolve_model_dir  # it imports InputError from here

    name = str(name_or_path)
    if name.startswith("random:"):
        return name
    if Path(name).expanduser().exists() or looks_local(name):
        return resolve_model_dir(name, option)
    return name
