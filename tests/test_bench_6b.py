"""benchmarks/bench_6b.py runs end to end on a tiny shape (the 6B itself never runs here), and
the random checkpoint it writes is a Hugging Face checkpoint that safetensors and our loader read."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from benchmarks import bench_6b
from benchmarks.random_checkpoint import plan_shards, write_checkpoint
from gptj.model import ModelConfig
from gptj.model.hf import SAFE_INDEX, load_pretrained
from gptj.model.sharding import hf_shapes

ROOT = Path(__file__).resolve().parents[1]


def test_the_random_checkpoint_is_sharded_hugging_face_layout(tmp_path):
    config = ModelConfig.preset("tiny")
    directory = write_checkpoint(tmp_path / "ck", config, shard_bytes=300_000, tokenizer=None, log=lambda _: None)
    index = json.loads((directory / SAFE_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == len(plan_shards(config, 300_000)) > 1
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    seen = {}
    for shard in shards:
        with safe_open(str(directory / shard), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            seen.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
    assert {n: tuple(t.shape) for n, t in seen.items()} == hf_shapes(config)
    assert all(t.dtype == torch.bfloat16 for t in seen.values())
    assert abs(seen["transformer.h.0.mlp.fc_in.weight"].float().std().item() - 0.02) < 0.002
    assert torch.equal(seen["transformer.h.1.ln_1.weight"], torch.ones(128, dtype=torch.bfloat16))
    model, _ = load_pretrained(directory, dtype=torch.bfloat16)
    assert torch.equal(model.lm_head.weight, seen["lm_head.weight"])


def test_smoke_run_writes_rows_json_and_markdown(tmp_path):
    out = tmp_path / "r.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_6b", "--smoke", "--dir", str(tmp_path / "ck"), "--out", str(out),
         "--only", "int4-prequantized"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["read_bandwidth_GBps"] > 0 and report["cpu"]
    (int4,) = report["rows"]
    assert int4["row"] == "int4-prequantized" and int4["kernels"] == ["int4_cpu"], int4
    assert int4["decode_b1_tok_s"] > 0 and int4["decode_b4_tok_s"] > 0 and int4["peak_rss"] > 0
    assert int4["prefill_tokens"] == 16 and int4["prefill_s"] > 0
    assert report["checkpoint"]["prequantize"]["exit"] == 0
    table = out.with_suffix(".md").read_text()
    assert "| int4-prequantized | " in table and "of read bandwidth" in table and report["cpu"] in table


def test_smoke_server_and_qlora_rows(tmp_path):
    out = tmp_path / "r.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_6b", "--smoke", "--dir", str(tmp_path / "ck"), "--out", str(out),
         "--only", "server-int4", "--only", "qlora-int4"],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    server, qlora = json.loads(out.read_text())["rows"]
    assert server["row"] == "server-int4" and "error" not in server, server
    # 16 rows of prompt + new tokens + 8 asked, as the server itself printed them
    assert (server["kv_rows"], server["kv_tokens"]) == (16, 8 + 8 + 8)
    assert server["c1_tok_s"] > 0 and server["c16_tok_s"] > 0 and server["server_peak_rss"] > 0
    config = json.loads((tmp_path / "ck-int4" / "config.json").read_text())
    # the KV those tokens need, in the dtype the server said it caches in (fp32: this tiny model
    # runs in fp32, as --precision auto picks for it)
    assert server["kv_dtype"] == "fp32" and server["kv_line"].startswith("KV cache (fp32, ")
    assert server["kv_needed_bytes"] == 16 * 16 * 2 * config["n_layer"] * config["n_embd"] * 4
    assert qlora["row"] == "qlora-int4" and "error" not in qlora, qlora
    assert qlora["steps"] == 3 and len(qlora["step_times_s"]) == 3
    assert qlora["step_s"] == pytest.approx(sum(qlora["step_times_s"][1:]) / 2)
    assert qlora["runtime_rss"] < qlora["loaded_rss"] <= qlora["steps_peak_rss"]
    # the prediction is the planner CLI's own for the same layout, in the precision the row ran
    # in (what --precision auto picks: fp32 for this tiny model)
    assert qlora["precision"] == "fp32"
    planner = subprocess.run(
        [sys.executable, "-m", "gptj.execution.training.planner", "--model", str(tmp_path / "ck-int4"), "--lora-rank", "8",
         "--quantize", "int4", "--machine", "cpu-24gb", "--seq", "32", "--micro-batch", "1", "--global-batch", "1",
         "--precision", qlora["precision"], "--json"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    layout = next(r for r in json.loads(planner.stdout)["layouts"] if r["layout"] == "tp1xr1+lora8+int4")
    assert qlora["predicted_peak"] == layout["device_total"]
    table = out.with_suffix(".md").read_text()
    assert "| server-int4 | " in table and "| qlora-int4 (fp32) | " in table and "c16 / c1" in table


@pytest.mark.skipif(importlib.util.find_spec("ctranslate2") is not None, reason="ctranslate2 is installed")
def test_the_ctranslate2_row_says_not_installed():
    assert bench_6b.measure_ctranslate2("unused", {}, 1) == {"error": "not installed"}


def test_a_gpt2_vocabulary_gets_gpt_j_extra_tokens_up_to_the_embedding(tmp_path):
    """As in GPT-J's own tokenizer: GPT-2's tokens, then <|extratoken_1|>.. up to the vocab size."""
    from benchmarks.random_checkpoint import copy_tokenizer

    gpt2, out = tmp_path / "gpt2", tmp_path / "ck"
    gpt2.mkdir(), out.mkdir()
    (gpt2 / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2}))
    (gpt2 / "merges.txt").write_text("#version: 0.2\na b\n")
    assert copy_tokenizer(out, gpt2, vocab_size=6) == "gpt2"
    assert json.loads((out / "added_tokens.json").read_text()) == {
        "<|extratoken_1|>": 3, "<|extratoken_2|>": 4, "<|extratoken_3|>": 5}


def test_prefill_flops_count_projections_causal_attention_and_the_last_head_row():
    from types import SimpleNamespace

    config = SimpleNamespace(hidden_size=8, num_layers=2, ffn_dim=32, vocab_size=10)
    # per token 2 x (4 x 8 x 8 + 2 x 8 x 32) x 2 layers = 3072 -> x 4 tokens; attention
    # 2 x 2 layers x 8 x (4 x 5 / 2) = 320; head 2 x 10 x 8 = 160
    assert bench_6b.prefill_flops(config, 4) == 3072 * 4 + 2 * 320 + 160
