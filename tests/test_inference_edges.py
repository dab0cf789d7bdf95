"""run_inference.py at its edges: output and prompt checks before loading, truncation, stop
escapes, prompts files, streaming that shows what plain output shows, per-prompt timings."""

from __future__ import annotations

import errno
import json

import pytest
import torch

import gptj.commands.generate as run_inference
import gptj.data as data
from gptj.execution.inference.pipelines import TextGenerationPipeline
from tests.fixtures.cli import run_inference_main as run_main
from tests.fixtures.generation import reference_pair
from tests.fixtures.os_faults import refuse_writes_in
from tests.fixtures.reference import TINY


@pytest.fixture
def no_model_load(monkeypatch):
    """Checks that must happen before any model is loaded: loading fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(TextGenerationPipeline, "from_pretrained", refuse)


@pytest.fixture(scope="module")
def eos_model(tmp_path_factory):
    """A saved tiny model (bundled tokenizer) whose first greedy token is EOS after one prompt
    and not after another: (model dir, eos prompt, other prompt)."""
    tok = data.load_tokenizer("bundled:tiny")
    config = TINY.replace(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, bos_token_id=tok.eos_id)
    hf, _ = reference_pair(seed=7, config=config)
    candidates = ["a", "the cat", "a dog runs", "x y z", "hello there", "mnli hypothesis:", "one two"]
    margins = []
    with torch.no_grad():
        for prompt in candidates:
            logits = hf(torch.tensor([tok.encode([prompt])[0]])).logits[0, -1]
            margins.append((logits.max() - logits[tok.eos_id]).item())
    order = sorted(range(len(candidates)), key=margins.__getitem__)
    first, second = margins[order[0]], margins[order[1]]
    assert second > first + 1e-3
    with torch.no_grad():  # EOS wins after the first prompt only
        hf.lm_head.bias[tok.eos_id] += (first + second) / 2
    directory = tmp_path_factory.mktemp("eos_model")
    hf.save_pretrained(directory)
    tok.save(directory)
    return directory, candidates[order[0]], candidates[order[-1]]


def blocks(stdout: str) -> str:
    """The per-prompt blocks of an inference run's stdout (no start-up and speed lines)."""
    return "".join(line for line in stdout.splitlines(keepends=True)
                   if not line.startswith(("generate: ", "config: ", "machine: ")) and " tokens/s | " not in line)


def test_truncation_keeps_room_for_the_requested_tokens(capsys, tmp_path):
    out = tmp_path / "o.jsonl"
    code, _, err = run_main(["--prompt", "word " * 1200, "--truncate-prompts", "--max-new-tokens", "20",
                             "--output", str(out)], capsys)
    assert code == 0 and "clamped" not in err
    record = json.loads(out.read_text())
    assert record["timings"]["prompt_tokens"] == 512 - 20  # the last context - max_new_tokens
    assert len(record["token_ids"]) == 20 and record["finish_reason"] == "length"


@pytest.mark.parametrize("where, message", [
    ("{tmp}", "is a directory"),
    ("{tmp}/file.txt/out.jsonl", "file.txt is a file, not a directory"),
    ("/sys/gptj-out.jsonl", "cannot write in /sys"),
    ("{tmp}/locked/out.jsonl", "cannot write in {tmp}/locked (Permission denied)"),
    ("{tmp}/full/new/out.jsonl", "cannot write in {tmp}/full (No space left on device)"),
])
def test_unwritable_output_is_refused_before_loading(where, message, capsys, tmp_path, no_model_load, monkeypatch):
    (tmp_path / "file.txt").write_text("x")
    for name, code in (("locked", errno.EACCES), ("full", errno.ENOSPC)):
        (tmp_path / name).mkdir()
        refuse_writes_in(monkeypatch, tmp_path / name, code)  # for root too, where chmod cannot
    path = where.replace("{tmp}", str(tmp_path))
    code, _, err = run_main(["--prompt", "hi", "--output", path], capsys)
    message = message.replace("{tmp}", str(tmp_path))
    assert code == 2 and err.startswith("error: --output ") and message in err
    assert err.strip().count("\n") == 0


