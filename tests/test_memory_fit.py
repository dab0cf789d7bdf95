"""The fit check: resident bytes estimated from config.json and the safetensors headers, against
the memory available; a model that cannot fit is refused before anything loads.

References: the bytes counted by hand from GPT-J's shapes, and the bytes the loaded model
really holds (every parameter and buffer, kernel copies included)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import gptj.commands.generate as run_inference
import gptj.commands.serve as run_server
from gptj.data import bundled
from gptj.execution.inference.pipelines import load_model_and_tokenizer
from gptj.execution.runtime import memory_fit
from gptj.execution.runtime.memory_fit import Layout, MemoryFitError, check_model, estimate
from gptj.model import GPTJ, ModelConfig
from gptj.model.hf import export_hf
from gptj.model.quantized_linear import QuantSpec

TINY = ModelConfig.preset("tiny")  # V 2048, d 128, 2 layers, 4 heads, ffn 512, 512 positions, rotary 16


def add_tokenizer(directory: Path) -> None:
    for file in Path(bundled.tokenizer_dir("tiny")).iterdir():
        shutil.copy2(file, directory / file.name)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return export_hf(GPTJ(TINY).init_weights(seed=0), tmp_path_factory.mktemp("fit") / "tiny",
                     dtype=torch.bfloat16, max_shard_bytes=400_000, extra=add_tokenizer)


def resident_bytes(model) -> int:
    from gptj.model.packed_linear import PackedLinear

    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return held + sum(m.nbytes() for m in model.modules() if isinstance(m, PackedLinear))


def by_hand(quantized_weight) -> int:
    """GPT-J tiny's bytes: bf16 for what stays float, `quantized_weight(n, k)` for projections."""
    v, d, f, layers = 2048, 128, 512, 2
    projections = [(d, d)] * 4 + [(f, d), (d, f)]  # q, k, v, out_proj, fc_in, fc_out
    floats = v * d + layers * (2 * d + f + d) + 2 * d + v  # embedding, ln_1, biases, ln_f, lm_head bias
    weights = layers * sum(quantized_weight(n, k) for n, k in projections) + quantized_weight(v, d)
    rotary = 2 * 512 * (16 // 2) * 4  # fp32 cos and sin
    return floats * 2 + weights + rotary


PLAIN = by_hand(lambda n, k: n * k * 2)
INT8 = by_hand(lambda n, k: n * k + n * 4 + n * 2)  # values, fp32 scales, the kernel's bf16 scales
INT4 = by_hand(lambda n, k: n * k // 2 + n * (k // 32) * 2 * 2)  # packed values, bf16 scales + zeros


@pytest.mark.parametrize(("quantize", "expected"), [(None, PLAIN), ("int8", INT8), ("int4", INT4)])
def test_the_estimate_equals_the_bytes_counted_by_hand_and_the_loaded_model(checkpoint, quantize, expected,
                                                                            monkeypatch):
    import gptj.model.kv_cache

    monkeypatch.setattr(gptj.model.kv_cache, "native_bf16_attention", lambda: False)  # fp32 keys and values
    spec = QuantSpec.parse(quantize, 32)
    layout = Layout(TINY, torch.bfloat16, spec, "cpu")
    est = estimate(layout, rows=3, tokens=10)
    assert est.weights == expected
    assert est.kv_cache == 3 * 10 * 2 * 2 * 128 * 4  # rows x tokens x layers x (k, v) x d x fp32 on CPU
    monkeypatch.setattr(gptj.model.kv_cache, "native_bf16_attention", lambda: True)  # AMX: bf16 keys and values
    assert estimate(layout, rows=3, tokens=10).kv_cache == 3 * 10 * 2 * 2 * 128 * 2
    model, _ = load_model_and_tokenizer(str(checkpoint), precision="bf16", device="cpu", quantize=quantize,
                                        group_size=32)
    assert resident_bytes(model) == expected


def test_check_model_reads_the_checkpoint_headers(checkpoint, monkeypatch):
    monkeypatch.setenv(memory_fit.AVAILABLE_ENV, "64G")
    est = check_model(str(checkpoint), precision="bf16", rows=2, tokens=100_000, prompt_tokens=7)
    assert est.weights == PLAIN and est.tokens == 512  # capped at the context
    largest = 2048 * 128 * 2  # wte / lm_head in bf16, as stored
    assert est.working == memory_fit.RUNTIME_BYTES + max(largest, 2 * 7 * 512 * 4)


def test_a_model_that_cannot_fit_is_one_line_with_both_numbers_and_what_would_fit(checkpoint, monkeypatch):
    est = check_model(str(checkpoint), precision="bf16", rows=16, tokens=512)
    available = est.total - 1
    monkeypatch.setenv(memory_fit.AVAILABLE_ENV, str(available))
    with pytest.raises(MemoryFitError) as err:
        check_model(str(checkpoint), precision="bf16", rows=16, tokens=512)
    line = str(err.value)
    assert "\n" not in line
    assert f"needs {est.total / 2**30:.1f} GiB" in line and f"{available / 2**30:.1f} GiB is available" in line
    assert "--quantize int4" in line and "--batch-size 15" in line


def test_run_inference_refuses_before_loading_with_exit_2(checkpoint, monkeypatch, capsys):
    monkeypatch.setenv(memory_fit.AVAILABLE_ENV, "100M")
    loads = []
    monkeypatch.setattr("gptj.execution.inference.pipelines.TextGenerationPipeline.from_pretrained",
                        lambda *a, **k: loads.append(a))
    code = run_inference.main(["--model", str(checkpoint), "--prompt", "hello", "--max-new-tokens", "4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and loads == []
    assert err.startswith(f"error: {checkpoint} does not fit: it needs ") and "0.1 GiB is available" in err
    assert len(err.splitlines()) == 1


def test_run_server_refuses_before_loading_with_exit_2(checkpoint, monkeypatch, capsys):
    monkeypatch.setenv(memory_fit.AVAILABLE_ENV, "100M")
    served = []
    monkeypatch.setattr("gptj.serving.server.serve", lambda *a, **k: served.append(a) or 0)
    code = run_server.main(["--model", str(checkpoint)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and served == []
    assert err.startswith(f"error: {checkpoint} does not fit") and "for 1 x 512 tokens" in err


def test_the_loader_refuses_weights_that_cannot_fit(checkpoint, monkeypatch):
    monkeypatch.setenv(memory_fit.AVAILABLE_ENV, str(PLAIN))  # the weights alone, no working memory
    with pytest.raises(MemoryFitError, match="does not fit"):
        load_model_and_tokenizer(str(checkpoint), precision="bf16", device="cpu")


def test_a_bad_override_names_the_variable(monkeypatch):
    monkeypatch.setenv(memory_fit.AVAILABLE_ENV, "lots")
    with pytest.raises(MemoryFitError, match="GPTJ_AVAILABLE_MEMORY='lots' is not a size"):
        memory_fit.available_bytes()
    assert memory_fit.parse_size("1.5G") == 3 * 2**29 and memory_fit.parse_size("2048") == 2048
