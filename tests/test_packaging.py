"""The project builds as a wheel that carries its presets and bundled files, and the installed
layout works from any directory (the Python API and the commands)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel of a clean copy of the sources, unpacked as pip would install it."""
    pytest.importorskip("setuptools")
    tmp = tmp_path_factory.mktemp("package")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "venv", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache",
        ".ruff_cache", "results", "tests"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--no-index", "-q", "-w", str(tmp / "dist"), str(source)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp / "dist").glob("*.whl")
    site = tmp / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(site)
    return site, names


def run_elsewhere(site: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_wheel_holds_the_packages_presets_and_bundled_files(installed):
    site, names = installed
    for name in ("gptj/model/model.py", "gptj/execution/inference/pipelines.py", "gptj/data/pipeline.py",
                 "gptj/config/presets.py", "gptj/config/finetuning.yml", "gptj/config/inference.yml",
                 "gptj/config/tasks.yml", "gptj/data/bundled/tokenizer/tokenizer.json",
                 "gptj/data/bundled/mnli_sample/train.jsonl", "gptj/commands/finetune.py",
                 "gptj/commands/generate.py", "gptj/serving/app.py", "gptj/commands/serve.py",
                 "gptj/commands/quantize.py"):
        assert name in names, name
    # One top-level package: nothing else lands in site-packages beside the wheel's metadata.
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"gptj"}
    (entry_points,) = site.glob("*.dist-info/entry_points.txt")
    text = entry_points.read_text()
    for script in ("gptj-finetune = gptj.commands.finetune:main", "gptj-generate = gptj.commands.generate:main",
                   "gptj-plan = gptj.execution.training.planner:main", "gptj-serve = gptj.commands.serve:main",
                   "gptj-quantize = gptj.commands.quantize:main"):
        assert script in text


def test_api_and_commands_work_from_another_directory(installed, tmp_path):
    site, _ = installed
    code = ("import gptj.execution, gptj.commands.generate as run_inference\n"
            "from gptj.execution.inference.pipelines import TextGenerationPipeline\n"
            "g = TextGenerationPipeline.from_pretrained('random:tiny')\n"
            "print(gptj.execution.__file__)\n"
            "print(repr(g('The cat sat on the', max_new_tokens=3)))\n"
            "raise SystemExit(run_inference.main(['--max-new-tokens', '2']))\n")
    proc = run_elsewhere(site, ["-c", code], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[0].startswith(str(site))
    assert "2 tokens in" in proc.stdout
    proc = run_elsewhere(site, ["-m", "gptj.execution.training.planner", "--machine", "cpu-24gb", "--model", "tiny"], tmp_path)
    assert proc.returncode == 0 and "recommended:" in proc.stdout, proc.stderr[-2000:]
