"""Defaults decided by the machine: hardware detection, threads and precision "auto", and the
one-line warning for a precision without native kernels. The hardware is faked both ways."""

from __future__ import annotations

import json

import pytest

import gptj.commands.generate as run_inference
from gptj.execution.runtime import defaults, hardware
from gptj.execution.training.loop import train
from gptj.model import ModelConfig
from tests.fixtures.training import small_config

BIG = ModelConfig.preset("bench-small")
TINY = ModelConfig.preset("tiny")


def fake(cpu_bf16: str | None = "avx512_bf16", cores: int = 8, cuda_bf16: bool = False) -> hardware.Hardware:
    return hardware.Hardware(cpu_name="Fake CPU", physical_cores=cores, logical_cpus=2 * cores,
                             cpu_bf16=cpu_bf16, cuda_name="Fake GPU" if cuda_bf16 else None,
                             cuda_bf16=cuda_bf16)


def test_cpuinfo_counts_cores_not_smt_threads():
    # Two sockets x two cores x two SMT threads = 8 logical CPUs, 4 cores.
    blocks = [f"processor\t: {i}\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 avx512_bf16\n"
              f"physical id\t: {i // 4}\ncore id\t\t: {(i // 2) % 2}\n" for i in range(8)]
    name, flags, cores = hardware.parse_cpuinfo("\n".join(blocks))
    assert (name, cores) == ("Test CPU 9000", 4) and "avx512_bf16" in flags
    assert hardware.parse_cpuinfo("processor\t: 0\nflags\t: sse2\n")[2] is None  # no topology listed


def test_sysfs_counts_each_core_once(tmp_path):
    # cpu0/cpu1 are SMT siblings of one core, cpu2/cpu3 of another.
    for cpu in range(4):
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text("0\n")
        (topology / "core_cpus_list").write_text(f"{cpu // 2 * 2}-{cpu // 2 * 2 + 1}\n")
    assert hardware.sysfs_physical_cores({0, 1, 2, 3}, tmp_path) == 2
    assert hardware.sysfs_physical_cores({0, 1}, tmp_path) == 1
    assert hardware.sysfs_physical_cores({7}, tmp_path) is None  # unreadable: caller falls back


def test_detect_describes_this_machine():
    hw = hardware.detect()
    assert 1 <= hw.physical_cores <= hw.logical_cpus
    assert hw.cpu_bf16 in (None, *hardware.BF16_FLAGS)
    assert "physical cores" in hw.summary()


def test_auto_precision_follows_native_bf16():
    assert defaults.resolve_precision("auto", "cpu", BIG, fake("amx_bf16")) == "bf16"
    assert defaults.resolve_precision("auto", "cpu", BIG, fake("avx512_bf16")) == "bf16"
    assert defaults.resolve_precision("auto", "cpu", BIG, fake(None)) == "fp32"
    assert defaults.resolve_precision("auto", "cpu", TINY, fake("amx_bf16")) == "fp32"  # too small to gain
    assert defaults.resolve_precision("auto", "cuda", TINY, fake(None, cuda_bf16=True)) == "bf16"
    assert defaults.resolve_precision("auto", "cuda", BIG, fake("amx_bf16", cuda_bf16=False)) == "fp32"
    assert defaults.resolve_precision("fp16", "cpu", BIG, fake("amx_bf16")) == "fp16"  # explicit is kept


def test_auto_threads_by_model_size(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert defaults.resolve_threads("auto", BIG, fake(cores=8)) == 8
    assert defaults.resolve_threads("auto", ModelConfig(), fake(cores=64)) == 64  # GPT-J 6B
    assert defaults.resolve_threads("auto", TINY, fake(cores=8)) == 1
    assert defaults.resolve_threads(3, BIG, fake(cores=8)) == 3
    assert defaults.resolve_threads(0, BIG, fake(cores=8)) is None  # torch's own default
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two torchrun processes share the cores
    assert defaults.resolve_threads("auto", BIG, fake(cores=8)) == 4


def test_warning_only_without_native_kernels():
    assert defaults.slow_precision_warning("bf16", "cpu", fake("avx512_bf16")) is None
    assert defaults.slow_precision_warning("fp32", "cpu", fake(None)) is None
    assert defaults.slow_precision_warning("bf16", "cuda", fake(None)) is None
    line = defaults.slow_precision_warning("bf16", "cpu", fake(None))
    assert "Fake CPU" in line and "slower than fp32" in line and "\n" not in line
    assert "fp16" in defaults.slow_precision_warning("fp16", "cpu", fake("amx_bf16"))


def _inference(argv, capsys):
    code = run_inference.main(argv + ["--prompt", "a cat", "--max-new-tokens", "2", "--show-config"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    config = next(json.loads(line.removeprefix("config: ")) for line in captured.out.splitlines()
                  if line.startswith("config: "))
    return config["model"], captured.err


@pytest.mark.parametrize("precision, native", [("bf16", None), ("fp16", "avx512_bf16")])
def test_inference_warns_once_and_continues(precision, native, monkeypatch, capsys):
    monkeypatch.setattr(hardware, "detect", lambda: fake(native, cores=1))
    model, err = _inference(["--precision", precision], capsys)
    assert model["precision"] == precision
    warnings = [line for line in err.splitlines() if line.startswith("warning: precision")]
    assert len(warnings) == 1 and precision in warnings[0], err


@pytest.mark.parametrize("native, expected", [("avx512_bf16", "bf16"), (None, "fp32")])
def test_inference_defaults_for_a_larger_model(native, expected, monkeypatch, capsys):
    """--model-like use of a bench-small shape: the tiny preset's settings do not stick to it."""
    monkeypatch.setattr(hardware, "detect", lambda: fake(native, cores=3))
    model, err = _inference(["--set", "model.preset=bench-small"], capsys)
    assert (model["precision"], model["threads"]) == (expected, 3)
    assert "warning" not in err
    model, _ = _inference([], capsys)  # the tiny preset itself
    assert (model["precision"], model["threads"]) == ("fp32", 1)


def test_training_warns_once_for_bf16_without_native_support(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(hardware, "detect", lambda: fake(None, cores=1))
    config = small_config(tmp_path, **{"training.precision": "bf16", "training.steps": 1,
                                       "training.threads": "auto"})
    result = train(config)
    err = capsys.readouterr().err
    assert result.final_step == 1
    assert sum(line.startswith("warning: precision bf16") for line in err.splitlines()) == 1, err
