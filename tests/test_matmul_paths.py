"""Every CPU matmul path of a quantized layer, the probe that picks one, and W8A8's arithmetic.

Each path (packed kernel, dequantize + fp32 / bf16 matmul, int8 x int8) must give x @ W^T for the
layer's dequantized W within that path's rounding, at odd shapes and on both sides of each row
cutoff; the probe must time each (family, dtype, row bucket, shape) once, keep the fastest, write
it to its file under this CPU's name and reuse it; w8a8 must equal a reference written out here
(quantize each row, multiply in int64, rescale) to the last bit."""

from __future__ import annotations

import contextlib
import json
import logging

import pytest
import torch

from gptj.model import GPTJ, ModelConfig, matmul_probe
from gptj.model.quantized_linear import (
    CPU_INT4_KERNEL_MAX_ROWS,
    CPU_KERNEL_MAX_ROWS,
    INT8_ACTIVATIONS,
    PACKED,
    W8A8_MIN_ROWS,
    QuantizationError,
    QuantizedLinear,
    QuantSpec,
    quantize_activations,
)
from gptj.model.quantized_model import quantized_copy

# (bits, group, out_features, in_features, int8 activations): odd widths (97, 160; 97 at int4,
# which the int4 CPU packing refuses) and even ones. torch's CPU _int_mm takes any widths and
# row count (torch 2.13: checked here at 1 row and 97 x 160), so nothing is padded.
SHAPES = [(8, 0, 40, 96, True), (8, 0, 97, 160, True), (8, 0, 64, 96, False), (4, 32, 96, 512, False),
          (4, 64, 48, 192, False), (4, 32, 97, 96, False)]
# Both sides of every cutoff: CPU_KERNEL_MAX_ROWS, W8A8_MIN_ROWS, CPU_INT4_KERNEL_MAX_ROWS; one
# [batch, rows] input.
ROWS = [(1,), (CPU_KERNEL_MAX_ROWS,), (W8A8_MIN_ROWS,), (2, 20), (CPU_INT4_KERNEL_MAX_ROWS,),
        (CPU_INT4_KERNEL_MAX_ROWS + 1,)]
# Relative (Frobenius) error against the float64 product with the dequantized weight. A path
# that rounds activations, weight or product to bf16 (2^-9 relative each): measured up to 3.0e-3,
# bound 5e-3 as in test_quant.py. All-fp32 (fp32 x, dequantize+fp32): measured 2.6e-7, bound
# 1e-5. int8 x int8 adds each activation's rounding to 1/254 of its row's largest value:
# measured up to 7.9e-3 on these Gaussian rows, bound 1.5e-2.
TOLERANCE = {"bf16": 5e-3, "fp32": 1e-5, INT8_ACTIVATIONS: 1.5e-2}


def _relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.double() - reference).norm() / reference.norm()).item()


def _tolerance(path: str, dtype: torch.dtype) -> float:
    if path == INT8_ACTIVATIONS:
        return TOLERANCE[INT8_ACTIVATIONS]
    return TOLERANCE["fp32"] if (path == "dequantize+fp32" and dtype == torch.float32) else TOLERANCE["bf16"]


@pytest.fixture
def probe(tmp_path):
    """The probe on, with a cache file of this test's own and nothing remembered."""
    matmul_probe.forget()
    matmul_probe.configure(enabled=True, cache_file=tmp_path / "paths.json")
    matmul_probe.timings_run = 0
    yield tmp_path / "paths.json"
    matmul_probe.configure()
    matmul_probe.forget()


@pytest.mark.parametrize("bits,group,n,k,w8a8", SHAPES)
def test_every_path_equals_the_float_reference(bits, group, n, k, w8a8):
    torch.manual_seed(n * k + bits)
    weight, bias = torch.randn(n, k) * 0.05, torch.randn(n) * 0.1
    refused = bits == 4 and n % 16  # the int4 CPU packing needs N % 16 == 0: said with a warning
    with pytest.warns(UserWarning, match="packing refused") if refused else contextlib.nullcontext():
        layer = QuantizedLinear.from_weight(weight, bits, group or 128, bias=bias, int8_activations=w8a8).prepare_kernel()
    w64 = layer.dequantize(torch.float64)
    checked = set()
    with torch.inference_mode():
        for rows in ROWS:
            for dtype in (torch.float32, torch.bfloat16):
                layer.bias = bias.to(dtype)
                x = torch.randn(*rows, k).to(dtype)
                reference = x.double() @ w64.T + layer.bias.double()
                # whichever this CPU would time, every path a layer can take
                paths = layer.cpu_paths(dtype) + ["dequantize+fp32", "dequantize+bf16"]
                paths += [INT8_ACTIVATIONS] if bits == 8 else []  # any int8 weight
                for path in dict.fromkeys(paths):
                    layer.forced_path = path
                    out = layer(x)
                    assert out.shape == reference.shape and out.dtype == dtype, (path, rows, dtype)
                    error = _relative_error(out, reference)
                    assert error < _tolerance(path, dtype), f"{path}, {rows} rows, {dtype}: relative error {error:.2e}"
                    checked.add(path)
    expected = {"dequantize+fp32", "dequantize+bf16"} | ({PACKED} if layer.kernel_name != "dequantize" else set())
    assert expected <= checked
    assert (INT8_ACTIVATIONS in checked) == (bits == 8)


