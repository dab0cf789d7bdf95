"""Simulated file-system failures: a directory in which nothing can be created.

Tests run as root on CI and these machines, where chmod never makes a directory read-only, so
the refusal is made by the calls themselves: os.open and os.mkdir of a path inside the
directory raise the OSError (EACCES, ENOSPC, ...) the kernel would.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


def refuse_writes_in(monkeypatch, directory: Path, code: int = errno.EACCES) -> None:
    """os.open (files, temporary files) and os.mkdir under `directory` fail with `code`."""
    inside = str(Path(directory).resolve()) + os.sep
    real_open, real_mkdir = os.open, os.mkdir

    def refused(path) -> bool:
        return str(Path(os.fspath(path)).resolve()).startswith(inside)

    def fail(path):  # OSError picks the subclass: PermissionError for EACCES
        raise OSError(code, os.strerror(code), os.fspath(path))

    def open_(path, flags, mode=0o777, *, dir_fd=None):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and refused(path):
            fail(path)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    def mkdir(path, mode=0o777, *, dir_fd=None):
        if refused(path):
            fail(path)
        return real_mkdir(path, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir)
