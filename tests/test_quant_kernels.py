"""Which kernel a quantized linear runs: strided inputs, refused packings, the int8 CUDA formula.

The reference is always the plain matmul with the layer's own dequantized weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.gpu_bench import layer_kernels
from gptj.model import GPTJ, ModelConfig
from gptj.model.quantized_linear import QuantizedLinear, QuantSpec
from gptj.model.quantized_model import quantized_copy


@pytest.mark.parametrize("bits", [8, 4])
def test_a_strided_input_gives_what_its_contiguous_copy_gives(bits):
    torch.manual_seed(0)
    layer = QuantizedLinear.from_weight(torch.randn(256, 256), bits, 128)
    hidden = torch.randn(3, 5, 256, dtype=torch.bfloat16)
    last = hidden[:, -1]  # [3, 256] with a row stride of 5 * 256: what logits(last_only=True) passes
    assert not last.is_contiguous()
    with torch.no_grad():
        assert torch.equal(layer(last), layer(last.contiguous()))
    assert layer.kernel_name == f"int{bits}_cpu"


def test_last_only_logits_of_an_int4_model_at_batch_three():
    model = GPTJ(ModelConfig.preset("tiny")).init_weights(seed=1).eval()
    quantized = quantized_copy(model, QuantSpec(4, 128))
    ids = torch.randint(0, model.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        last = quantized.logits(ids, last_only=True)
        rows = torch.cat([quantized.logits(ids[b : b + 1], last_only=True) for b in range(3)])
    assert last.shape == (3, model.config.vocab_size)
    torch.testing.assert_close(last, rows)


def test_a_refused_packing_is_recorded_and_warned_not_silent():
    torch.manual_seed(0)
    odd = QuantizedLinear.from_weight(torch.randn(100, 256), 4, 128)  # the CPU int4 packing needs N % 16 == 0
    with pytest.warns(UserWarning, match="int4_cpu packing refused"):
        odd.prepare_kernel()
    assert odd.kernel_name == "dequantize" and "[100, 256]" in odd.kernel_refused
    x = torch.randn(2, 256)
    with torch.no_grad():
        torch.testing.assert_close(odd(x), F.linear(x, odd.dequantize()))
    layers = nn.ModuleDict({"fits": QuantizedLinear.from_weight(torch.randn(256, 256), 4, 128), "odd": odd})
    kernels, refused = layer_kernels(layers)
    assert kernels == {"fits": "int4_cpu", "odd": "dequantize"}
    assert list(refused) == ["odd"] and refused["odd"] == odd.kernel_refused


def test_the_int8_cuda_formula_is_the_dequantized_matmul():
    # The CUDA path's math, run on CPU tensors: (x @ q^T) * scale == x @ (q * scale)^T, up to
    # the bf16 rounding of the two products.
    torch.manual_seed(0)
    layer = QuantizedLinear.from_weight(torch.randn(64, 256) * 0.02, 8)
    layer._build_int8_cuda_kernel()
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    reference = F.linear(x.float(), layer.dequantize())
    got = layer._int8_cuda_matmul(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), reference, rtol=2e-2, atol=2e-2 * reference.abs().max().item())
    assert layer.kernel_name == "int8_cuda"
    assert layer.decode_bytes() == 64 * 256 + 64 * 2  # the int8 weight and bf16 scales, read once
