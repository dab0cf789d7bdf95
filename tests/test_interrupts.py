"""Ctrl-C (SIGINT) stops a run the way SIGTERM does: the step in flight finishes, a checkpoint is
saved, one line says so, and `--resume` continues bit-identically. A second Ctrl-C stops at once.

Reference: an uninterrupted run of the same configuration (final weights must be equal).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gptj.execution.training import checkpoint as ckpt
from gptj.execution.training.loop import train
from gptj.execution.training.metrics import MetricsLogger
from tests.fixtures.training import small_config

ROOT = Path(__file__).resolve().parents[1]
STEPS = {"training.steps": 6}


def _weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _signal_after_step(monkeypatch, k: int, signum=signal.SIGINT, times: int = 1):
    """Send `signum` to this process right after step `k` is logged (`times` of them, apart)."""
    real = MetricsLogger.log_step

    def log_step(self, record):
        real(self, record)
        if record["step"] == k:
            for i in range(times):
                if i:
                    time.sleep(1.2)  # a second press, not the same press seen twice
                os.kill(os.getpid(), signum)

    monkeypatch.setattr(MetricsLogger, "log_step", log_step)


def test_sigint_after_step_k_saves_k_and_resumes_bit_identical(tmp_path, monkeypatch, capsys):
    reference = train(small_config(tmp_path / "reference", **STEPS))

    out = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        _signal_after_step(patch, 2)
        try:
            stopped = train(small_config(out, **STEPS))
        except KeyboardInterrupt:  # (not left to end the test session)
            pytest.fail("Ctrl-C ended the run instead of stopping it after the step")
    assert stopped.stopped_by_signal and stopped.final_step == 2 and stopped.exit_code == 130
    assert "Ctrl-C (SIGINT): finishing this step" in capsys.readouterr().err
    assert ckpt.read_meta(ckpt.latest_checkpoint(ckpt.checkpoint_root(out)))["step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler given back

    resumed = train(small_config(out, resume=True, **STEPS))
    assert resumed.final_step == 6 and resumed.losses == reference.losses[2:]
    want, got = _weights(reference.model), _weights(resumed.model)
    assert want.keys() == got.keys()
    for name, value in want.items():
        assert torch.equal(value, got[name]), name


def test_a_second_ctrl_c_aborts_at_once(tmp_path, monkeypatch):
    from gptj.execution.runtime.interrupt import Aborted

    _signal_after_step(monkeypatch, 2, times=2)
    with pytest.raises(Aborted):
        train(small_config(tmp_path / "run", **STEPS))
    assert ckpt.latest_checkpoint(ckpt.checkpoint_root(tmp_path / "run")) is None


SMALL = ["--set", "model.shape={hidden_size: 64, num_heads: 4, rotary_dim: 8}",
         "--set", "logging.progress=false", "--set", "logging.tensorboard=false",
         "--set", "training.threads=1"]


def _wait_for_step(proc, metrics: Path, at_least: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(metrics.read_text().splitlines()) >= at_least:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"no step {at_least} in {metrics}")


def test_command_line_ctrl_c_is_one_line_exit_130_and_resumable(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "run_finetuning.py", "--output-dir", str(out), "--steps", "100000", *SMALL],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, out / "metrics.jsonl", 2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    done = len((out / "metrics.jsonl").read_text().splitlines())
    line = f"stopped by Ctrl-C (SIGINT) at step {done}; checkpoint "
    assert line in stdout and "continue with --resume" in stdout, stdout[-2000:]
    assert ckpt.read_meta(ckpt.latest_checkpoint(ckpt.checkpoint_root(out)))["step"] == done


def test_command_line_second_ctrl_c_says_what_is_lost(tmp_path):
    out = tmp_path / "run"
    # Slow steps (about 4 s: a big batch), so that both presses land inside the step after step 1.
    proc = subprocess.Popen(
        [sys.executable, "run_finetuning.py", "--output-dir", str(out), "--steps", "100000",
         "--global-batch-size", "4096", "--micro-batch-size", "128", "--checkpoint-every", "1", *SMALL],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, out / "metrics.jsonl", 1)
    time.sleep(0.5)  # past step 1's checkpoint, inside step 2
    proc.send_signal(signal.SIGINT)
    time.sleep(1.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("aborted by a second Ctrl-C: the steps after the newest checkpoint"), stderr
    assert "continue with --resume" in last
    assert "stopped by" not in stdout
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics  # nothing already written is lost


def test_inference_ctrl_c_writes_the_results_so_far(tmp_path):
    import gptj.commands.generate as run_inference

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(400)))
    out = tmp_path / "results.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "run_inference.py", "--prompts-file", str(prompts), "--batch-size", "1",
         "--max-new-tokens", "48", "--output", str(out), "--threads", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("machine:")  # loaded; generating now
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert 0 < len(records) < 400, stderr
    assert stderr.strip().splitlines()[-1] == (
        f"interrupted by Ctrl-C: {len(records)} of 400 prompts finished; wrote them to {out}")
    # The same text an uninterrupted run gives for those prompts.
    reference = tmp_path / "reference.jsonl"
    first = [arg for i in range(2) for arg in ("--prompt", f"prompt number {i}")]
    assert run_inference.main([*first, "--max-new-tokens", "48", "--output", str(reference)]) == 0
    want = [json.loads(line) for line in reference.read_text().splitlines()]
    assert [(r["prompt"], r["text"]) for r in records[:2]] == [(r["prompt"], r["text"]) for r in want]
