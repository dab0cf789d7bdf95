"""Reading the small JSON files beside weights (config.json, adapter_config.json, a
checkpoint's meta.json): a file that cannot be read or parsed is one error naming it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(file: Path, error: type[Exception], problem: str = "{file} is not valid JSON") -> Any:
    """The JSON value in `file`; an unreadable file or invalid JSON raises `error` with
    `problem` (its "{file}" filled in) and the reason."""
    try:
        return json.loads(Path(file).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{problem.format(file=file)}: {err}") from None
