"""The layout planner: hand-computed counts, and predicted memory against a measured training run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from gptj.execution.runtime.precision import PRECISIONS
from gptj.execution.training.planner import (
    MACHINES,
    Layout,
    LoraPlan,
    choose_micro_batch,
    h100_machine,
    load_model_config,
    lora_parameter_counts,
    main,
    parameter_counts,
    plan,
    plan_layout,
    plan_lora_layout,
)
from gptj.model import ConfigError, ModelConfig
from gptj.model.quantized_linear import GROUP_SIZES, QUANTIZE_MODES

GPTJ6B = ModelConfig.preset("gptj-6b")


def test_parameter_counts_match_the_model_for_every_tp():
    for t in (1, 2, 4, 8):
        counts = parameter_counts(GPTJ6B, t)
        replicated_per_block = 2 * 4096 + 4096  # ln_1 weight+bias, fc_out bias
        replicated = GPTJ6B.num_layers * replicated_per_block + 2 * 4096  # + ln_f
        assert t * (counts["total"] - replicated) + replicated == GPTJ6B.num_parameters()
    assert parameter_counts(GPTJ6B, 1)["total"] == 6_050_882_784


def test_bytes_and_communication_by_hand():
    machine = MACHINES["h100-80gb-x8"]
    row = plan_layout(GPTJ6B, Layout(2, 4, False, False, False), machine, seq=1024, micro_batch=1,
                      global_batch=128, precision="bf16")
    p_local = parameter_counts(GPTJ6B, 2)["total"]
    assert row["device_bytes"]["weights"] == 2 * p_local
    # bf16 weights: fp32 master (4 B) + Adam moments (8 B), divided over the 4 replicas
    assert row["device_bytes"]["optimizer"] == 12 * p_local / 4
    # 128 / (1 x 4 replicas) = 32 micro-batches; 2 all-reduces per block + embedding + head,
    # each of 1024 tokens x 4096 x 2 bytes, ring factor 2 (t-1)/t = 1.
    assert row["grad_accumulation"] == 32
    assert row["comm_bytes_per_step"]["tensor_parallel"] == 32 * (2 * 28 + 2) * 1024 * 4096 * 2
    assert row["comm_bytes_per_step"]["replicas"] == p_local * 2 * 2 * 3 / 4


def test_one_80gb_device_needs_optimizer_offload_for_gptj_6b():
    result = plan(GPTJ6B, MACHINES["h100-80gb-x1"], seq=1024, micro_batch=1, global_batch=128)
    fitting = {r["layout"] for r in result["layouts"] if r["fits"]}
    assert "tp1xr1" not in fitting and "tp1xr1+recompute" not in fitting
    assert result["recommended"].startswith("tp1xr1+offload")


def test_bad_inputs_are_named(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown model preset"):
        load_model_config("gptj-7b")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="not a GPT-J"):
        load_model_config(str(tmp_path))
    hf = ModelConfig.preset("tiny").to_hf_dict()
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert load_model_config(str(tmp_path / "config.json")).hidden_size == 128
    assert main(["--model", str(tmp_path), "--machine", "cpu-24gb", "--seq", "64", "--global-batch", "4",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recommended"] is not None


MEASURE = textwrap.dedent("""
    import json, os, resource, sys, torch
    from gptj.model import GPTJ, ModelConfig
    from gptj.execution.training.optimizer import ShardedAdamW
    config = ModelConfig(**json.loads(sys.argv[1]))
    batch, seq, steps = int(sys.argv[2]), int(sys.argv[3]), 3
    rows = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    baseline = rss()
    model = GPTJ(config).init_weights(seed=0)
    model.train()
    opt = ShardedAdamW(model, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, max_grad_norm=1.0,
                       offload=False)
    for _ in range(steps):
        model.loss(rows[:, :-1], rows[:, 1:]).backward()
        opt.step(1e-4)
        opt.zero_grad()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_delta": peak - baseline, "fused": True}))
