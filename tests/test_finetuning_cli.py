"""run_finetuning.py: the default command end to end, bad values rejected, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gptj.commands.finetune as run_finetuning
from gptj.execution.training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--set", "model.shape={hidden_size: 64, num_heads: 4, rotary_dim: 8}",
         "--set", "logging.progress=false", "--set", "logging.tensorboard=false",
         "--set", "training.threads=1"]


def _run(args, **kwargs):
    return subprocess.run([sys.executable, "run_finetuning.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=400, **kwargs)


def test_default_command_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = _run(["--output-dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("run: full fine-tuning") and proc.stdout.count("final evaluation") == 1
    assert (out / "config.yaml").is_file() and "resolved config" not in proc.stdout

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = run_finetuning.build_config(run_finetuning.parse_args([])).training.steps
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "loss_scale", "skipped_steps"):
        assert all(isinstance(m[key], (int, float)) for m in metrics), key
    assert metrics[-1]["loss"] < metrics[0]["loss"]

    results = json.loads((out / "eval.json").read_text())["splits"]
    assert set(results) == {"validation_matched", "validation_mismatched"}
    for name, split in results.items():
        assert split["num_examples"] == 400
        assert split["accuracy_likelihood"] > 0.6  # 3 classes: chance is 1/3
        assert split["accuracy_generate"] > 0.6
        correct, invalid = _greedy_answers_of_the_export(out / "hf", name)
        assert split["accuracy_generate"] == correct / 400
        assert split["invalid_generations"] == invalid

    hf = out / "hf"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (hf / name).is_file(), name
    from transformers import AutoTokenizer, GPTJForCausalLM

    model = GPTJForCausalLM.from_pretrained(hf)
    assert model.config.vocab_size == AutoTokenizer.from_pretrained(hf).vocab_size == 1024
    assert ckpt.read_meta(ckpt.latest_checkpoint(ckpt.checkpoint_root(out)))["step"] == steps


def _greedy_answers_of_the_export(hf_dir, split: str) -> tuple[int, int]:
    """(correct, no label at all) of the exported model's greedy answers on a bundled split."""
    import gptj.data as data
    from gptj.execution.inference.generation import generate
    from gptj.execution.inference.pipelines import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(hf_dir))
    evals = data.build_eval_data("mnli", "bundled:mnli_sample", tok, split, progress=False)
    prompts = [evals.prompt(i).tolist() for i in range(len(evals))]
    longest_label = max(len(ids) for ids in tok.encode([f" {label}" for label in evals.labels]))
    results = generate(model, prompts, max_new_tokens=longest_label + 2, eos_token_id=tok.eos_id, batch_size=200)
    answers = [tok.decode(r.token_ids).strip() for r in results]  # the tokens before EOS
    expected = [evals.batch([i])["answers"][0] for i in range(len(evals))]
    return sum(a == e for a, e in zip(answers, expected)), sum(a not in evals.labels for a in answers)


