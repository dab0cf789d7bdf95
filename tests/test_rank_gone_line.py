"""The error a rank prints when another rank is gone stands on a line of its own, not at the end
of the progress bar's line (where it was easy to miss)."""

from __future__ import annotations

import gptj.commands.finetune as finetune
import gptj.execution.training.loop as loop
from gptj.model.parallel import collective_error

ARGS = ["--steps", "6", "--global-batch-size", "4", "--micro-batch-size", "2",
        "--set", "model.shape={hidden_size: 64, num_heads: 4, rotary_dim: 8}",
        "--set", "logging.progress=true", "--set", "logging.tensorboard=false",
        "--set", "training.threads=1", "--set", "eval.at_end=false", "--set", "checkpoint.export_hf=false"]


def test_rank_gone_error_is_a_line_of_its_own_after_the_progress_bar(tmp_path, monkeypatch, capsys):
    real, calls = loop.all_reduce, []

    def peer_gone_at_step_3(tensor, group, op=None, name="all_reduce"):
        calls.append(name)
        if len(calls) == 3:  # what gloo raises when the other rank's process has died
            raise collective_error(name, None, RuntimeError("Connection closed by peer [10.77.0.2]:4242"))
        return real(tensor, group, op, name)

    monkeypatch.setattr(loop, "all_reduce", peer_gone_at_step_3)
    code = finetune.main([*ARGS, "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1
    assert "train:" in err and "2/6" in err, err  # the bar was drawn, two steps done
    lines = err.split("\n")
    gone = [line for line in lines if "another rank is hung, dead or gone" in line]
    assert len(gone) == 1, err
    assert gone[0].startswith("error: collective training loss (replicas) failed"), repr(gone[0])