""")


def test_a_config_json_that_is_not_json_is_one_line_naming_it(tmp_path, capsys):
    """The planner reads a checkpoint's config.json as every other command does."""
    (tmp_path / "config.json").write_text("{not json")
    assert main(["--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ") and f"{tmp_path / 'config.json'} is not valid JSON" in err
    with pytest.raises(ConfigError, match="expected a Hugging Face model's config.json"):
        load_model_config(str(tmp_path / "model.json"))


@pytest.mark.parametrize("option, bad, choices", [
    ("--precision", "fp8", PRECISIONS), ("--group-size", "16", GROUP_SIZES), ("--quantize", "int2", QUANTIZE_MODES)])
def test_the_choices_are_those_every_command_offers(option, bad, choices, capsys):
    with pytest.raises(SystemExit):
        main([option, bad])
    err = capsys.readouterr().err
    offered = [str(c) for c in choices]
    assert all(c in err for c in offered) and sorted(offered, key=err.index) == offered, err

@pytest.mark.slow
def test_predicted_memory_matches_a_measured_cpu_training_run():
    # 77M parameters in fp32 so the model and optimizer state dominate fixed overheads.
    config = ModelConfig.preset("bench-small")
    batch, seq = 2, 128
    done = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(config.to_dict()), str(batch), str(seq)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    run = json.loads(done.stdout.strip().splitlines()[-1])
    measured = run["peak_delta"]
    row = plan_layout(config, Layout(1, 1, False, False, False), MACHINES["cpu-24gb"], seq=seq,
                      micro_batch=batch, global_batch=batch, precision="fp32", fused_adamw=run["fused"])
    predicted = row["device_total"] - row["device_bytes"]["reserved"]
    print(f"predicted {predicted / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB, fused {run['fused']}")
    assert abs(measured - predicted) / predicted < 0.15, (predicted, measured)


@pytest.mark.parametrize("preset, machine", [
    ("gptj-6b-mnli-1gpu-offload", h100_machine(1, 1)),
    ("gptj-6b-mnli-8gpu", h100_machine(1, 8)),
    ("gptj-6b-mnli-multinode", h100_machine(4, 8)),
])
def test_gpu_fine_tuning_presets_are_the_planners_choice(preset, machine):
    """gptj/config/finetuning.yml's GPU layouts are what the planner recommends for their machine."""
    from gptj.execution.training.config import load_config

    config = load_config(preset)
    result = plan(ModelConfig.preset("gptj-6b"), machine, seq=config.data.sequence_length,
                  micro_batch=config.training.micro_batch_size,
                  global_batch=config.training.global_batch_size, precision=config.training.precision)
    t = config.parallel.tensor_parallel
    chosen = Layout(t, machine.devices // t, config.optimizer.offload,
                    config.model.stream_block_weights, config.model.recompute_blocks)
    assert result["recommended"] == chosen.name


@pytest.mark.parametrize("argv, message", [
    (["--seq", "0"], "--seq must be >= 1, got 0"),
    (["--micro-batch", "-1"], "--micro-batch must be >= 1, got -1"),
    (["--global-batch", "0"], "--global-batch must be >= 1, got 0"),
    (["--device-memory-gib", "-4"], "--device-memory-gib must be positive"),
    (["--global-batch", "100", "--micro-batch", "3"], "--global-batch 100 is not a multiple of --micro-batch 3"),
])
def test_bad_sizes_are_rejected(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_nothing_fits_names_the_real_reason(capsys):
    # 100 rows split over 64 devices: every replica count but 1, 2 and 4 leaves a remainder,
    # and TP 16 or more spans nodes.
    assert main(["--machine", "h100-80gb-8x8", "--global-batch", "100", "--micro-batch", "1"]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("recommended: nothing fits: global batch 100 is not a multiple of micro-batch 1 x replicas")
    assert main(["--machine", "h100-80gb-x1", "--device-memory-gib", "1", "--host-memory-gib", "1"]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "recommended: nothing fits: memory rules out 6 of 6 layouts"


@pytest.mark.parametrize("argv,message", [
    (["--lora-rank", "-1"], "--lora-rank must be >= 0 (0: full fine-tuning), got -1"),
    (["--lora-rank", "100000"], "--lora-rank 100000 is above the model's width 4096"),
    (["--seq", "100000"], "--seq 100000 is beyond the model's 2048 positions"),
])
def test_shapes_beyond_the_model_are_one_line_errors(argv, message, capsys):
    assert main(["--machine", "cpu-24gb", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message}")


# ---- LoRA layouts -------------------------------------------------------------------------------


def test_lora_adapter_counts_match_the_adapters_for_every_tp():
    from gptj.model import ParallelContext
    from gptj.model.lora import LoraAdapters, LoraSettings, adapter_parameter_count

    config = ModelConfig.preset("tiny")
    settings = LoraSettings(rank=4, targets=("q", "v", "fc_in", "fc_out"))
    plan_ = LoraPlan(4, settings.targets)
    for t in (1, 2, 4):
        ctx = ParallelContext(tensor_parallel=t, rank=1 % t)
        adapters = LoraAdapters(config, settings, ctx, device="meta")
        counts = lora_parameter_counts(config, t, plan_)
        assert counts["total"] == sum(p.numel() for p in adapters.parameters())
        replicated = adapters.replicated_parameters()
        assert counts["replicated"] == sum(p.numel() for n, p in adapters.named_parameters() if replicated[n])
        assert t * (counts["total"] - counts["replicated"]) + counts["replicated"] == adapter_parameter_count(
            config, settings)


def test_lora_bytes_by_hand():
    row = plan_lora_layout(GPTJ6B, Layout(1, 1, False, False, False), MACHINES["h100-80gb-x1"], seq=1024,
                           micro_batch=1, global_batch=8, precision="bf16", lora=LoraPlan(8))
    # rank 8 on q, k, v, out_proj (8 (d + d) each) and fc_in, fc_out (8 (d + 4d) each), 28 blocks
    adapters = 28 * (4 * 8 * 2 * 4096 + 2 * 8 * 5 * 4096)
    assert row["trainable_params_per_device"] == adapters
    assert row["device_bytes"]["gradients"] == 2 * adapters
    assert row["device_bytes"]["optimizer"] == 12 * adapters
    assert row["device_bytes"]["weights"] == 2 * parameter_counts(GPTJ6B, 1)["total"] + 2 * adapters
    int4 = plan_lora_layout(GPTJ6B, Layout(1, 1, False, False, False), MACHINES["h100-80gb-x1"], seq=1024,
                            micro_batch=1, global_batch=8, precision="bf16", lora=LoraPlan(8, base="int4"))
    # Quantized: q k v out_proj (4 d^2) and fc_in, fc_out (8 d^2) per block, and lm_head (V d);
    # int4 in groups of 128: half a byte plus an fp32 scale and zero point per 128 weights.
    quantized = 28 * 12 * 4096 * 4096 + 50400 * 4096
    saved = quantized * (2 - (0.5 + 8 / 128))
    assert int4["device_bytes"]["weights"] == pytest.approx(row["device_bytes"]["weights"] - saved)
    # One weight at a time is dequantized for its matmul, 1024 rows at a time through fp32;
    # lm_head is the largest.
    assert int4["device_bytes"]["dequantize_transient"] == 50400 * 4096 * 2 + 1024 * 4096 * 8


def test_gptj_6b_lora_fits_24gb_and_int4_fits_12gb_at_sequence_1024():
    micro, result = choose_micro_batch(GPTJ6B, MACHINES["gpu-24gb-x1"], 1024, 128, lora=LoraPlan(8))
    assert micro is not None and micro >= 1
    full = plan(GPTJ6B, MACHINES["gpu-24gb-x1"], seq=1024, micro_batch=1, global_batch=128)
    assert full["recommended"] is None  # full fine-tuning fits no layout there
    micro4, result4 = choose_micro_batch(GPTJ6B, MACHINES["gpu-12gb-x1"], 1024, 128,
                                         lora=LoraPlan(8, base="int4"))
    assert micro4 is not None
    assert plan(GPTJ6B, MACHINES["gpu-12gb-x1"], 1024, 1, 128, lora=LoraPlan(8))["recommended"] is None


@pytest.mark.parametrize("preset, machine", [
    ("gptj-6b-mnli-lora-1gpu", "gpu-24gb-x1"),
    ("gptj-6b-mnli-qlora", "gpu-12gb-x1"),
])
def test_lora_presets_are_the_planners_choice(preset, machine):
    from gptj.execution.training.config import load_config

    config = load_config(preset)
    lora = LoraPlan(config.lora.rank, tuple(config.lora.targets),
                    "model" if config.model.quantize == "none" else config.model.quantize, config.lora.dropout,
                    config.model.group_size)
    micro, result = choose_micro_batch(GPTJ6B, MACHINES[machine], config.data.sequence_length,
                                       config.training.global_batch_size, config.training.precision, lora)
    assert micro == config.training.micro_batch_size
    t = config.parallel.tensor_parallel
    chosen = Layout(t, 1, config.optimizer.offload, config.model.stream_block_weights,
                    config.model.recompute_blocks)
    assert result["recommended"].startswith(chosen.name + "+lora")


MEASURE_LORA = MEASURE.replace("int(sys.argv[3]), 3", "int(sys.argv[3]), 1").replace(  # adapter state: no growth after step 1
    "opt = ShardedAdamW(model,",
    "from gptj.model.lora import LoraAdapters, LoraSettings\n"
    "adapters = LoraAdapters(config, LoraSettings(rank=8)).init_weights(0).attach(model)\n"
    "opt = ShardedAdamW(adapters,")


MEASURE_QLORA = MEASURE_LORA.replace(
    "model = GPTJ(config).init_weights(seed=0)",
    "from gptj.model.model import random_reader\n"
    "from gptj.model.quantized_linear import QuantSpec\n"
    "from gptj.model.quantized_model import quantize_from_reader, without_kernels\n"
    "model = without_kernels(quantize_from_reader(config, None, torch.float32, 'cpu', QuantSpec(4, 128), "
    "random_reader(config, 0)))")


@pytest.mark.slow
@pytest.mark.parametrize("base, script", [("model", MEASURE_LORA), ("int4", MEASURE_QLORA)])
def test_predicted_lora_memory_matches_a_measured_cpu_training_run(base, script):
    # bench-small in fp32 with rank-8 adapters on every target: the frozen base, activations and
    # logits dominate. glibc's adaptive mmap threshold would keep freed activation-sized blocks
    # in the heap (RSS then overstates live memory by up to 50%); a fixed threshold returns them.
    import os

    assert script.count("quantize_from_reader(") == (base == "int4")
    config = ModelConfig.preset("bench-small")
    batch, seq = 4, 256
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(config.to_dict()), str(batch), str(seq)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])["peak_delta"]
    row = plan_lora_layout(config, Layout(1, 1, False, False, False), MACHINES["cpu-24gb"], seq=seq,
                           micro_batch=batch, global_batch=batch, precision="fp32", lora=LoraPlan(8, base=base))
    predicted = row["device_total"] - row["device_bytes"]["reserved"]
    print(f"LoRA, {base} base: predicted {predicted / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB")
    assert abs(measured - predicted) / predicted < 0.15, (predicted, measured)
