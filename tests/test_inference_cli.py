"""run_inference.py: the default run, JSONL output and clear errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gptj.commands.generate as run_inference
from tests.fixtures.cli import run_inference_main as run_main

ROOT = Path(__file__).resolve().parents[1]


def test_default_run_prints_a_continuation_and_speed(tmp_path):
    from gptj.execution.inference.pipelines import TextGenerationPipeline

    out = tmp_path / "out.jsonl"
    proc = subprocess.run(
        [sys.executable, "run_inference.py", "--max-new-tokens", "6", "--prompt", "hello", "--prompt",
         "the cat", "--output", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "tokens/s" in proc.stdout and "time to first token" in proc.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["hello", "the cat"]
    # The tiny preset is the seeded random:tiny model with the bundled tokenizer, greedy.
    expected = TextGenerationPipeline.from_pretrained("random:tiny").generate(["hello", "the cat"], max_new_tokens=6)
    assert [r["token_ids"] for r in records] == [e.token_ids for e in expected]
    assert [r["text"] for r in records] == [e.text for e in expected]
    assert [r["finish_reason"] for r in records] == [e.finish_reason for e in expected]
    assert all(r["token_ids"] for r in records)
    assert "decode_tokens_per_s" in records[0]["run_timings"]
    assert records[0]["timings"]["generated_tokens"] == len(records[0]["token_ids"])


def test_unknown_preset_is_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "run_inference.py", "--config", "nope"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown preset 'nope'" in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "  "], "prompt 0 is empty"),
    (["--prompt", "word " * 600], "model context is 512"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--model", "{bad_dir}"], "not a GPT-J checkpoint"),
    (["--model", "/no/such/dir"], "does not exist"),
    (["--tensor-parallel", "2"], "torchrun --nproc-per-node 2"),
    (["--prompts-file", "{bad_dir}/p.jsonl"], "p.jsonl:2: expected a JSON object with a \"prompt\" field"),
    (["--quantize", "int4", "--group-size", "256"], "int4 group size 256 does not divide the input width 128"),
    (["--quantize", "int8", "--offload-weights"], "cannot be combined"),
])
def test_bad_input_is_one_clear_line(argv, message, capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    argv = [a.replace("{bad_dir}", str(tmp_path)) for a in argv]
    code, _, err = run_main(argv + ["--max-new-tokens", "2"], capsys)
    assert code == 2
    assert err.startswith("error: ") and err.strip().count("\n") == 0 and message in err


def test_too_long_requests_are_truncated_and_clamped(capsys, tmp_path):
    out = tmp_path / "o.jsonl"
    argv = ["--prompt", "word " * 600, "--truncate-prompts", "--max-new-tokens", "600", "--output", str(out)]
    code, _, err = run_main(argv, capsys)
    assert code == 0 and "clamped to 511" in err  # the prompt keeps one token, the rest is for new ones
    assert len(json.loads(out.read_text())["token_ids"]) == 511
    prompts = tmp_path / "p.txt"
    prompts.write_text("first prompt\n\nsecond prompt\n")
    code, _, _ = run_main(["--prompts-file", str(prompts), "--max-new-tokens", "2", "--output", str(out)], capsys)
    assert code == 0
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == ["first prompt", "second prompt"]


def test_a_model_brings_its_own_tokenizer_unless_one_is_named():
    import gptj.commands.generate as run_inference

    preset_tokenizer = run_inference.build_config(run_inference.parse_args([])).model.tokenizer
    assert preset_tokenizer == "bundled:tiny"
    own = run_inference.build_config(run_inference.parse_args(["--model", "some/dir", "--prompt", "x"]))
    assert own.model.tokenizer is None
    named = run_inference.build_config(
        run_inference.parse_args(["--model", "some/dir", "--tokenizer", "tok/dir", "--prompt", "x"]))
    assert named.model.tokenizer == "tok/dir"


@pytest.fixture
def cli_pipelines(monkeypatch):
    """The pipelines run_inference.py builds: the model and KV cache that answered."""
    from gptj.execution.inference.pipelines import TextGenerationPipeline

    built, original = [], TextGenerationPipeline.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(TextGenerationPipeline, "__init__", recording)
    return built


def test_quantize_option_generates_with_the_quantized_model(capsys, tmp_path, cli_pipelines):
    from gptj.execution.inference.pipelines import TextGenerationPipeline
    from gptj.model.quantized_linear import QuantizedLinear

    out = tmp_path / "o.jsonl"
    code, _, _ = run_main(["--quantize", "int4", "--group-size", "64", "--prompt", "the cat", "--max-new-tokens", "5",
                           "--output", str(out)], capsys)
    assert code == 0
    answered = cli_pipelines[-1].model
    layers = [m for m in answered.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 3 * answered.config.num_layers + 1  # in_proj, out_proj, fc_out per block; lm_head
    assert all(m.bits == 4 and m.group_size == 64 for m in layers)
    got = json.loads(out.read_text())["token_ids"]
    pipe = TextGenerationPipeline.from_pretrained("random:tiny", quantize="int4", group_size=64)
    assert got == pipe.generate(["the cat"], max_new_tokens=5)[0].token_ids
    # The float model answers differently on this prompt: the quantized one really answered.
    assert got != TextGenerationPipeline.from_pretrained("random:tiny").generate(["the cat"], max_new_tokens=5)[0].token_ids


def test_kv_cache_dtype_option_picks_the_cache_and_keeps_the_tokens(tmp_path, cli_pipelines, monkeypatch):
    import gptj.model.kv_cache

    monkeypatch.setattr(gptj.model.kv_cache, "native_bf16_attention", lambda: False)  # auto: fp32 (no AMX)
    outputs = {}
    for choice, expected in (("auto", torch.float32), ("bf16", torch.bfloat16)):
        out = tmp_path / f"{choice}.jsonl"
        assert run_inference.main(["--precision", "bf16", "--kv-cache-dtype", choice, "--prompt", "The cat",
                                   "--max-new-tokens", "8", "--output", str(out)]) == 0
        outputs[choice] = json.loads(out.read_text())["token_ids"]
        engine = cli_pipelines[-1].engine  # the cache the command's engine generated with
        assert engine.model.dtype == torch.bfloat16
        assert {t.dtype for layer in engine.cache.layers for t in (layer.keys, layer.values)} == {expected}
    assert outputs["auto"] == outputs["bf16"] and len(outputs["auto"]) == 8
