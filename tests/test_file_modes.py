"""Written weights honour the umask like every other file (safetensors alone leaves 0600).

Reference: under umask 022 a file made by open() is 0644; every file a run writes must be too.
"""

from __future__ import annotations

import os
import stat

import pytest

from gptj.execution.inference.quantized_checkpoints import quantize_checkpoint
from gptj.execution.training.loop import train
from tests.fixtures.training import small_config


@pytest.fixture()
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _modes(root):
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*") if p.is_file()}


def test_checkpoints_exports_adapters_and_quantized_weights_are_0644(tmp_path, umask_022):
    out = tmp_path / "run"
    train(small_config(out, **{"training.steps": 1, "lora.rank": 2, "checkpoint.at_end": True,
                               "checkpoint.export_hf": True}))
    quantize_checkpoint(str(out / "hf"), tmp_path / "int8", bits=8, progress=False)
    modes = {**_modes(out), **{f"int8/{k}": v for k, v in _modes(tmp_path / "int8").items()}}
    weights = [name for name in modes if name.endswith(".safetensors")]
    # a checkpoint shard, the merged export, the adapter and the quantized copy
    assert {name.split("/")[0] for name in weights} >= {"checkpoints", "hf", "adapter", "int8"}, weights
    assert {name: mode for name, mode in modes.items() if mode != 0o644} == {}
