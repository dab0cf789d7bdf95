"""The one inference start-up (gptj/execution/inference/startup.py) shared by gptj-generate and
gptj-serve: config.json read once, the fit checked once, the tokenizer loaded once; bad input
refused before a server says it is serving; what the server runs named on its ready line; a
progress bar for long prompt files."""

from __future__ import annotations

import builtins
import io
import json
import pathlib

import pytest
import torch

import gptj.commands.generate as run_inference
import gptj.commands.serve as run_server
from gptj.data import load_tokenizer
from gptj.model import GPTJ, ModelConfig
from gptj.model.hf import export_hf


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random GPT-J as a Hugging Face directory, with its tokenizer."""
    tok = load_tokenizer("bundled:tiny")
    config = ModelConfig.preset("tiny").replace(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                                                bos_token_id=tok.eos_id)
    directory = export_hf(GPTJ(config).init_weights(seed=3), tmp_path_factory.mktemp("startup") / "tiny")
    tok.save(directory)
    return directory


@pytest.fixture
def opened_config_files(monkeypatch):
    """Every opening of a file named config.json: builtins.open and io.open, which Path.open,
    read_text and read_bytes go through too."""
    seen, real_open = [], io.open

    def counting_open(file, *args, **kwargs):
        if not isinstance(file, int) and pathlib.Path(file).name == "config.json":
            seen.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    return seen


def test_generate_reads_config_json_once(model_dir, opened_config_files, capsys):
    code = run_inference.main(["--model", str(model_dir), "--prompt", "the cat", "--max-new-tokens", "3"])
    assert code == 0, capsys.readouterr().err
    assert opened_config_files == [str(model_dir / "config.json")]


def test_generate_plans_loads_and_tokenizes_once(model_dir, monkeypatch, capsys):
    import gptj.data
    import gptj.execution.runtime.memory_fit as memory_fit
    from gptj.data.tokenizer import Tokenizer

    calls = {"check_fits": 0, "load_tokenizer": 0, "encode": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(memory_fit, "check_fits", counted("check_fits", memory_fit.check_fits))
    monkeypatch.setattr(gptj.data, "load_tokenizer", counted("load_tokenizer", gptj.data.load_tokenizer))
    monkeypatch.setattr(Tokenizer, "encode", counted("encode", Tokenizer.encode))
    code = run_inference.main(["--model", str(model_dir), "--prompt", "the cat", "--prompt", "a dog",
                               "--max-new-tokens", "3"])
    assert code == 0, capsys.readouterr().err
    assert calls == {"check_fits": 1, "load_tokenizer": 1, "encode": 1}


def test_generate_from_the_plan_matches_the_library_pipeline(model_dir, tmp_path):
    """The start-up's model and tokens are those of TextGenerationPipeline.from_pretrained."""
    from gptj.execution.inference.pipelines import TextGenerationPipeline

    out = tmp_path / "o.jsonl"
    assert run_inference.main(["--model", str(model_dir), "--prompt", "the cat sat", "--max-new-tokens", "6",
                               "--output", str(out)]) == 0
    expected = TextGenerationPipeline.from_pretrained(str(model_dir)).generate(["the cat sat"], max_new_tokens=6)
    assert json.loads(out.read_text())["token_ids"] == expected[0].token_ids


def test_a_prompts_file_longer_than_a_batch_shows_a_progress_bar(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(40)))
    code = run_inference.main(["--prompts-file", str(prompts), "--max-new-tokens", "2", "--batch-size", "8"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "generate: 100%" in captured.err and "40/40" in captured.err
    # One batch's worth of prompts finishes at once: no bar.
    assert run_inference.main(["--prompt", "a", "--prompt", "b", "--max-new-tokens", "2"]) == 0
    assert "generate:" not in capsys.readouterr().err


def test_serve_refuses_a_max_model_len_beyond_the_context_before_serving(capsys, monkeypatch):
    import gptj.serving.server as server

    monkeypatch.setattr(server, "listen_socket", lambda *a: pytest.fail("the port was bound"))
    code = run_server.main(["--port", "0", "--max-model-len", "100000"])
    captured = capsys.readouterr()
    assert code == 2
    assert "serving on" not in captured.out
    context = ModelConfig.preset("tiny").max_positions
    assert captured.err.strip().splitlines()[-1] == (
        f"error: --max-model-len 100000: the model's context is {context} positions (random:tiny); "
        f"use a value in [2, {context}]")


@pytest.mark.parametrize("argv,named", [
    ([], "precision fp32, 1 threads"),
    (["--quantize", "int4", "--group-size", "64"], "precision fp32, int4 weights (groups of 64), 1 threads"),
    (["--quantize", "int8"], "precision fp32, int8 weights, 1 threads"),
])
def test_the_ready_line_names_precision_and_quantization(argv, named, capsys):
    from tests.fixtures.server import tiny_server

    with tiny_server("--precision", "fp32", "--threads", "1", *argv) as server:
        assert server.state.ready
    ready = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ready: ")]
    assert ready == [f"ready: random:tiny, {named}, 16 rows x {ModelConfig.preset('tiny').max_positions} tokens"]


def test_plan_settles_auto_choices_without_loading(model_dir):
    from gptj.execution.inference.config import ModelSection
    from gptj.execution.inference.startup import plan_inference

    settings, threads = ModelSection(name_or_path=str(model_dir)), torch.get_num_threads()
    try:
        plan = plan_inference(settings, torch.device("cpu"), prompts=["the cat", "a"], max_new_tokens=4)
        assert settings.threads == torch.get_num_threads() == 1  # tiny: one thread
    finally:
        torch.set_num_threads(threads)
    assert settings.precision == "fp32" and plan.dtype == torch.float32  # tiny: fp32 on any machine
    assert plan.prompt_ids == plan.tokenizer.encode(["the cat", "a"])
    assert plan.estimate.tokens == max(map(len, plan.prompt_ids)) + 4
    assert plan.loaded is None
