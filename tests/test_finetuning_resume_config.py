"""A run directory keeps its resolved config (OUTPUT_DIR/config.yaml), and `--resume
--output-dir DIR` continues that run, not the preset's: same steps, schedule and custom task.
A changed setting is named; one a checkpoint cannot continue under is exit 2. A fresh run into a
used directory is refused before anything is loaded, and a run that fails before writing
anything leaves no directory behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

import gptj.execution.training.loop
from gptj.execution.training import checkpoint as ckpt
from tests.test_finetuning_edges import nli_rows, run, write_rows

SHAPE = ["--set", "model.shape={hidden_size: 64, num_heads: 4, rotary_dim: 8, num_layers: 1}"]
QUIET = ["--set", "logging.progress=false", "--set", "logging.tensorboard=false", "--set", "training.threads=1"]


def custom_task(path: Path) -> Path:
    path.write_text("prompt: 'does {premise} imply {hypothesis}? =>'\n"
                    "target: ' {label}'\n"
                    "fields: {premise: premise, hypothesis: hypothesis, label: label}\n"
                    "labels: [implied, unclear, contradicted]\n")
    return path


def metrics(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """A 4-step run of a custom task with a decaying LR, cut back to its step-2 checkpoint as if
    stopped there: (run directory, data file, the full run's metrics by step)."""
    root = tmp_path_factory.mktemp("resume")
    data = write_rows(root / "train.jsonl", nli_rows(24))
    task = custom_task(root / "entail.yml")
    out = root / "run"
    code, _, err = run(["--task", str(task), "--dataset", str(data), "--output-dir", str(out), "--steps", "4",
                        "--global-batch-size", "4", "--micro-batch-size", "4", "--lr", "0.004",
                        "--set", "schedule.decay=linear", "--set", "schedule.warmup_steps=1",
                        "--checkpoint-every", "2", *SHAPE, *QUIET])
    assert code == 0, err
    full = metrics(out)
    assert sorted(full) == [1, 2, 3, 4]
    return out, data, full


def cut_back(started, tmp_path) -> Path:
    """A copy of the run directory whose newest checkpoint is step 2."""
    out = tmp_path / "run"
    shutil.copytree(started[0], out)
    shutil.rmtree(ckpt.step_dir(ckpt.checkpoint_root(out), 4))
    shutil.rmtree(out / "hf", ignore_errors=True)
    return out


def test_the_run_directory_keeps_its_resolved_config(started):
    out, data, _ = started
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["training"]["steps"] == 4 and saved["data"]["task"].endswith("entail.yml")
    assert saved["schedule"]["warmup_steps"] == 1 and saved["schedule"]["decay"] == "linear"


def test_resume_with_only_the_output_dir_continues_that_run(started, tmp_path):
    out = cut_back(started, tmp_path)
    code, stdout, err = run(["--resume", "--output-dir", str(out)])
    assert code == 0, err
    assert f"resumed from {ckpt.step_dir(ckpt.checkpoint_root(out), 2)} at step 2" in stdout
    assert "done: 4 steps" in stdout and "changed" not in stdout
    resumed, full = metrics(out), started[2]
    for step in (3, 4):  # the same schedule and data: the uninterrupted run's steps
        assert resumed[step]["lr"] == full[step]["lr"]
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-5)


def test_a_setting_changed_on_resume_is_named(started, tmp_path):
    out = cut_back(started, tmp_path)
    code, stdout, err = run(["--resume", "--output-dir", str(out), "--steps", "5"])
    assert code == 0, err
    assert "resume: training.steps changed from 4 to 5 on this command line" in stdout
    assert "done: 5 steps" in stdout
    assert yaml.safe_load((out / "config.yaml").read_text())["training"]["steps"] == 5


@pytest.mark.parametrize("argv, message", [
    (["--sequence-length", "64"], "was trained with data.sequence_length=32; --resume cannot continue it with 64"),
    (["--task", "mnli"], "was trained with data.task="),
    (["--global-batch-size", "8", "--micro-batch-size", "8"], "training.global_batch_size=4"),
])
def test_a_setting_the_checkpoint_cannot_continue_under_is_exit_2(started, tmp_path, argv, message,
                                                                    monkeypatch):
    out = cut_back(started, tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(gptj.execution.training.loop, "train", refuse)
    code, stdout, err = run(["--resume", "--output-dir", str(out), *argv])
    assert code == 2 and message in err and err.strip().count("\n") == 0, err


def test_a_fresh_run_into_a_used_directory_is_refused_before_loading(started, tmp_path, monkeypatch):
    out = cut_back(started, tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("the model and data were loaded before the output directory was checked")

    monkeypatch.setattr(gptj.execution.training.loop, "train", refuse)
    code, stdout, err = run(["--dataset", str(started[1]), "--output-dir", str(out), *SHAPE, *QUIET])
    assert code == 2 and "already holds checkpoints" in err and stdout == "", err


def test_a_run_that_fails_before_writing_leaves_no_directory(tmp_path):
    unlabeled = write_rows(tmp_path / "unlabeled.jsonl", nli_rows(5, labelled=False))
    code, _, err = run(["--dataset", str(unlabeled), "--output-dir", str(tmp_path / "run"), *SHAPE, *QUIET])
    assert code == 2 and "no usable training rows" in err
    assert not (tmp_path / "run").exists()
