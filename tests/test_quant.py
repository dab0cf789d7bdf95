"""Weight-only quantization: the quantized linear (packed CPU kernels, many-row path, training
path) computes with its dequantized weight, the rounding stays within half a step, tensor
parallelism and saved checkpoints give the tokens and logits of a single-process model
quantized while loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gptj.data as data
from gptj.commands.quantize import main as quantize_main
from gptj.execution.inference.generation import generate
from gptj.execution.inference.pipelines import load_model_and_tokenizer
from gptj.execution.runtime.distributed import init_distributed
from gptj.model import ParallelContext
from gptj.model.quantized_linear import (
    CPU_INT4_KERNEL_MAX_ROWS,
    CPU_KERNEL_MAX_ROWS,
    QuantizationError,
    QuantizedLinear,
    QuantSpec,
)
from gptj.model.quantized_model import check_layout, quantize_from_reader
from tests.fixtures.distributed import run_distributed
from tests.fixtures.generation import PROMPTS, reference_pair
from tests.fixtures.reference import TINY, hf_model, state_reader

CASES = [(8, 128), (4, 32), (4, 64), (4, 128), (4, 256)]
# (bits, group, out_features, in_features): the int4 CPU kernel takes out_features that are a
# multiple of 16; 97 outputs (and 160 inputs for int8) are the odd shapes.
KERNEL_SHAPES = [(8, 0, 96, 512), (8, 0, 97, 160), (4, 32, 96, 512), (4, 64, 48, 192), (4, 128, 112, 256),
                 (4, 256, 32, 512), (4, 32, 97, 96)]
# Row counts on both sides of CPU_KERNEL_MAX_ROWS and CPU_INT4_KERNEL_MAX_ROWS, as [rows, in]
# and [batch, rows, in].
ROW_SHAPES = [(1,), (CPU_KERNEL_MAX_ROWS,), (CPU_KERNEL_MAX_ROWS + 1,), (2, 20), (CPU_INT4_KERNEL_MAX_ROWS + 1,)]
# Relative (Frobenius) error against float64: the kernels take bf16 activations and return
# bf16, the many-row bf16 path multiplies by the weight rounded to bf16, bf16 biases; each
# rounding is at most 2^-9 relative, measured 2.1e-3 to 3.0e-3 together. A 1% error fails.
KERNEL_TOLERANCE = 5e-3


def _relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.double() - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("bits,group,n,k", KERNEL_SHAPES)
def test_inference_calls_equal_a_float64_product_with_the_dequantized_weight(bits, group, n, k):
    """Without gradients (decode, prefill, scoring) the layer runs the packed CPU kernels or its
    many-row path; both must give x @ W^T + b for the dequantized W, in x's dtype."""
    torch.manual_seed(n * k + bits)
    weight, bias = torch.randn(n, k) * 0.05, torch.randn(n) * 0.1
    layer = QuantizedLinear.from_weight(weight, bits, group or 128, bias=bias)
    with torch.inference_mode():
        w64 = layer.dequantize(torch.float64)
        for rows in ROW_SHAPES:
            for dtype in (torch.float32, torch.bfloat16):
                layer.bias = bias.to(dtype)  # a model's biases are in its activation dtype
                x = torch.randn(*rows, k).to(dtype)
                reference = x.double() @ w64.T + layer.bias.double()
                out = layer(x)
                assert out.shape == reference.shape and out.dtype == dtype, (rows, dtype)
                error = _relative_error(out, reference)
                assert error < KERNEL_TOLERANCE, f"{rows} rows, {dtype}: relative error {error:.2e}"
    # Asked after the calls: a shape the kernel takes must not have dropped to dequantize + matmul.
    if bits == 4 and n % 16:  # no int4 CPU layout for this width in torch (a padded one may come)
        assert layer.prepare_kernel().kernel_name in ("dequantize", "int4_cpu")
    else:
        assert layer.prepare_kernel().kernel_name == f"int{bits}_cpu"


