"""run_finetuning.py at its edges: inputs checked before work, typed overrides, unusable data,
reruns that never silently delete a run, resuming a finished run, every --model form."""

from __future__ import annotations

import contextlib
import errno
import io
import json
from pathlib import Path

import pytest

import gptj.commands.finetune as run_finetuning
import gptj.execution.training.loop
from gptj.execution.training import checkpoint as ckpt
from tests.fixtures.os_faults import refuse_writes_in

QUIET = ["--set", "logging.progress=false", "--set", "logging.tensorboard=false",
         "--set", "training.threads=1", "--steps", "1", "--global-batch-size", "8",
         "--micro-batch-size", "8"]
FAST = ["--set", "model.shape={hidden_size: 64, num_heads: 4, rotary_dim: 8, num_layers: 1}", *QUIET]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def nli_rows(n: int, labelled: bool = True) -> list[dict]:
    rows = [{"premise": f"A cat sleeps {i}.", "hypothesis": "A cat rests."} for i in range(n)]
    return [{**r, "label": i % 3} for i, r in enumerate(rows)] if labelled else rows


def run(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_finetuning.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def no_training(monkeypatch):
    """Checks that must happen before any work: starting the run fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("training started before the input was checked")
    monkeypatch.setattr(gptj.execution.training.loop, "train", refuse)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One short run on a single data file without --eval-dataset: (dir, data file, stderr)."""
    root = tmp_path_factory.mktemp("finished")
    train = write_rows(root / "train.jsonl", nli_rows(24))
    code, _, err = run(["--dataset", str(train), "--output-dir", str(root / "run"), *FAST])
    assert code == 0, err
    return root / "run", train, err


def test_evaluating_on_the_training_file_is_a_warning(finished):
    _, train, err = finished
    assert "warning: evaluation split train is the training data itself" in err


def test_resuming_a_finished_run_does_nothing(finished):
    out, train, _ = finished
    history = (out / "eval_history.jsonl").read_text()
    exported = (out / "hf" / "model.safetensors").stat().st_mtime_ns
    code, stdout, _ = run(["--dataset", str(train), "--output-dir", str(out), "--resume", *FAST])
    assert code == 0 and "already at step 1 of 1: nothing to do" in stdout
    assert (out / "eval_history.jsonl").read_text() == history
    assert (out / "hf" / "model.safetensors").stat().st_mtime_ns == exported


def test_a_rerun_refuses_to_delete_the_earlier_checkpoints(finished):
    out, train, _ = finished
    before = ckpt.list_checkpoints(ckpt.checkpoint_root(out))
    code, _, err = run(["--dataset", str(train), "--output-dir", str(out), *FAST])
    assert code == 2 and "already holds checkpoints" in err
    assert ckpt.list_checkpoints(ckpt.checkpoint_root(out)) == before != []
    assert run_finetuning.build_config(run_finetuning.parse_args([])).checkpoint.overwrite is False


def test_another_task_or_dataset_gets_its_own_default_output_dir():
    def out_path(*argv):
        return run_finetuning.build_config(run_finetuning.parse_args(list(argv))).out_path

    assert out_path() == Path("runs/tiny")
    assert out_path("--dataset", "data/tickets.csv") == Path("runs/tiny-tickets")
    assert out_path("--task", "sst2", "--dataset", "hf:glue/sst2") == Path("runs/tiny-sst2")
    assert out_path("--task", "my_task.yml", "--dataset", "rows.jsonl") == Path("runs/tiny-my_task-rows")
    assert out_path("--dataset", "x.csv", "--output-dir", "elsewhere") == Path("elsewhere")


def test_lora_and_qlora_runs_get_their_own_default_output_dir():
    """README's demos run in order: the LoRA run after the full one does not meet its checkpoints."""
    def out_path(*argv):
        return run_finetuning.build_config(run_finetuning.parse_args(list(argv))).out_path

    assert out_path("--lora-rank", "8") == Path("runs/tiny-lora8")
    assert out_path("--lora-rank", "8", "--quantize", "int4") == Path("runs/tiny-lora8-int4")
    assert out_path("--lora-rank", "8", "--dataset", "x.csv") == Path("runs/tiny-x-lora8")
    assert out_path("--config", "gptj-6b-mnli-lora-1gpu") == Path("runs/gptj-6b-mnli-lora-1gpu")
    assert out_path("--lora-rank", "8", "--output-dir", "elsewhere") == Path("elsewhere")


def test_every_model_form_works_as_in_inference(finished, tmp_path):
    out, train, _ = finished
    code, stdout, err = run(["--model", str(out), "--dataset", str(train), "--output-dir", str(tmp_path / "again"),
                             "--set", "eval.at_end=false", "--set", "checkpoint.export_hf=false", *QUIET])
    assert code == 0, err
    assert f"run: full fine-tuning of {out / 'hf'}, " in stdout


@pytest.mark.parametrize("argv, message", [
    (["--model", "/nonexistent/model"], "--model /nonexistent/model: model directory does not exist"),
    (["--model", "{tmp}"], "no config.json"),
    (["--dataset", "{tmp}/missing.jsonl"], "data file not found: {tmp}/missing.jsonl"),
    (["--eval-dataset", "{tmp}@validation"], "no file for split 'validation'"),
    (["--output-dir", "{tmp}/file.txt"], "--output-dir {tmp}/file.txt is a file, not a directory"),
    (["--output-dir", "{tmp}/file.txt/run"], "file.txt is a file, not a directory"),
    (["--output-dir", "/sys/gptj-run"], "--output-dir /sys/gptj-run: cannot write in /sys"),
    (["--output-dir", "{tmp}/locked/run"], "cannot write in {tmp}/locked (Permission denied)"),
    (["--output-dir", "{tmp}/full/run"], "cannot write in {tmp}/full (No space left on device)"),
])
def test_bad_paths_are_one_line_and_exit_2_before_any_work(argv, message, tmp_path, no_training, monkeypatch):
    (tmp_path / "file.txt").write_text("x")
    for name, code in (("locked", errno.EACCES), ("full", errno.ENOSPC)):
        (tmp_path / name).mkdir()
        refuse_writes_in(monkeypatch, tmp_path / name, code)  # for root too, where chmod cannot
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--output-dir" not in argv:
        argv += ["--output-dir", str(tmp_path / "run")]
    code, _, err = run(argv)
    assert code == 2, err
    assert message.replace("{tmp}", str(tmp_path)) in err and err.strip().count("\n") == 0
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["--set", "model.shape.num_layers=abc"], "model.shape.num_layers must be an integer, got 'abc'"),
    (["--set", "model.shape.num_layers=2.5"], "model.shape.num_layers must be an integer, got 2.5"),
    (["--set", "model.shape.layers=2"], "unknown field model.shape.layers; known in model.shape: vocab_size, "),
    (["--steps", "3", "--set", "training.steps=abc"], "training.steps must be an integer, got 'abc'"),
])
def test_bad_override_values_are_typed_errors(argv, message, tmp_path, no_training):
    code, _, err = run([*argv, "--output-dir", str(tmp_path)])
    assert code == 2 and message in err and err.strip().count("\n") == 0


def test_data_without_a_usable_row_is_an_error_naming_file_and_reason(tmp_path):
    unlabeled = write_rows(tmp_path / "unlabeled.jsonl", nli_rows(5, labelled=False))
    good = write_rows(tmp_path / "good.jsonl", nli_rows(8))
    code, _, err = run(["--dataset", str(unlabeled), "--output-dir", str(tmp_path / "a"), *FAST])
    assert code == 2
    assert f"error: no usable training rows in {unlabeled}: missing_field 5 of 5 read" in err
    assert "Traceback" not in err and not (tmp_path / "a" / "metrics.jsonl").exists()
    code, _, err = run(["--dataset", str(good), "--eval-dataset", str(unlabeled),
                        "--output-dir", str(tmp_path / "b"), *FAST])
    assert code == 2 and f"error: no usable evaluation rows in {unlabeled}: missing_field 5" in err
    assert not (tmp_path / "b" / "metrics.jsonl").exists()
