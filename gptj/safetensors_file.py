"""safetensors' save_file with the file mode every other file gets.

safetensors writes through a private temporary file, so what it leaves is mode 0600 whatever the
umask: another user, or a container running as another uid, could not read the weights. The
file is given `0666 & ~umask`, the mode `open()` would have created it with.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def save_file(tensors: dict, file: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file as save

    save(tensors, str(file), metadata=metadata)
    Path(file).chmod(0o666 & ~current_umask())
