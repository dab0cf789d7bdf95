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