def test_stop_strings_understand_shell_escapes():
    config = run_inference.build_config(run_inference.parse_args(
        ["--stop", "\\n\\n", "--stop", "a\\tb", "--stop", "back\\\\n"]))
    assert config.generation.stop == ["\n\n", "a\tb", "back\\n"]


def test_prompts_files_json_lines_bom_and_encoding(capsys, tmp_path, no_model_load):
    as_json = tmp_path / "prompts.json"
    as_json.write_text('{"prompt": "first one"}\n\n{"prompt": "second"}\n')
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffhello\nworld\n".encode())
    other = tmp_path / "prompts.txt"  # JSON lines under any name are recognised
    other.write_text('{"prompt": "x y"}\n')
    for path, expected in ((as_json, ["first one", "second"]), (bom, ["hello", "world"]), (other, ["x y"])):
        args = run_inference.parse_args(["--prompts-file", str(path)])
        assert run_inference.build_config(args).prompts == expected
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café\n".encode("latin-1"))
    code, _, err = run_main(["--prompts-file", str(latin)], capsys)
    assert code == 2 and str(latin) in err and "not UTF-8" in err and err.strip().count("\n") == 0


def test_empty_and_too_long_prompts_are_reported_before_loading(capsys, tmp_path, no_model_load):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n")
    code, _, err = run_main(["--prompts-file", str(empty)], capsys)
    assert code == 2 and f"prompts file {empty} has no prompts" in err
    code, _, err = run_main(["--prompt", "word " * 600], capsys)
    assert code == 2 and "model context is 512" in err


def test_missing_model_directory_names_the_cause(capsys, no_model_load):
    code, _, err = run_main(["--model", "/no/such/model"], capsys)
    assert code == 2 and err.strip() == "error: --model /no/such/model: model directory does not exist"


def test_stream_shows_what_plain_output_shows(eos_model, capsys):
    directory, eos_prompt, other = eos_model
    base = ["--model", str(directory), "--prompt", eos_prompt, "--prompt", other, "--max-new-tokens", "12"]
    code, plain, _ = run_main(base, capsys)
    assert code == 0 and "--- (0 tokens, finish: eos)" in plain
    text = plain.split(f"--- prompt: {other!r}\n")[1].split("\n--- (")[0]
    assert len(text) >= 5
    stop = ["--stop", text[3:5]]
    code, plain, _ = run_main(base + stop, capsys)
    assert code == 0 and "finish: stop" in plain
    code, streamed, _ = run_main(base + stop + ["--stream"], capsys)
    assert code == 0
    assert blocks(streamed) == blocks(plain)
    shown = blocks(streamed).split(f"--- prompt: {other!r}\n")[1].split("\n--- (")[0]
    assert shown == text[: text.index(text[3:5])]  # cut before the stop string, as in plain output


def test_output_timings_are_per_prompt_and_count_what_the_text_holds(eos_model, capsys, tmp_path):
    directory, eos_prompt, other = eos_model
    out = tmp_path / "o.jsonl"
    code, stdout, _ = run_main(["--model", str(directory), "--prompt", eos_prompt, "--prompt", other,
                                "--max-new-tokens", "6", "--output", str(out)], capsys)
    assert code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["finish_reason"] for r in records][0] == "eos"
    for r in records:
        assert r["timings"]["generated_tokens"] == len(r["token_ids"])
        assert 0 < r["timings"]["time_to_first_token_s"] <= r["timings"]["total_s"] <= r["run_timings"]["total_s"]
    total = sum(len(r["token_ids"]) for r in records)
    assert records[0]["run_timings"]["generated_tokens"] == total  # the EOS is not a generated token
    assert stdout.splitlines()[-2].startswith(f"{total} tokens in ")
