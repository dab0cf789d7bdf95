"""The project's top-level packages win over same-named folders of the user's.

The layers are top-level packages with plain names (`data`, `config`, ...). Python looks in the
running script's folder first, and an editable install's finder comes after the ordinary path
search, so a user's own `data/` folder beside their script (a namespace package, or a package
of theirs) would be imported where the project expects its own `data`. When `execution` is
imported, a finder for exactly the project's names is put at the front of `sys.meta_path`,
mapping them to the folder this package lives in; a same-named module already imported from
elsewhere is dropped from `sys.modules`, so the next import finds the project's.
"""

from __future__ import annotations

import sys
from importlib.abc import MetaPathFinder
from importlib.machinery import PathFinder
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PROJECT_PACKAGES = ("gptj", "execution", "data", "config", "serving")


class ProjectPackageFinder(MetaPathFinder):
    """Finds the project's top-level packages in PROJECT_ROOT, and nothing else."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in PROJECT_PACKAGES:
            return None
        return PathFinder.find_spec(fullname, [str(PROJECT_ROOT)])


def _is_ours(module) -> bool:
    where = getattr(module, "__file__", None)
    return where is not None and Path(where).resolve().parent.parent == PROJECT_ROOT


def claim_project_packages() -> None:
    if not any(isinstance(f, ProjectPackageFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, ProjectPackageFinder())
    for name in PROJECT_PACKAGES:
        module = sys.modules.get(name)
        if module is not None and not _is_ours(module):
            for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                del sys.modules[loaded]
