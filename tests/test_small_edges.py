"""Small things a new user meets: the printed config names the output directory used, a run of
one token per prompt has no decode rate, error lines name the way out (the option, the columns
there are), the machine line says what `auto` chose, and the docs say what the code does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import gptj.commands.finetune as run_finetuning
import gptj.commands.generate as run_inference
import gptj.data as data
from gptj.execution.runtime.defaults import auto_choices
from gptj.model import ModelConfig

DOCS = Path(__file__).resolve().parents[1] / "docs"


def config_of(*argv):
    return run_finetuning.build_config(run_finetuning.parse_args(list(argv)))


def test_the_printed_config_names_the_output_directory_used():
    assert config_of().to_dict()["output_dir"] == "runs/tiny"
    assert config_of("--lora-rank", "8").to_dict()["output_dir"] == "runs/tiny-lora8"
    assert config_of("--output-dir", "elsewhere").to_dict()["output_dir"] == "elsewhere"


def test_one_token_per_prompt_has_no_decode_rate(capsys):
    assert run_inference.main(["--prompt", "hello", "--max-new-tokens", "1"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("1 tokens in ") and last.endswith("| decode n/a"), last
    assert run_inference.main(["--prompt", "hello", "--max-new-tokens", "3"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("3 tokens in ") and re.search(r"\| decode \d+\.\d tokens/s$", last), last


def test_a_too_long_prompt_names_the_option_that_truncates(capsys):
    assert run_inference.main(["--prompt", "word " * 600]) == 2
    err = capsys.readouterr().err
    assert "model context is 512" in err and "--truncate-prompts" in err and err.count("\n") == 1


def test_a_missing_column_lists_the_columns_there_are(tmp_path):
    rows = tmp_path / "tickets.csv"
    rows.write_text("text,team\nhello,billing\nwhere is it,shipping\n")
    with pytest.raises(data.DataError, match=r"no column premise or sentence1 for 'premise'; its columns: text, team"):
        data.build_train_data("mnli", str(rows), "bundled:tiny", 32, use_cache=False)


def test_the_machine_line_says_what_auto_chose_and_why():
    tiny = ModelConfig.preset("tiny")
    small = auto_choices(tiny.replace(vocab_size=1024), "auto", "fp32", "auto", 1)
    assert small == "; auto chose fp32 and 1 thread for a small model (0.5 M matmul weights, under 2 M)"
    large = auto_choices(tiny.replace(vocab_size=50400), "auto", "bf16", "auto", 2)
    assert large.startswith("; auto chose bf16 and 2 threads for 6.8 M matmul weights (vocabulary 50400)")
    assert "not a small model" in large
    assert auto_choices(tiny, "fp32", "fp32", 4, 4) == ""  # nothing was auto
    assert auto_choices(tiny, "fp32", "fp32", "auto", 1).startswith("; auto chose 1 thread for")


def test_run_inference_prints_the_choice(capsys):
    assert run_inference.main(["--prompt", "hello", "--max-new-tokens", "1"]) == 0
    machine = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("machine: "))
    assert machine.endswith("; auto chose fp32 and 1 thread for a small model (0.5 M matmul weights, under 2 M)")


def test_docs_benchmarks_paragraph_once_and_options_named():
    benchmarks, fine_tuning = (DOCS / "benchmarks.md").read_text(), (DOCS / "fine-tuning.md").read_text()
    assert benchmarks.count("The parts run alone too") == 1 and "\nbest step time." not in benchmarks
    assert re.search(r"^\| `--group-size N` \| `model.group_size` \|", fine_tuning, flags=re.M)
    assert "eval.max_examples" in (DOCS / "tasks.md").read_text()
    assert "With a real GPT-2 tokenizer the same preset" in fine_tuning  # tiny is fp32 only with its own tokenizer
