"""What a training run tells its user about its own logging: tensorboard asked for but not
installed is one line saying it is off and why, not silence."""

from __future__ import annotations

import sys

from gptj.execution.training.metrics import MetricsLogger


def test_tensorboard_asked_for_but_missing_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed: import fails
    logger = MetricsLogger(tmp_path, total_steps=1, progress=False, tensorboard=True)
    logger.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tensorboard: off, its package is not installed"), err
    assert str(tmp_path / "metrics.jsonl") in err[0] and "pip install tensorboard" in err[0]
    assert not (tmp_path / "tensorboard").exists()


def test_tensorboard_not_asked_for_says_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    MetricsLogger(tmp_path, total_steps=1, progress=False, tensorboard=False).close()
    assert capsys.readouterr().err == ""


def run_lines(argv) -> tuple[int, str, str]:
    from tests.test_finetuning_edges import run

    quiet = ["--set", "model.shape={hidden_size: 64, num_heads: 4, rotary_dim: 8, num_layers: 1}",
             "--set", "logging.progress=false", "--set", "logging.tensorboard=false", "--set", "training.threads=1",
             "--steps", "2", "--global-batch-size", "8", "--micro-batch-size", "8",
             "--set", "eval.max_examples=8"]
    return run([*argv, *quiet])


def test_a_run_says_what_it_trains_in_one_line_and_the_final_evaluation_once(tmp_path):
    import yaml

    code, stdout, err = run_lines(["--output-dir", str(tmp_path / "run"), "--lr", "0.002"])
    assert code == 0, err
    lines = stdout.splitlines()
    assert lines[0] == (f"run: full fine-tuning of random tiny, task mnli on bundled:mnli_sample; 2 steps x 8 rows "
                        f"x 32 tokens, lr 0.002 (cosine, warmup 10); full config: {tmp_path / 'run' / 'config.yaml'} "
                        "(--show-config prints it)")
    assert "resolved config" not in stdout and "eval at step" not in stdout
    assert sum(line.startswith("final evaluation: ") for line in lines) == 1
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["optimizer"]["lr"] == 0.002 and saved["training"]["steps"] == 2


def test_show_config_prints_the_full_resolved_config(tmp_path):
    import yaml

    code, stdout, err = run_lines(["--output-dir", str(tmp_path / "run"), "--show-config"])
    assert code == 0, err
    shown = stdout.split("resolved config:\n", 1)[1].split("\nrun: ", 1)[0]
    assert yaml.safe_load(shown) == yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