def _ulps(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest |got - expected| in units of the last place of `expected` in got's dtype."""
    info = torch.finfo(got.dtype)
    exponent = torch.frexp(expected.float().abs().clamp_min(info.tiny))[1]  # |e| = m * 2^exponent, m in [0.5, 1)
    ulp = info.eps * torch.ldexp(torch.ones_like(expected, dtype=torch.float32), exponent - 1)
    return float(((got.float() - expected.float()).abs() / ulp).max())


@pytest.mark.parametrize("rows", [1, 5, W8A8_MIN_ROWS, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(40, 96), (97, 160)])
def test_w8a8_equals_the_hand_written_reference(rows, dtype, n, k):
    """Written out: per row s = max |x| / 127 (a zero row: s = 1), a = round(x / s) (ties to
    even, as torch.round), acc = a @ q^T in int64, y = (acc * s) * scale in fp32, then x's dtype."""
    torch.manual_seed(rows)
    layer = QuantizedLinear.from_weight(torch.randn(n, k) * 0.05, 8, int8_activations=True)
    x = torch.randn(rows, k).to(dtype)
    x[0, 7] = 40.0  # an outlier sets its row's scale: nothing is clipped
    if rows > 1:
        x[1] = 0.0
    x32 = x.float()
    s = x32.abs().amax(dim=1)
    s = torch.where(s > 0, s / 127.0, torch.ones_like(s))
    a = torch.round(x32 / s[:, None])
    assert int(a.abs().max()) == 127 and bool((a == a.round()).all())
    acc = a.long() @ layer.qweight.long().T
    expected = ((acc.float() * s[:, None]) * layer.scales[None, :]).to(dtype)
    layer.forced_path = INT8_ACTIVATIONS
    with torch.inference_mode():
        got = layer(x)
    assert got.dtype == dtype
    assert _ulps(got, expected) <= 1.0
    # The quantizer itself, to the bit.
    q, scale = quantize_activations(x)
    assert torch.equal(q.long(), a.long()) and torch.equal(scale, s)


def test_without_int8_dot_products_w8a8_never_takes_int8(monkeypatch):
    """Where torch's _int_mm would run its scalar loop, int8 x int8 is not even a candidate."""
    import gptj.model.quantized_linear as quant

    layer = QuantizedLinear.from_weight(torch.randn(96, 160), 8, int8_activations=True).prepare_kernel()
    monkeypatch.setattr(matmul_probe, "int8_dot_products", lambda: None)
    monkeypatch.setattr(quant, "_said_no_int8_dots", [])
    with pytest.warns(UserWarning, match="no int8 dot products.*multiply as weight-only int8"):
        layer.cpu_paths(torch.bfloat16)
    for dtype in (torch.float32, torch.bfloat16):
        assert INT8_ACTIVATIONS not in layer.cpu_paths(dtype)
        assert {layer.cpu_path(rows, dtype) for rows in (1, 17, 600)} <= {PACKED, "dequantize+bf16"}


@pytest.mark.parametrize("int8_dots", [None, "avx512_vnni"])
def test_probing_off_follows_the_fixed_cutoffs(int8_dots, monkeypatch):
    import gptj.model.quantized_linear as quant

    monkeypatch.setattr(matmul_probe, "int8_dot_products", lambda: int8_dots)
    monkeypatch.setattr(quant, "_said_no_int8_dots", [True])  # said in the test below
    int8 = QuantizedLinear.from_weight(torch.randn(64, 128), 8).prepare_kernel()
    int4 = QuantizedLinear.from_weight(torch.randn(64, 128), 4, 32).prepare_kernel()
    w8a8 = QuantizedLinear.from_weight(torch.randn(64, 128), 8, int8_activations=True).prepare_kernel()
    bf16, fp32 = torch.bfloat16, torch.float32
    assert not matmul_probe.enabled()  # tests/conftest.py
    for layer in (int8, int4):
        assert layer.cpu_path(1, fp32) == layer.cpu_path(1000, fp32) == PACKED
    for layer in (int8, int4, w8a8):
        assert layer.cpu_path(CPU_KERNEL_MAX_ROWS, bf16) == PACKED
    assert int8.cpu_path(CPU_KERNEL_MAX_ROWS + 1, bf16) == "dequantize+bf16"
    assert int4.cpu_path(CPU_INT4_KERNEL_MAX_ROWS, bf16) == PACKED
    assert int4.cpu_path(CPU_INT4_KERNEL_MAX_ROWS + 1, bf16) == "dequantize+bf16"
    int8_from = INT8_ACTIVATIONS if int8_dots else None
    assert w8a8.cpu_path(W8A8_MIN_ROWS - 1, bf16) == PACKED
    assert w8a8.cpu_path(W8A8_MIN_ROWS, bf16) == (int8_from or "dequantize+bf16")
    assert w8a8.cpu_path(W8A8_MIN_ROWS, fp32) == (int8_from or PACKED)
    before = matmul_probe.timings_run
    with torch.inference_mode():
        w8a8(torch.randn(40, 128))
    assert matmul_probe.timings_run == before


def test_the_probe_times_once_keeps_the_fastest_and_reuses_it(probe, monkeypatch, caplog):
    """Fake timings (the real ones would make the choice depend on the machine's load): the
    fastest is kept, logged once, written under this CPU's name; a second layer of the same
    shape and row bucket, and a new process reading the file, time nothing."""
    fake_ms = {PACKED: 6.0, "dequantize+bf16": 3.1, "dequantize+fp32": 4.0, INT8_ACTIVATIONS: 9.0}
    timed = []

    def fake_time(run):
        run()  # the real call still runs: a path that fails must fail here
        timed.append(run.args[0])
        return fake_ms[run.args[0]] / 1e3

    monkeypatch.setattr(matmul_probe, "_time", fake_time)
    monkeypatch.setattr(matmul_probe, "native_bf16", lambda: False)  # the fp32 matmul is a candidate too
    torch.manual_seed(0)
    first, second = (QuantizedLinear.from_weight(torch.randn(48, 128), 8).prepare_kernel() for _ in range(2))
    x = torch.randn(40, 128).bfloat16()
    with caplog.at_level(logging.INFO, logger="gptj.matmul"), torch.inference_mode():
        y = first(x)
        assert set(timed) == set(first.cpu_paths(torch.bfloat16))
        assert matmul_probe.timings_run == 3  # candidates timed, in turns: 3 rounds, as 13.1 ms < 50 ms
        assert timed == list(dict.fromkeys(timed)) * 3
        assert [r.getMessage() for r in caplog.records if r.name == "gptj.matmul"] == [
            "int8 matmul, 64 rows of 128 -> 48, bfloat16: dequantize+bf16 (3.10 ms) over "
            "dequantize+fp32 (4.00 ms), packed (6.00 ms)"]
        second(x[:33])  # 33..64 rows: the same bucket
        assert matmul_probe.timings_run == 3
    first.forced_path = "dequantize+bf16"
    with torch.inference_mode():
        assert torch.equal(first(x), y)
    saved = json.loads(probe.read_text())
    table = saved["cpus"][matmul_probe.cpu_model()]
    (key, record), = table.items()
    assert key.startswith("int8 bfloat16 rows<=64 48x128 threads=") and record["path"] == "dequantize+bf16"
    assert record["ms"] == {PACKED: 6.0, "dequantize+bf16": 3.1, "dequantize+fp32": 4.0}
    matmul_probe.forget()  # a new process: the file answers
    third = QuantizedLinear.from_weight(torch.randn(48, 128), 8).prepare_kernel()
    assert third.cpu_path(64, torch.bfloat16) == "dequantize+bf16" and matmul_probe.timings_run == 3
    assert third.cpu_path(1, torch.bfloat16) in fake_ms and matmul_probe.timings_run == 6  # another bucket
    assert matmul_probe.chosen()[key]["path"] == "dequantize+bf16"


def test_a_cpu_with_the_same_name_but_other_instruction_sets_measures_again(probe, monkeypatch):
    """Virtual machines name AVX2-only and AVX-512 + BF16 parts alike ("AMD EPYC"): the cache
    is keyed by the deciding instruction sets too, so one's choice is never the other's."""
    layer = QuantizedLinear.from_weight(torch.randn(48, 128), 8).prepare_kernel()
    monkeypatch.setattr(matmul_probe, "_cpu_flags", lambda: {"avx2", "fpu"})
    with torch.inference_mode():
        layer(torch.randn(40, 128))
    assert matmul_probe.cpu_model().endswith(" [avx2]")
    before = matmul_probe.timings_run
    matmul_probe.forget()  # a new process on the other machine, same name, same cache file
    monkeypatch.setattr(matmul_probe, "_cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    layer = QuantizedLinear.from_weight(torch.randn(48, 128), 8).prepare_kernel()
    with torch.inference_mode():
        layer(torch.randn(40, 128))
    assert matmul_probe.timings_run > before
    assert sorted(json.loads(probe.read_text())["cpus"]) == sorted(
        [matmul_probe.cpu_model(), matmul_probe.cpu_model().replace(" avx512f avx512_bf16", "")])


def test_the_probe_times_real_calls_and_survives_a_broken_file(probe, caplog):
    probe.write_text("{not json")
    layer = QuantizedLinear.from_weight(torch.randn(64, 128), 4, 32).prepare_kernel()
    before = matmul_probe.timings_run
    with caplog.at_level(logging.INFO, logger="gptj.matmul"), torch.inference_mode():
        out = layer(torch.randn(3, 128))
    assert matmul_probe.timings_run - before == len(layer.cpu_paths(torch.float32))
    said = [r.getMessage() for r in caplog.records if r.name == "gptj.matmul"]
    assert len(said) == 2 and "ignoring" in said[0] and said[0].startswith(f"matmul paths: ignoring {probe}")
    assert said[1].startswith("int4 g32 matmul, 4 rows of 128 -> 64, float32: ")
    assert out.shape == (3, 64)
    record = json.loads(probe.read_text())["cpus"][matmul_probe.cpu_model()]
    assert [r["path"] for r in record.values()] == [layer.cpu_path(3, torch.float32)]


@pytest.mark.parametrize("native", [True, False])
def test_the_fp32_matmul_is_a_candidate_for_bf16_only_where_bf16_is_not_native(native, monkeypatch):
    monkeypatch.setattr(matmul_probe, "native_bf16", lambda: native)
    layer = QuantizedLinear.from_weight(torch.randn(32, 64), 8).prepare_kernel()
    assert ("dequantize+fp32" in layer.cpu_paths(torch.bfloat16)) == (not native)
    assert layer.cpu_paths(torch.float32) == [PACKED, "dequantize+fp32", "dequantize+bf16"]


def test_row_buckets():
    assert [matmul_probe.row_bucket(r) for r in (1, 2, 3, 16, 17, 129, 512, 513, 5000)] == \
        [1, 2, 4, 16, 32, 256, 512, 512, 512]


def test_w8a8_spec_and_model():
    spec = QuantSpec.parse("w8a8")
    assert (spec.bits, spec.int8_activations, spec.quantize_head, spec.name) == (8, True, False, "w8a8")
    assert QuantSpec.from_dict(spec.to_dict()) == spec and spec.to_dict()["method"] == "w8a8"
    assert QuantSpec.from_dict(QuantSpec(8).to_dict()) == QuantSpec(8)
    with pytest.raises(QuantizationError, match="int8 activations \\(w8a8\\) need 8-bit weights, got 4"):
        QuantSpec(4, 32, int8_activations=True).check()
    with pytest.raises(QuantizationError, match="unknown quantization method 'w4a4'"):
        QuantSpec.from_dict({"method": "w4a4", "bits": 4})
    model = GPTJ(ModelConfig.preset("tiny")).init_weights(seed=0).eval()
    quantized = quantized_copy(model, spec)
    layers = [m for m in quantized.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 3 * model.config.num_layers and all(m.int8_activations for m in layers)
    assert isinstance(quantized.lm_head.weight, torch.Tensor)  # lm_head stays float
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(quantized.logits(ids), model.logits(ids), rtol=0.05, atol=0.05)


def test_an_unknown_forced_path_is_named():
    layer = QuantizedLinear.from_weight(torch.randn(16, 32), 8).prepare_kernel()
    layer.forced_path = "int3"
    with pytest.raises(QuantizationError, match="unknown matmul path 'int3'"), torch.inference_mode():
        layer(torch.randn(2, 32))
