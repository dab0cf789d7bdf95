"""The benchmark suite runs end to end on tiny shapes (no timing assertions; the GPU script:
tests/test_gpu_bench.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_run_all_quick_writes_table_and_json(tmp_path):
    out = tmp_path / "latest.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run_all", "--quick", "--skip", "generation", "data", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    limits = report["machine"]
    assert set(limits["matmul_flops"]) == {"fp32", "bf16"} and limits["memory_bandwidth"] > 0
    results = report["training"]["results"]
    assert {(r["impl"], r["precision"]) for r in results} == {
        ("ours", "fp32"), ("ours", "bf16"), ("hf", "fp32"), ("hf", "bf16-autocast"), ("hf", "bf16-pure")}
    for r in results:
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0 and r["mfu"] > 0
    # Both sides trained the same random batch from a similar init: losses near log(vocab).
    assert all(abs(r["last_loss"] - 7.62) < 1.0 for r in results)
    metrics = {row["metric"] for row in report["table"]}
    assert {"train tok/s fp32", "train tok/s best", "train peak MiB fp32", "train peak MiB best"} <= metrics
    assert set(report["targets"]) >= {"train_best_ratio", "train_fp32_ratio", "decode_b1_ratio"}
    for line in ("train tok/s fp32", "train tok/s best", "targets:", "limits: matmul fp32"):
        assert line in done.stdout


def test_a_configuration_past_its_time_limit_is_reported_not_waited_for(monkeypatch):
    import torch

    from benchmarks import bench_training
    from benchmarks.machine import _size_within

    # A real subprocess that cannot even import torch in 1 s: stopped and reported.
    assert bench_training.measure_in_subprocess("ours", "fp32", quick=True, timeout=1)["error"] == \
        "timed out after 1 s"
    calls = []

    def never_finishes(impl, precision, quick=False, timeout=None, shape_args=()):
        calls.append((impl, precision))
        return {"impl": impl, "precision": precision, "error": "timed out after 120 s"}

    monkeypatch.setattr(bench_training, "measure_in_subprocess", never_finishes)
    report = bench_training.run(quick=True, configs=[("ours", "bf16")], rounds=2)
    assert calls == [("ours", "bf16")]  # not tried again in the second round
    assert report["results"][0]["error"] == "timed out after 120 s"
    # A matmul too slow for the budget is measured at a smaller size instead.
    assert _size_within(1e-9, torch.float32, 2048, torch.device("cpu")) == 256
    assert _size_within(1e9, torch.float32, 2048, torch.device("cpu")) == 2048


def test_checksum_bench_runs_in_process():
    from benchmarks import bench_checksum

    result = bench_checksum.run(mib=4, repeats=1)
    assert result["bytes"] == 4 << 20
    assert set(result["gb_per_s"]) >= {"xxh3_128 (used)", "crc32 (zlib)", "sha256",
                                        "file_checksum (xxh3_128, page cache)"}
    assert all(rate > 0 for rate in result["gb_per_s"].values())


@pytest.mark.slow
def test_bench_serving_quick_with_a_short_soak(tmp_path):
    out = tmp_path / "serving.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/bench_serving.py", "--quick", "--soak", "4", "--soak-clients", "4",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [level["concurrency"] for level in report["levels"]] == [1, 4]
    for level in report["levels"]:
        assert level["requests"] > 0 and level["failed"] == 0 and level["output_tokens_per_s"] > 0
        assert level["ttft_s"]["median"] > 0 and level["tpot_s"]["p99"] > 0
    soak = report["soak"]
    assert soak["lost"] == 0 and soak["answered"] > 0 and soak["drained"]
    assert soak["server_cancels_counted"] <= soak["outcomes"]["cancelled"]
    assert "load average" in done.stdout and "| concurrency |" in done.stdout


def test_bench_lora_measures_adapters_only():
    import torch

    from benchmarks.bench_lora import measure_one
    from gptj.model import ModelConfig
    from gptj.model.lora import LoraSettings, adapter_parameter_count

    threads = torch.get_num_threads()
    try:
        result = measure_one("lora", "fp32", quick=True, rank=4, max_seconds=1)
    finally:
        torch.set_num_threads(threads)  # quick mode runs on one thread
    assert result["trainable_params"] == adapter_parameter_count(ModelConfig.preset("tiny"), LoraSettings(rank=4))
    assert len(result["step_times"]) >= 2 and result["peak_memory_bytes"] > 0


def test_training_rows_of_the_full_width_run_at_the_tiny_shape():
    """The 6b-width run's extra rows (2 replicas, tensor parallel 2, QLoRA) at the tiny shape."""
    from benchmarks import bench_training

    for impl, precision in bench_training.WIDE_CONFIGS[len(bench_training.CONFIGS):]:
        result = bench_training.measure_in_subprocess(impl, precision, quick=True)
        assert "error" not in result, result
        assert len(result["step_times"]) == 2 and result["last_loss"] > 0
        if impl in bench_training.PARALLEL:
            assert len(result["peak_memory_per_process"]) == 2
        else:
            assert result["frozen_backward"]["fraction_of_float"] > 0


@pytest.mark.slow
def test_bench_classify_quick(tmp_path):
    out = tmp_path / "classify.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_classify", "--quick", "--threads", "1", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    lines = {(line["case"], line["row"]): line for line in report["table"]}
    import importlib.util

    rows = ["transformers fp32", "ours fp32", "server fp32 c1", "server fp32 c16"]
    if importlib.util.find_spec("ctranslate2") is not None:  # an optional package: its row when installed
        rows.append("ctranslate2 fp32")
    for case in ("0-shot", "5-shot"):
        for row in rows:
            line = lines[(case, row)]
            assert line["pairs"] == 6 and line["pairs_per_s"] > 0, line
            # The same weights and the same rule: every label and probability is transformers fp32's.
            assert line["agreement"] == 1.0 and line["compared"] == 6, line
            assert line["max_probability_diff"] < 1e-4, line
        assert report["ratios"][f"{case} ours/transformers"] > 0
    cached = lines[("5-shot", "ours fp32 prefix-cached")]  # the demonstrations from the pipeline's prefix cache
    assert cached["agreement"] == 1.0 and cached["max_probability_diff"] < 1e-4, cached
    assert cached["hit_rate"] > 0.3 and cached["tokens_run"] < cached["prompt_tokens"] / 2, cached
    assert report["ratios"]["5-shot fp32 prefix-cached/uncached"] > 0
    assert "| case | row | pairs | pairs/s | labels as transformers fp32 |" in done.stdout
