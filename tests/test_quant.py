"""Weight-only quantization: the quantized linear computes with its dequantized weight, the
rounding stays within half a step, tensor parallelism and saved checkpoints give the tokens and
logits of a single-process model quantized while loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import data
from execution.distributed import init_distributed
from execution.generation import generate
from execution.pipelines import load_model_and_tokenizer
from execution.quantize import main as quantize_main
from gptj import ParallelContext
from gptj.quant import QuantizationError, QuantizedLinear, QuantSpec
from gptj.quantized import check_layout, quantize_from_reader
from tests.distributed import run_distributed
from tests.reference import TINY, hf_model, state_reader
from tests.test_generation_fixtures import PROMPTS, reference_pair

CASES = [(8, 128), (4, 32), (4, 64), (4, 128), (4, 256)]


@pytest.mark.parametrize("bits,group", CASES)
@pytest.mark.parametrize("rows", [1, 5, 40])  # packed kernel (decode) and dequantize + matmul (prefill)
def test_quantized_linear_equals_dequantized_weight_linear(bits, group, rows):
    torch.manual_seed(bits * 1000 + group + rows)
    weight, bias = torch.randn(96, 512) * 0.05, torch.randn(96)
    layer = QuantizedLinear.from_weight(weight, bits, group, bias=bias)
    x = torch.randn(2, rows, 512)
    reference = F.linear(x, layer.dequantize(), bias)
    out = layer(x)
    assert out.shape == reference.shape and out.dtype == x.dtype
    # The packed kernels take bf16 activations: bf16 tolerance relative to the output's scale.
    scale = reference.abs().max().item()
    torch.testing.assert_close(out, reference, rtol=1e-2, atol=1e-2 * scale)
    xb = x.bfloat16()
    torch.testing.assert_close(layer(xb).float(), F.linear(x, layer.dequantize(), bias), rtol=2e-2, atol=2e-2 * scale)


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


@pytest.mark.parametrize("bits,group", [(8, 128), (4, 32)])
def test_saved_quantized_checkpoint_loads_identical(float_dir, tmp_path, bits, group):
    out = tmp_path / f"int{bits}"
    args = ["--model", str(float_dir), "--bits", str(bits), "--group-size", str(group), "--output", str(out),
            "--no-progress"]
    assert quantize_main(args) == 0
    loaded, tok = load_model_and_tokenizer(str(out))  # the quantization section says how
    direct, _ = load_model_and_tokenizer(str(float_dir), quantize=f"int{bits}", group_size=group)
    assert loaded.quantization == direct.quantization == QuantSpec(bits, group)
    ids = torch.tensor([tok.encode(["the cat sat on the mat"])[0]])
    with torch.inference_mode():
        assert torch.equal(loaded.logits(ids), direct.logits(ids))
        assert torch.equal(loaded.logits(ids[:, :1]), direct.logits(ids[:, :1]))  # packed kernel path
    prompts = tok.encode(["a dog", "the cat sat on"])
    first = [r.token_ids for r in generate(loaded, prompts, 8, None)]
    assert first == [r.token_ids for r in generate(direct, prompts, 8, None)]
    # A saved quantized checkpoint is not quantized again, and is not overwritten by accident.
    with pytest.raises(ValueError, match="already quantized"):
        load_model_and_tokenizer(str(out), quantize="int8" if bits == 4 else "int4")
    assert quantize_main(args) == 2


def test_quantize_cli_rejects_bad_input(float_dir, tmp_path, capsys):
    assert quantize_main(["--model", str(tmp_path / "missing"), "--bits", "8", "--output", str(tmp_path / "o"),
                          "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert quantize_main(["--model", str(float_dir), "--bits", "4", "--group-size", "128", "--output",
                          str(tmp_path / "o"), "--no-progress"]) == 2  # d = 64 < 128
    assert "group size 128 does not divide the input width 64" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bits,group", [(8, 128), (4, 64)])
def test_quantized_prefill_equals_the_dequantized_reference(bits, group, monkeypatch):
    """Many bf16 rows: the weight is dequantized slice by slice into a reused buffer (here four
    slices), read back from the kernel's copy for int4; the product is that of the whole weight."""
    import gptj.quant as quant

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
