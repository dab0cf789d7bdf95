"""The package's layers import only downwards, read from the sources with `ast` (nothing is imported).

    gptj.errors                          the one error base class: imports nothing
    gptj.model, gptj.data, gptj.config   each imports only itself (data may read config presets)
    gptj.execution.runtime               + model, data, config
    gptj.execution.{training,inference}  + runtime (and each other)
    gptj.serving                         + execution
    gptj.commands                        + serving

and, beside the order: gptj.data never imports torch, directly or through another module; the
runtime imports neither training nor inference; nothing but the commands imports serving.
Imports inside functions count as much as those at the top of a file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gptj"

# What each layer may import besides itself and gptj.errors.
ALLOWED = {
    "gptj.errors": set(),
    "gptj.model": set(),
    "gptj.config": set(),
    "gptj.data": {"gptj.config"},
    "gptj.execution.runtime": {"gptj.model", "gptj.data", "gptj.config"},
    "gptj.execution.training": {"gptj.model", "gptj.data", "gptj.config", "gptj.execution.runtime",
                                "gptj.execution.inference"},
    "gptj.execution.inference": {"gptj.model", "gptj.data", "gptj.config", "gptj.execution.runtime",
                                 "gptj.execution.training"},
    "gptj.serving": {"gptj.model", "gptj.data", "gptj.config", "gptj.execution.runtime",
                     "gptj.execution.training", "gptj.execution.inference"},
    "gptj.commands": {"gptj.model", "gptj.data", "gptj.config", "gptj.execution.runtime",
                      "gptj.execution.training", "gptj.execution.inference", "gptj.serving"},
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, imported module or module.name) for every import statement in `source`."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return found


def layer_of(name: str) -> str | None:
    """The layer (a key of ALLOWED) a gptj module belongs to; None for the bare packages."""
    return max((layer for layer in ALLOWED if name == layer or name.startswith(layer + ".")),
               key=len, default=None)


def import_graph(root: Path) -> dict[str, list[tuple[int, str]]]:
    """{module: [(line, project module it imports)]} for every .py file under root/gptj;
    `from pkg import name` counts as importing pkg.name when that is a module, else pkg."""
    files = {module_name(p, root): p for p in (root / "gptj").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        edges = []
        for line, target in imports_of(path.read_text(encoding="utf-8"), name, path.name == "__init__.py"):
            if target == "gptj" or not target.startswith("gptj."):
                if not target.startswith("gptj."):
                    edges.append((line, target))  # third-party: kept for the torch rule
                continue
            while target not in files and "." in target:
                target = target.rpartition(".")[0]
            edges.append((line, target))
        graph[name] = sorted(set(edges))
    return graph


def violations(root: Path) -> list[str]:
    graph = import_graph(root)
    found = []
    for module, edges in graph.items():
        here = layer_of(module)
        for line, target in edges:
            if not target.startswith("gptj"):
                continue
            there = layer_of(target)
            if here is None or there is None or there in (here, "gptj.errors"):
                continue
            if there not in ALLOWED[here]:
                found.append(f"{module}:{line} imports {target} ({here} may not import {there})")
    found += torch_in_data(graph)
    return found


def loads_torch(target: str) -> bool:
    """Whether importing `target` loads torch (transformers' tokenizers do not: the data layer's
    optional PreTrainedTokenizerFast conversion stays torch-free)."""
    return target.split(".")[0] in ("torch", "peft", "accelerate") or target.startswith("safetensors.torch")


def torch_in_data(graph: dict[str, list[tuple[int, str]]]) -> list[str]:
    """Each gptj.data module that reaches torch, with the chain of imports that gets there."""
    found = []
    for start in sorted(m for m in graph if layer_of(m) == "gptj.data"):
        chains, todo = {start: [start]}, [start]
        while todo:
            module = todo.pop()
            hit = next((t for _, t in graph.get(module, []) if loads_torch(t)), None)
            if hit is not None:
                found.append(f"{start} imports torch: {' -> '.join(chains[module] + [hit])}")
                break
            for _, target in graph.get(module, []):
                if target in graph and target not in chains:
                    chains[target] = chains[module] + [target]
                    todo.append(target)
    return found


def test_layers_import_only_downwards():
    graph = import_graph(ROOT)
    assert sum(len(e) for e in graph.values()) > 200  # the parser sees the project's imports
    assert violations(ROOT) == []


def _project(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for directory in {p.parent for p in tmp_path.rglob("*.py")}:
        (directory / "__init__.py").touch()
    return tmp_path


STUBS = ["gptj/execution/runtime/precision.py", "gptj/execution/training/loss.py",
         "gptj/execution/inference/y.py", "gptj/serving/server.py", "gptj/commands/generate.py",
         "gptj/data/helper.py"]


@pytest.mark.parametrize("name,text,expected", [
    ("gptj/model/x.py", "from gptj.execution.runtime import precision\n",
     "gptj.model may not import gptj.execution.runtime"),
    ("gptj/model/x.py", "def f():\n    from ..data import helper\n", "gptj.model may not import gptj.data"),
    ("gptj/execution/runtime/x.py", "from gptj.execution.training import loss\n",
     "gptj.execution.runtime may not import gptj.execution.training"),
    ("gptj/execution/runtime/x.py", "import gptj.execution.inference.y\n",
     "gptj.execution.runtime may not import gptj.execution.inference"),
    ("gptj/execution/inference/x.py", "from gptj.serving import server\n",
     "gptj.execution.inference may not import gptj.serving"),
    ("gptj/execution/training/x.py", "from gptj.commands import generate\n", "may not import gptj.commands"),
    ("gptj/data/x.py", "import torch\n", "gptj.data.x imports torch: gptj.data.x -> torch"),
])
def test_each_rule_catches_its_violation(tmp_path, name, text, expected):
    found = violations(_project(tmp_path, {name: text, **dict.fromkeys(STUBS, "")}))
    assert any(expected in line for line in found), found


def test_data_reaching_torch_through_another_module_is_caught(tmp_path):
    files = {"gptj/data/x.py": "from gptj.data import helper\n", "gptj/data/helper.py": "import numpy\n",
             "gptj/data/deep.py": "def f():\n    from . import x\n"}
    assert violations(_project(tmp_path, files)) == []
    files["gptj/data/helper.py"] = "def f():\n    import torch.nn\n"
    found = violations(_project(tmp_path, files))
    assert "gptj.data.deep imports torch: gptj.data.deep -> gptj.data.x -> gptj.data.helper -> torch.nn" in found


def test_allowed_imports_pass(tmp_path):
    files = {"gptj/commands/x.py": "from gptj.serving import server\nfrom gptj.errors import GPTJError\n",
             "gptj/serving/server.py": "from gptj.execution.inference import y\n",
             "gptj/execution/inference/y.py": "from gptj.execution.runtime import precision\nimport torch\n",
             "gptj/execution/runtime/precision.py": "from gptj.model import m\n",
             "gptj/model/m.py": "from gptj.errors import GPTJError\nimport torch\n",
             "gptj/data/d.py": "from gptj.config import presets\nimport numpy\n", "gptj/config/presets.py": "",
             "gptj/errors.py": ""}
    assert violations(_project(tmp_path, files)) == []