@pytest.mark.parametrize("args, message", [
    (["--global-batch-size", "30", "--micro-batch-size", "8"],
     "training.global_batch_size 30 is not divisible by training.micro_batch_size 8"),
    (["--tensor-parallel", "3"], "world size 1 is not divisible by parallel.tensor_parallel 3"),
    (["--set", "training.bogus=1"], "unknown field training.bogus"),
    (["--config", "nope"], "unknown preset 'nope'"),
    (["--precision", "fp16", "--set", "optimizer.lr=-1"], "optimizer.lr must be positive"),
    (["--sequence-length", "4096"], "exceeds the model's max_positions 512"),
])
def test_bad_values_rejected_in_one_line(args, message, capsys, tmp_path):
    assert run_finetuning.main([*args, "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_bad_value_exit_code_and_missing_dataset(tmp_path):
    proc = _run(["--tensor-parallel", "2", "--output-dir", str(tmp_path)])
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "tensor_parallel 2" in proc.stderr
    missing = str(tmp_path / "nothing.jsonl")
    assert run_finetuning.main(["--dataset", missing, "--output-dir", str(tmp_path), *SMALL]) == 2


def test_help_lists_the_options():
    text = _run(["--help"]).stdout
    for option in ("--config", "--model", "--tokenizer", "--dataset", "--task", "--eval-dataset",
                   "--output-dir", "--steps", "--global-batch-size", "--micro-batch-size",
                   "--sequence-length", "--lr", "--seed", "--tensor-parallel", "--precision",
                   "--resume", "--set"):
        assert option in text, option


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "run_finetuning.py", "--output-dir", str(out), "--steps", "100000", *SMALL],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "stopped by SIGTERM" in stdout
    done = len(metrics.read_text().splitlines())
    latest = ckpt.latest_checkpoint(ckpt.checkpoint_root(out))
    assert latest is not None and ckpt.read_meta(latest)["step"] == done >= 3
    assert not (out / "hf").exists() and not (out / "eval.json").exists()


def test_options_and_overrides_reach_the_config():
    args = run_finetuning.parse_args([
        "--set", "training.steps=7", "--steps", "9", "--set", "schedule.warmup_steps=3",
        "--eval-dataset", "dev.jsonl", "--eval-dataset", "bundled:mnli_sample@validation_matched",
        "--lr", "2e-4", "--precision", "bf16", "--resume", "--model", "some/model"])
    config = run_finetuning.build_config(args)
    assert config.training.steps == 9  # an explicit option wins over --set
    assert config.schedule.warmup_steps == 3
    assert config.data.eval_datasets == ["dev.jsonl", "bundled:mnli_sample@validation_matched"]
    assert (config.optimizer.lr, config.training.precision) == (2e-4, "bf16")
    assert config.resume and config.model.name_or_path == "some/model"
    assert config.data.tokenizer is None  # the model's own tokenizer
    assert config.out_path == Path("runs/tiny")


@pytest.mark.parametrize("preset, world", [("gptj-6b-mnli", 8), ("gptj-6b-mnli-1gpu-offload", 1),
                                           ("gptj-6b-mnli-8gpu", 8), ("gptj-6b-mnli-multinode", 32)])
def test_gptj_presets_are_the_recipe_and_fit_their_layouts(preset, world):
    from gptj.execution.training.config import check_layout, load_config
    from gptj.model import ModelConfig

    config = load_config(preset)
    replicas = check_layout(config, world, ModelConfig.preset("gptj-6b"))
    assert replicas * config.parallel.tensor_parallel == world
    assert config.model.name_or_path == "EleutherAI/gpt-j-6b" and config.data.task == "mnli"
    assert (config.data.sequence_length, config.training.global_batch_size) == (1024, 128)
    assert (config.optimizer.lr, config.optimizer.weight_decay, config.training.steps) == (5e-6, 0.0, 500)
    assert config.schedule.warmup_steps > 0


def test_strict_data_stops_at_the_first_bad_row_naming_file_and_line(tmp_path, capsys):
    rows = [{"premise": "A cat sleeps.", "hypothesis": "A cat rests.", "label": 0}] * 40
    rows[2] = {"premise": "A dog runs.", "hypothesis": "", "label": 1}  # empty field, line 3
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--dataset", str(data), "--eval-dataset", str(data), "--steps", "1",
            "--output-dir", str(tmp_path / "run"), *SMALL]
    assert run_finetuning.main([*args, "--set", "data.strict=true"]) == 2
    err = capsys.readouterr().err
    assert "train.jsonl:3: empty_field" in err and "Traceback" not in err
    # without strict the bad row is skipped and counted, and the run goes on; its one-thread
    # setting (training.threads in SMALL) does not outlive it
    import torch

    threads = torch.get_num_threads()
    assert run_finetuning.main(args) == 0
    assert torch.get_num_threads() == threads