@pytest.mark.parametrize("bits,group", CASES)
def test_training_calls_multiply_by_the_dequantized_weight_both_ways(bits, group):
    """With gradients (adapters on a frozen quantized base): x @ W^T in x's dtype, grad x = g @ W."""
    torch.manual_seed(bits * 1000 + group)
    weight, bias = torch.randn(96, 512) * 0.05, torch.randn(96)
    layer = QuantizedLinear.from_weight(weight, bits, group, bias=bias)
    w64 = layer.dequantize(torch.float64)
    x = torch.randn(2, 5, 512, requires_grad=True)
    out = layer(x)
    torch.testing.assert_close(out.double(), x.double() @ w64.T + bias.double(), rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(x.grad.double(), grad.double() @ w64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,group", CASES)
def test_rounding_error_is_at_most_half_a_step(bits, group):
    torch.manual_seed(0)
    weight = torch.randn(64, 512) * 0.02
    weight[3] = 0.0  # an all-zero row must survive (no division by zero)
    layer = QuantizedLinear.from_weight(weight, bits, group)
    error = (layer.dequantize() - weight).abs()
    if bits == 8:
        step = layer.scales[:, None].expand_as(weight)
        assert int(layer.qweight.abs().max()) <= 127
    else:
        step = layer.scales.repeat_interleave(group, dim=1)
    assert bool((error <= step * 0.5 + 1e-7).all())
    assert error[3].max().item() < 1e-9
    # Quantization is per row (and group): a row's values do not depend on the other rows.
    alone = QuantizedLinear.from_weight(weight[5:6], bits, group)
    assert torch.equal(alone.dequantize(), layer.dequantize()[5:6])


def test_int4_groups_must_tile_each_rank_shard():
    spec = QuantSpec(4, 64)
    check_layout(TINY, ParallelContext(tensor_parallel=1), spec)  # d = 64: fits
    with pytest.raises(QuantizationError, match="group size 64 does not divide the input width 32 of out_proj"):
        check_layout(TINY, ParallelContext(tensor_parallel=2), spec)
    with pytest.raises(QuantizationError, match="group size must be one of"):
        QuantSpec.parse("int4", 48)


def _quantized_outputs(ctx, spec):
    """Logits of a forward pass and greedy tokens of a quantized model (HF's initial scale: the
    packed kernels round each matmul's output to bf16, so TP partial sums differ from the
    single-process sum in the last bits, and weights scaled for varied greedy output would
    flip near-ties)."""
    hf = hf_model(TINY, seed=2)
    model = quantize_from_reader(TINY, ctx, torch.float32, "cpu", spec, state_reader(hf.state_dict()))
    with torch.inference_mode():
        logits = model.logits(torch.tensor([PROMPTS[0], PROMPTS[4][:7]]))
    runs = [dict(max_new_tokens=10, eos_token_id=None), dict(max_new_tokens=8, eos_token_id=None, batch_size=2)]
    return logits, [[r.token_ids for r in generate(model, PROMPTS, **kw)] for kw in runs]


SPECS = [QuantSpec(8), QuantSpec(4, 32)]


def _tp_worker(rank, world_size):
    ctx, _ = init_distributed(tensor_parallel=world_size)
    return [_quantized_outputs(ctx, spec) for spec in SPECS]


def test_tensor_parallel_quantized_gives_the_single_process_tokens():
    ranks = run_distributed(_tp_worker, 2)  # int8 and int4 in one launch: process start-up dominates
    for i, spec in enumerate(SPECS):
        logits, tokens = _quantized_outputs(None, spec)
        assert ranks[0][i][1] == ranks[1][i][1] == tokens, spec
        for rank in ranks:
            torch.testing.assert_close(rank[i][0], logits, rtol=1e-2, atol=1e-2 * logits.abs().max().item())


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    tok = data.load_tokenizer("bundled:tiny")
    config = TINY.replace(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, bos_token_id=tok.eos_id)
    hf, _ = reference_pair(seed=4, config=config)
    out = tmp_path_factory.mktemp("float") / "hf"
    hf.save_pretrained(out)
    tok.save(out)
    return out


@pytest.mark.parametrize("mode,group", [("int8", 128), ("int4", 32), ("w8a8", 128)])
def test_saved_quantized_checkpoint_loads_identical(float_dir, tmp_path, mode, group):
    out = tmp_path / mode
    args = ["--model", str(float_dir), "--quantize", mode, "--group-size", str(group), "--output", str(out),
            "--no-progress"]
    assert quantize_main(args) == 0
    loaded, tok = load_model_and_tokenizer(str(out))  # the quantization section says how
    direct, _ = load_model_and_tokenizer(str(float_dir), quantize=mode, group_size=group)
    assert loaded.quantization == direct.quantization == QuantSpec.parse(mode, group)
    flags = [m.int8_activations for m in loaded.modules() if isinstance(m, QuantizedLinear)]
    assert len(flags) == 3 * loaded.config.num_layers + (mode != "w8a8")  # w8a8: lm_head stays float
    assert set(flags) == {mode == "w8a8"}
    ids = torch.tensor([tok.encode(["the cat sat on the mat"])[0]])
    with torch.inference_mode():
        assert torch.equal(loaded.logits(ids), direct.logits(ids))
        assert torch.equal(loaded.logits(ids[:, :1]), direct.logits(ids[:, :1]))  # packed kernel path
    prompts = tok.encode(["a dog", "the cat sat on"])
    first = [r.token_ids for r in generate(loaded, prompts, 8, None)]
    assert first == [r.token_ids for r in generate(direct, prompts, 8, None)]
    # A saved quantized checkpoint is not quantized again, and is not overwritten by accident.
    with pytest.raises(ValueError, match="already quantized"):
        load_model_and_tokenizer(str(out), quantize="int8" if mode == "int4" else "int4")
    assert quantize_main(args) == 2


def test_quantize_cli_rejects_bad_input(float_dir, tmp_path, capsys):
    assert quantize_main(["--model", str(tmp_path / "missing"), "--quantize", "int8", "--output", str(tmp_path / "o"),
                          "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert quantize_main(["--model", str(float_dir), "--quantize", "int4", "--group-size", "128", "--output",
                          str(tmp_path / "o"), "--no-progress"]) == 2  # d = 64 < 128
    assert "group size 128 does not divide the input width 64" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bits,group", [(8, 128), (4, 64)])
def test_quantized_prefill_equals_the_dequantized_reference(bits, group, monkeypatch):
    """Many bf16 rows: the weight is dequantized slice by slice into a reused buffer (here four
    slices), read back from the kernel's copy for int4; the product is that of the whole weight."""
    import gptj.model.quantized_linear as quant

    monkeypatch.setattr(quant, "PREFILL_WEIGHT_ELEMENTS", 64 * 512)
    torch.manual_seed(bits + group)
    weight = torch.randn(256, 512) * 0.05
    layer = QuantizedLinear.from_weight(weight, bits, group)
    reference_weight = layer.dequantize(torch.bfloat16)
    layer.prepare_kernel()
    assert layer.holds_stored == (bits == 8)
    x = torch.randn(3, 70, 512).bfloat16()
    torch.testing.assert_close(layer(x), F.linear(x, reference_weight), rtol=1e-2, atol=1e-3)
    assert torch.equal(layer.dequantize(torch.bfloat16), reference_weight)


def test_the_reused_prefill_buffer_serves_inference_mode_and_no_grad_alike(monkeypatch):
    """The buffer a bf16 prefill dequantizes into is made once per thread: made first under
    inference mode (a server), it must still take writes under no_grad (an evaluation)."""
    import threading

    import gptj.model.quantized_linear as quant

    monkeypatch.setattr(quant, "_scratch", threading.local())  # no buffer made yet
    layer = QuantizedLinear.from_weight(torch.randn(64, 128) * 0.05, 8).prepare_kernel()
    x = torch.randn(40, 128).bfloat16()  # past CPU_KERNEL_MAX_ROWS: the dequantizing path
    with torch.inference_mode():
        first = layer(x)
    with torch.no_grad():
        assert torch.equal(layer(x), first)
    truth = F.linear(x.float(), layer.dequantize(torch.float32))  # the quantized weight, in fp32
    torch.testing.assert_close(first.float(), truth, rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("rows,width", [(3 * 64 + 32, 256), (3 * 64 + 16, 256), (128, 512), (64, 128)])
def test_cpu_int4_layout_is_built_byte_for_byte_as_torch_packs_it(rows, width, monkeypatch):
    """The stored bytes rearranged into the CPU kernel's layout directly (in several chunks here)
    equal torch's own converter's output on the unpacked values, full blocks and tail, in the
    layout this machine's torch uses (64-row blocks for AVX-512, 32 for AVX2)."""
    import gptj.model.int4_cpu_layout as quant

    assert quant.kernel_block_rows() in quant.BLOCK_ROWS_CANDIDATES
    monkeypatch.setattr(quant, "PACK_BYTES", 64 * width)  # two 64-row blocks a chunk
    qweight = torch.randint(0, 256, (rows, width // 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(rows))
    values = quant.unpack_int4(qweight)
    expected = torch._convert_weight_to_int4pack_for_cpu(values.to(torch.int32), 1)
    assert quant._direct_packing_matches()
    assert torch.equal(quant.int4_cpu_pack(qweight), expected)
    assert torch.equal(quant.int4_cpu_unpack(expected, 0, rows), values)
    monkeypatch.setattr(quant, "_direct_packing_matches", lambda: False)  # a torch that packs otherwise
    assert torch.equal(quant.int4_cpu_pack(qweight), expected)


@pytest.mark.parametrize("block", [64, 32])
def test_both_cpu_int4_layouts_match_their_definition(block):
    """Each block size's packing and reading, whichever this machine's torch uses, against the
    layout written out byte by byte: block byte (k, j) = row j | row block/2 + j << 4, and the
    tail's byte (k, i) = row 2i | row 2i + 1 << 4."""
    import gptj.model.int4_cpu_layout as quant

    rows, width = 2 * block + 16, 64
    values = torch.randint(0, 16, (rows, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(block))
    expected = torch.empty(rows, width // 2, dtype=torch.uint8)
    flat = expected.view(-1)
    for b in range(2):
        base = b * block * width // 2
        for k in range(width):
            for j in range(block // 2):
                lo, hi = values[b * block + j, k], values[b * block + block // 2 + j, k]
                flat[base + k * block // 2 + j] = lo | (hi << 4)
    base, tail = 2 * block * width // 2, 16
    for k in range(width):
        for i in range(tail // 2):
            flat[base + k * tail // 2 + i] = values[2 * block + 2 * i, k] | (values[2 * block + 2 * i + 1, k] << 4)
    packed = torch.zeros_like(expected)
    quant._pack_full_blocks((values[:, 0::2] << 4) | values[:, 1::2], packed, 1, block)
    assert torch.equal(packed[: 2 * block], expected[: 2 * block])
    assert torch.equal(quant._unpack(expected, 0, rows, block), values)
    assert torch.equal(quant._unpack(expected, 64, rows, block), values[64:])
