"""Checkpoints: bit-identical resume, atomic writes, retention, named errors."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from gptj.execution.training import checkpoint as ckpt
from gptj.execution.training.config import TrainConfigError
from gptj.execution.training.loop import train
from tests.fixtures.training import parameters_of, read_metrics, small_config


def test_interrupted_and_resumed_run_is_bit_identical(tmp_path):
    steps = {"training.steps": 6, "checkpoint.every": 3, "checkpoint.keep": 5,
             "schedule.warmup_steps": 2, "schedule.decay": "cosine"}
    full = train(small_config(tmp_path / "full", **steps, **{"checkpoint.at_end": True}))
    root = ckpt.checkpoint_root(tmp_path / "full")
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [3, 6]

    # The same run interrupted after step 3: its directory holds only what existed then.
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    shutil.rmtree(ckpt.step_dir(ckpt.checkpoint_root(cut), 6))
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(lines[:4]) + "\n")  # step 4 was written, then a crash

    resumed = train(small_config(cut, **steps, resume=True))
    assert resumed.losses == full.losses[3:]  # exactly equal, not approximately
    assert [m["loss"] for m in read_metrics(cut)] == full.losses
    assert [m["step"] for m in read_metrics(cut)] == [1, 2, 3, 4, 5, 6]
    final_full, final_resumed = parameters_of(full.model), parameters_of(resumed.model)
    for name, value in final_full.items():
        assert torch.equal(value, final_resumed[name]), name


def test_partial_write_is_ignored_and_cleaned(tmp_path):
    run = small_config(tmp_path, **{"training.steps": 2, "checkpoint.every": 1, "checkpoint.keep": 3,
                                    "checkpoint.at_end": True})
    train(run)
    root = ckpt.checkpoint_root(tmp_path)
    good = ckpt.latest_checkpoint(root)
    assert ckpt.read_meta(good)["step"] == 2
    # What a kill -9 during a write leaves: a .partial directory with a half-written shard,
    # and (if killed between rename steps of another tool) a step directory without meta.json.
    partial = root / "step-00000003.partial"
    partial.mkdir()
    (partial / "rank-00000.safetensors").write_bytes(b"\x00\x01 half a header")
    (root / "step-00000009").mkdir()
    assert ckpt.latest_checkpoint(root) == good

    resumed = train(small_config(tmp_path, **{"training.steps": 3, "checkpoint.keep": 3,
                                             "checkpoint.at_end": True}, resume=True))
    assert len(resumed.losses) == 1  # continued at step 2, not at 3 or 9
    assert not partial.exists()
    assert ckpt.read_meta(ckpt.latest_checkpoint(root))["step"] == 3


def test_keeps_the_newest_k(tmp_path):
    train(small_config(tmp_path, **{"training.steps": 5, "checkpoint.every": 1, "checkpoint.keep": 2,
                                   "checkpoint.at_end": True}))
    assert [s for s, _ in ckpt.list_checkpoints(ckpt.checkpoint_root(tmp_path))] == [4, 5]


def test_resume_errors_name_the_problem(tmp_path):
    train(small_config(tmp_path, **{"training.steps": 1, "checkpoint.at_end": True}))
    other_shape = small_config(tmp_path, resume=True)
    other_shape.model.shape["num_layers"] = 1
    with pytest.raises(ckpt.CheckpointLoadError, match="num_layers: checkpoint 2, this run 1"):
        train(other_shape)
    other_data = small_config(tmp_path, resume=True, **{"data.sequence_length": 48})
    with pytest.raises(ckpt.CheckpointLoadError, match="sequence_length=32"):
        train(other_data)
    shard = ckpt.rank_file(ckpt.latest_checkpoint(ckpt.checkpoint_root(tmp_path)), 0)
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointLoadError, match="no valid checkpoint left .*step-00000001 is damaged"):
        train(small_config(tmp_path, resume=True))
    with pytest.raises(TrainConfigError, match="already holds checkpoints .*--resume"):
        train(small_config(tmp_path, **{"checkpoint.overwrite": False}))
    meta = ckpt.latest_checkpoint(ckpt.checkpoint_root(tmp_path)) / ckpt.META_FILE
    meta.write_text("{not json")
    with pytest.raises(ckpt.CheckpointLoadError, match="meta.json"):
        ckpt.read_meta(meta.parent)


def test_rng_state_round_trip_without_pickle():
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    tensors, strings = ckpt.rng_state()
    assert all(isinstance(json.loads(v), dict) for v in strings.values())
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9)
    np.random.seed(9)
    random.seed(9)
    ckpt.set_rng_state(tensors, strings)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]


KILLED_WRITER = """
import os, signal, sys
sys.path.insert(0, {root!r})
from gptj.execution.training import checkpoint as ckpt
from gptj.execution.training.config import TrainConfigError
from gptj.execution.training.loop import train
from tests.fixtures.training import small_config

real_fsync = ckpt._fsync
def fsync_then_die(path):
    real_fsync(path)
    if "step-00000002.partial" in str(path):  # the second checkpoint's shard is on disk
        os.kill(os.getpid(), signal.SIGKILL)
ckpt._fsync = fsync_then_die
train(small_config({out!r}, **{{"training.steps": 3, "checkpoint.every": 1}}))
"""


def test_kill_9_during_a_write_keeps_the_previous_checkpoint(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root_dir = Path(__file__).resolve().parents[1]
    script = KILLED_WRITER.format(root=str(root_dir), out=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], cwd=root_dir, capture_output=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    root = ckpt.checkpoint_root(tmp_path)
    assert (root / "step-00000002.partial").is_dir()
    latest = ckpt.latest_checkpoint(root)
    assert ckpt.read_meta(latest)["step"] == 1
    resumed = train(small_config(tmp_path, **{"training.steps": 3}, resume=True))
    assert len(resumed.losses) == 2  # steps 2 and 3 again
    assert not (root / "step-00000002.partial").exists()
