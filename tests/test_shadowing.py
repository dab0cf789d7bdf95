"""The Python API from a folder of the user's own that has `data/` and `config/` folders (and
even a `data/__init__.py` of its own): the project's packages are the ones imported.

Reference: README's example run from the project root gives the same labels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json
import gptj.serving.app  # serving alone first, then the README example
from gptj.execution.inference.pipelines import EntailmentPipeline, TextGenerationPipeline
import gptj.config as config, gptj.data as data
nli = EntailmentPipeline.from_pretrained("random:tiny")
result = nli("The grey cat sits near the door.", "The grey cat sits.")
print(json.dumps({"label": result["label"], "text": TextGenerationPipeline.from_pretrained("random:tiny")(
    "The cat sat on the", max_new_tokens=4), "data": data.__file__, "config": config.__file__}))
"""


def _run(cwd: Path) -> dict:
    (cwd / "nli.py").write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the project comes after the script's folder
    proc = subprocess.run([sys.executable, "nli.py"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_api_from_a_folder_with_its_own_data_and_config(tmp_path):
    user = tmp_path / "user"
    (user / "data").mkdir(parents=True)
    (user / "data" / "train.csv").write_text("premise,hypothesis,label\na,b,entailment\n")
    (user / "config").mkdir()
    (user / "config" / "settings.yml").write_text("lr: 1\n")
    clean = tmp_path / "clean"
    clean.mkdir()
    reference = _run(clean)

    got = _run(user)
    assert got == reference
    assert Path(got["data"]).parent == ROOT / "gptj" / "data" and Path(got["config"]).parent == ROOT / "gptj" / "config"

    (user / "data" / "__init__.py").write_text("NOT_THE_PROJECT = True\n")  # a regular package too
    assert _run(user) == reference
