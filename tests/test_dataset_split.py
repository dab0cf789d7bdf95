"""`--dataset DIR@SPLIT` trains on that split's file of a directory (as `--eval-dataset` takes it);
a directory without the split's file names the files it has."""

from __future__ import annotations

import pytest

import gptj.data as data
from gptj.data.sources import Source, split_at
from tests.fixtures.data import MNLI_ROWS, write_jsonl
from tests.test_finetuning_edges import FAST, nli_rows, run, write_rows


@pytest.fixture
def splits(tmp_path):
    """A directory named like the real MNLI copy: train_sample.jsonl and the two validation files."""
    folder = tmp_path / "mnli"
    folder.mkdir()
    write_rows(folder / "train_sample.jsonl", nli_rows(24))
    write_rows(folder / "validation_matched.jsonl", nli_rows(6))
    write_rows(folder / "validation_mismatched.jsonl", nli_rows(3))
    return folder


def test_split_at_parses_source_and_split(tmp_path):
    assert split_at("runs/mnli@train_sample") == ("runs/mnli", "train_sample")
    assert split_at("hf:glue/mnli@train") == ("hf:glue/mnli", "train")
    assert split_at("plain/dir") == ("plain/dir", None)
    odd = tmp_path / "a@b"  # an existing path with "@" in its name is that path
    odd.mkdir()
    assert split_at(str(odd)) == (str(odd), None)


def test_source_at_split_picks_that_file(splits):
    source = Source(f"{splits}@train_sample", "train")
    assert source.path == splits / "train_sample.jsonl" and source.split == "train_sample"
    examples, summary = data.load_examples("mnli", f"{splits}@validation_mismatched")
    assert len(examples) == 3 and summary.kept == 3


def test_a_directory_without_the_split_names_its_files(splits):
    with pytest.raises(data.DataError) as err:
        Source(str(splits), "train")
    message = str(err.value)
    assert "no file for split 'train'" in message
    assert "train_sample.jsonl, validation_matched.jsonl, validation_mismatched.jsonl" in message
    assert f"{splits}@SPLIT" in message


def test_a_directory_with_no_data_file_says_so(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(data.DataError, match=r"no file for split 'dev' in .*: it holds no \.jsonl"):
        Source(str(tmp_path), "dev")


def test_existing_split_lookup_keeps_working(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", MNLI_ROWS[:3])
    assert Source(str(tmp_path), None).path == tmp_path / "train.jsonl"


def test_training_on_dir_at_split_evaluates_on_the_task_splits(splits, tmp_path):
    code, out, err = run(["--dataset", f"{splits}@train_sample", "--output-dir", str(tmp_path / "run"), *FAST])
    assert code == 0, err
    assert f"data: {splits}[train_sample]: read 24, kept 24" in err
    # Evaluation reads the task's validation splits of the directory, not the training split.
    assert "final evaluation: validation_matched:" in out and "(n=6)" in out and "(n=3)" in out
    assert "train_sample: generate" not in out


def test_training_split_missing_is_one_line_and_exit_2(splits, tmp_path):
    code, _, err = run(["--dataset", f"{splits}@train", "--output-dir", str(tmp_path / "run"), *FAST])
    assert code == 2 and err.strip().count("\n") == 0
    assert "no file for split 'train'" in err and "train_sample.jsonl" in err
