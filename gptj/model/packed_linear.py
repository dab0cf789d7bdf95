"""Frozen float projections kept in oneDNN's own weight layout, for inference on a CPU.

`F.linear` on a CPU hands a bf16 product to oneDNN, which first reorders the weight into its
blocked layout, on every call; an fp32 product goes to the BLAS torch was built with, which on
some CPUs runs far below what the CPU can do (on an AMD EPYC with AVX-512, MKL's sgemm ran a
512-row GPT-J projection 2.5x slower than oneDNN). A weight that no longer changes can be
reordered once: `torch.ops.mkldnn._reorder_linear_weight` packs it, and
`torch.ops.mkldnn._linear_pointwise` multiplies by the packed copy. At one row (batch-1
decode) that halves the time of a bf16 16384 x 4096 projection, at 16 rows it takes 0.6x, at
512 rows 0.95x; numbers: benchmarks/NOTES.md, "Packed oneDNN weights".

`pack_projections(model)` replaces each block's fused input projection, attention output
projection and fc_out, and the lm_head, by a `PackedLinear` holding only the packed copy (the
plain weight is freed: the model never holds a weight twice), the way quantization swaps in a
`QuantizedLinear`; `linear()` (gptj/model/quantized_linear.py) calls whichever module it finds.
Whether packing wins here is measured once per CPU kind by the matmul probe
(gptj/model/matmul_probe.py) on the model's own fused projection at 1 and 128 rows; with
probing off it packs wherever oneDNN runs. The packed model is for inference: an input that
needs a gradient goes through a plain copy of the weight (slow), and `unpack_projections(model)`
gives the plain parameters back (to train, merge adapters or save).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import matmul_probe

PACKED_DTYPES = (torch.float32, torch.bfloat16)
PACKED = "onednn-packed"
PLAIN = "plain"


class PackedLinear(nn.Module):
    """x @ W^T for a frozen float W [out_features, in_features] held in oneDNN's layout."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            # The packed product has no backward: through a plain copy, so x's gradient flows
            # (slow, and rare: training unpacks first).
            return F.linear(x, self.dense().to(x.dtype))
        return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.packed, None, "none", [], "")

    def dense(self) -> torch.Tensor:
        """The plain weight [out_features, in_features] (a copy)."""
        return self.packed.to_dense()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight in `dtype`, as a frozen QuantizedLinear gives it (the fused loss head
        multiplies by either kind of frozen weight this way)."""
        return self.dense().to(dtype)

    def nbytes(self) -> int:
        return self.out_features * self.in_features * self.dtype.itemsize

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}"


def projection_owners(model) -> list[tuple[nn.Module, str]]:
    """(module, attribute) of every projection weight `pack_projections` may pack."""
    owners = [(model.lm_head, "weight")]
    for block in model.blocks:
        owners += [(block, "in_proj_weight"), (block.attn, "out_proj_weight"), (block.mlp, "fc_out_weight")]
    return owners


@functools.cache
def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


def packing_wins(weight: torch.Tensor, packed: PackedLinear) -> bool:
    """Whether `packed` (weight's packed copy) beats `F.linear` on this CPU for the weight's
    shape and dtype, at 1 row and at 128 (the probe's choice, measured once per CPU kind;
    True with probing off)."""
    if not matmul_probe.enabled():
        return True
    out_features, in_features = weight.shape
    for rows in (1, 128):
        x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(0)).to(weight.dtype)
        candidates = {PLAIN: functools.partial(F.linear, x, weight), PACKED: functools.partial(packed, x)}
        with torch.inference_mode():
            chosen = matmul_probe.choose("dense", weight.dtype, rows, out_features, in_features, candidates)
        if chosen != PACKED:
            return False
    return True


@torch.no_grad()
def pack_projections(model) -> bool:
    """Pack the model's float projections (module docstring) when it runs on a CPU with oneDNN
    in fp32 or bf16 and packing wins here; quantized ones stay as they are. Returns whether
    it packed."""
    owners = [(m, a) for m, a in projection_owners(model) if isinstance(m._parameters.get(a), nn.Parameter)]
    if not owners or not onednn_available():
        return False
    first = owners[-1]  # a block's projection where there is one: the shapes that matter most
    weight = first[0]._parameters[first[1]]
    if weight.device.type != "cpu" or weight.dtype not in PACKED_DTYPES:
        return False
    probed = PackedLinear(weight)  # timed, then kept: at most one weight is ever held twice
    if not packing_wins(weight, probed):
        return False
    del weight
    for module, attr in owners:
        packed = probed if (module, attr) == first else PackedLinear(module._parameters[attr])
        del module._parameters[attr]  # frees the plain weight
        module.add_module(attr, packed)
    return True


class _FloatWeights(Mapping):
    """Parameters by name, and packed projections' plain weights under the names their
    parameters had, each made when asked for (one copy at a time, not the model's worth)."""

    def __init__(self, model):
        self._params = dict(model.named_parameters())
        self._packed = {name: m for name, m in model.named_modules() if isinstance(m, PackedLinear)}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._packed:
            return self._packed[name].dense()
        return self._params[name]

    def __iter__(self):
        return iter([*self._params, *self._packed])

    def __len__(self) -> int:
        return len(self._params) + len(self._packed)


def float_weights(model) -> Mapping[str, torch.Tensor]:
    """Every parameter by name, and each packed projection's plain weight (a copy, made on
    access) under the name its parameter had: what exporting or quantizing a copy reads."""
    return _FloatWeights(model)


@torch.no_grad()
def unpack_projections(model) -> None:
    """Plain, frozen parameters again in place of every PackedLinear."""
    for module, attr in projection_owners(model):
        packed = module._modules.get(attr)
        if isinstance(packed, PackedLinear):
            del module._modules[attr]
            module._parameters[attr] = nn.Parameter(packed.dense(), requires_grad=False)
