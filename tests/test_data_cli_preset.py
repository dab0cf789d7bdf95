"""`python -m gptj.data` shows what the fine-tuning run of the same preset trains on: its task, data,
tokenizer and sequence length by default (`--config`), so kept / too long / truncated agree with
the counts run_finetuning.py reports."""

from __future__ import annotations

import json
import re

import pytest

from gptj.data.__main__ import main
from tests.fixtures.data import SHARED_DATA
from tests.test_finetuning_edges import FAST, run, write_rows

LONG = " ".join(["the red cat sleeps in the kitchen"] * 6)


def rows() -> list[dict]:
    """Short rows, rows whose premise must be cut at 32 tokens and rows too long even without it."""
    short = [{"premise": "The cat sleeps.", "hypothesis": "A cat rests.", "label": i % 3} for i in range(12)]
    cut = [{"premise": f"{LONG} {i}.", "hypothesis": "A cat rests.", "label": i % 3} for i in range(10)]
    dropped = [{"premise": "The cat.", "hypothesis": f"{LONG} {i}.", "label": i % 3} for i in range(4)]
    return short + cut + dropped


def counts(summary: dict) -> tuple[int, int, int]:
    return summary["kept"], summary["skipped"].get("too_long", 0), summary["truncated"]


def inspect(argv, capsys) -> dict:
    assert main([*argv, "--json", "--show", "0"]) == 0
    return json.loads(capsys.readouterr().out)


def test_defaults_match_what_the_tiny_run_reports(tmp_path, capsys):
    data_file = write_rows(tmp_path / "train.jsonl", rows())
    shown = inspect(["--dataset", str(data_file)], capsys)
    assert shown["preset"] == "tiny" and shown["sequence_length"] == 32
    code, _, err = run(["--dataset", str(data_file), "--output-dir", str(tmp_path / "run"), *FAST,
                        "--set", "eval.at_end=false", "--set", "checkpoint.export_hf=false"])
    assert code == 0, err
    line = re.search(r"data: \S+: read (\d+), kept (\d+), skipped \d+(?: \(([^)]*)\))?, truncated (\d+)", err)
    too_long = int(re.search(r"too_long (\d+)", line[3] or "too_long 0")[1])
    trained = (int(line[2]), too_long, int(line[4]))
    assert trained == counts(shown["summary"])
    assert trained[1] > 0 and trained[2] > 0  # the rows above are cut and dropped at 32 tokens


def test_config_names_another_preset(tmp_path, capsys):
    data_file = write_rows(tmp_path / "train.jsonl", rows())
    shown = inspect(["--config", "gptj-6b-mnli", "--dataset", str(data_file), "--tokenizer", "bundled:tiny"], capsys)
    assert shown["preset"] == "gptj-6b-mnli" and shown["sequence_length"] == 1024
    assert counts(shown["summary"]) == (26, 0, 0)  # nothing is long at 1024 tokens
    # An option still replaces the preset's value.
    shown = inspect(["--dataset", str(data_file), "--sequence-length", "1024"], capsys)
    assert shown["sequence_length"] == 1024 and counts(shown["summary"]) == (26, 0, 0)


def test_config_takes_a_preset_file(tmp_path, capsys):
    presets = tmp_path / "mine.yml"
    presets.write_text("short:\n  data: {task: mnli, dataset: bundled:mnli_sample, sequence_length: 16}\n")
    shown = inspect(["--config", str(presets)], capsys)
    assert shown["preset"] == "short" and shown["sequence_length"] == 16
    presets.write_text(presets.read_text() + "long:\n  base: short\n  data: {sequence_length: 48}\n")
    assert inspect(["--config", f"{presets}:long"], capsys)["sequence_length"] == 48
    assert main(["--config", str(presets)]) == 2
    assert f"holds presets short, long: name one with {presets}:NAME" in capsys.readouterr().err


def test_an_unknown_preset_is_one_line(capsys):
    assert main(["--config", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown preset 'nope'") and err.count("\n") == 1


@pytest.mark.skipif(not (SHARED_DATA / "gpt2").is_dir() or not (SHARED_DATA / "mnli").is_dir(),
                    reason="GPT-2 tokenizer or MNLI files not present at ../shared/data")
def test_real_mnli_with_gpt2_shows_the_tiny_runs_counts(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("GPTJ_DATA_CACHE", str(tmp_path))
    shown = inspect(["--dataset", str(SHARED_DATA / "mnli" / "train_sample.jsonl"),
                     "--tokenizer", str(SHARED_DATA / "gpt2")], capsys)
    # What the tiny preset's training run reports for these files at 32 tokens.
    assert counts(shown["summary"]) == (8683, 316, 6468)
