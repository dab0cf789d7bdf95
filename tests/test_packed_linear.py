"""Float projections packed in oneDNN's layout (gptj/model/packed_linear.py) against the plain
products: every shape and dtype, the whole model's logits, what is packed and what is not,
the probe's say, gradients, and the round trip back to plain parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gptj.model import GPTJ, ModelConfig, matmul_probe
from gptj.model.packed_linear import PackedLinear, onednn_available, pack_projections, unpack_projections
from gptj.model.quantized_linear import QuantizedLinear

pytestmark = pytest.mark.skipif(not onednn_available(), reason="torch was built without oneDNN")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_features,in_features", [(48, 64), (37, 29), (128, 256)])
def test_a_packed_product_equals_the_plain_one(dtype, out_features, in_features):
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features).to(dtype)
    layer = PackedLinear(weight)
    assert torch.equal(layer.dense(), weight)
    for shape in [(1, in_features), (3, in_features), (17, in_features), (2, 5, in_features)]:
        x = torch.randn(shape).to(dtype)
        with torch.inference_mode():
            got = layer(x)
        want = F.linear(x.float(), weight.float())
        assert got.shape == want.shape and got.dtype == dtype
        # fp32: the same sums in another order; bf16: one rounding of the fp32-accumulated result.
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got.float(), want, rtol=tolerance, atol=tolerance)


def tiny(seed=3, dtype=torch.float32):
    return GPTJ(ModelConfig.preset("tiny"), dtype=dtype).init_weights(seed=seed).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_model_computes_the_same_logits_and_unpacks_exactly(dtype):
    plain, packed = tiny(dtype=dtype), tiny(dtype=dtype)
    weights = {name: p.detach().clone() for name, p in plain.named_parameters()}
    assert pack_projections(packed)
    block = packed.blocks[0]
    for module in (block.in_proj_weight, block.attn.out_proj_weight, block.mlp.fc_out_weight, packed.lm_head.weight):
        assert isinstance(module, PackedLinear)
    names = {name for name, _ in packed.named_parameters()}
    assert not any(n.endswith(("in_proj_weight", "out_proj_weight", "fc_out_weight", "lm_head.weight")) for n in names)
    ids = torch.randint(0, 1000, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want, got = plain.logits(ids), packed.logits(ids)
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got, want, rtol=0, atol=tolerance)
    unpack_projections(packed)
    unpacked = dict(packed.named_parameters())
    assert unpacked.keys() == weights.keys()
    for name, p in unpacked.items():
        assert torch.equal(p, weights[name]), name


def test_an_input_that_needs_a_gradient_gets_the_plain_gradient():
    weight = torch.randn(24, 40)
    layer = PackedLinear(weight)
    x = torch.randn(5, 40, requires_grad=True)
    layer(x).square().sum().backward()
    want = x.detach().clone().requires_grad_()
    F.linear(want, weight).square().sum().backward()
    torch.testing.assert_close(x.grad, want.grad)


def test_quantized_projections_stay_quantized_and_the_float_head_is_packed():
    from gptj.execution.runtime.model_loading import load_model
    from gptj.model.quantized_linear import QuantSpec

    model = load_model("random:tiny", quantize=QuantSpec.parse("w8a8"), pack_weights=True).model
    assert isinstance(model.blocks[0].in_proj_weight, QuantizedLinear)
    assert isinstance(model.lm_head.weight, PackedLinear)  # w8a8 keeps lm_head in float


@pytest.fixture
def probe(tmp_path):
    matmul_probe.forget()
    matmul_probe.configure(enabled=True, cache_file=tmp_path / "paths.json")
    yield
    matmul_probe.configure()
    matmul_probe.forget()


@pytest.mark.parametrize("winner", ["plain", "onednn-packed"])
def test_the_probe_decides_whether_to_pack(probe, monkeypatch, winner):
    asked = []

    def choose(family, dtype, rows, out_features, in_features, candidates):
        asked.append((family, rows))
        assert set(candidates) == {"plain", "onednn-packed"}
        for run in candidates.values():
            run()
        return winner

    monkeypatch.setattr(matmul_probe, "choose", choose)
    model = tiny()
    assert pack_projections(model) == (winner == "onednn-packed")
    assert isinstance(model.blocks[0].in_proj_weight, PackedLinear) == (winner == "onednn-packed")
    assert asked[0] == ("dense", 1)


def test_the_inference_loader_packs_unless_told_not_to():
    from gptj.execution.inference.pipelines import load_model_and_tokenizer

    packed, _ = load_model_and_tokenizer("random:tiny", "bundled:tiny")
    plain, _ = load_model_and_tokenizer("random:tiny", "bundled:tiny", pack_weights=False)
    assert isinstance(packed.blocks[0].in_proj_weight, PackedLinear)
    assert isinstance(plain.blocks[0].in_proj_weight, torch.nn.Parameter)


def test_the_loss_head_export_and_a_quantized_copy_read_a_packed_model_as_its_plain_weights():
    from gptj.model.hf import gather_hf_tensors
    from gptj.model.quantized_linear import QuantSpec
    from gptj.model.quantized_model import quantized_copy

    plain, packed = tiny(), tiny()
    pack_projections(packed)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        torch.testing.assert_close(packed.loss(ids, ids), plain.loss(ids, ids), rtol=0, atol=1e-5)
        spec = QuantSpec.parse("int8")
        assert torch.equal(quantized_copy(packed, spec).logits(ids), quantized_copy(plain, spec).logits(ids))
    exported, want = gather_hf_tensors(packed), gather_hf_tensors(plain)
    assert exported.keys() == want.keys() and all(torch.equal(exported[k], want[k]) for k in want)
