"""Building a GPT-J whose projections are quantized (see quantized_linear.py), one tensor at a time.

The model is first created on the meta device (no memory), then each parameter is produced by
`value_of(name)` (this rank's shard, read from a checkpoint or taken from a model in memory) and
either quantized on the spot (in blocks of rows, so the fp32 temporaries stay small) or kept as
is. So at most one full-precision tensor (the largest shard: a block's fused input projection or
lm_head) is in memory beside the quantized model. With `kernels=True` (inference) each layer's
CPU kernel layout is built as soon as the layer is, and on CPU int4 it replaces the stored copy:
the model is complete, at its final size, when loading ends.

Quantized: every block's fused q/k/v/fc_in, out_proj and fc_out, and lm_head unless
`QuantSpec.quantize_head` is False. The embedding is a lookup (one row per token), layer norms
and biases are tiny: they stay in the model dtype.

w8a8 layers hold the same int8 weight as int8 (and are stored alike); they also quantize their
input per token on CPU (QuantizedLinear).

Checkpoints keep the Hugging Face names; a quantized HF tensor `X.weight` is stored as
`X.weight.qweight`, `X.weight.scales` (and `X.weight.zeros` for int4), quantized per HF tensor.
Quantization is per output row (and per input group of `group_size` for int4), so a
tensor-parallel shard of a quantized tensor is the quantized shard, provided int4 groups do not
straddle a shard boundary: `check_layout` demands each rank's input width be a multiple of the
group size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .config import ModelConfig
from .layers import RotaryTables
from .model import GPTJ
from .packed_linear import float_weights
from .parallel import ParallelContext
from .quantized_linear import QuantizationError, QuantizedLinear, QuantSpec
from .sharding import SliceReader, hf_shapes, read_local_shard, shard_rules

BLOCK_PROJECTIONS = ("in_proj_weight", "attn.out_proj_weight", "mlp.fc_out_weight")
# Rows of a float weight quantized at a time (bounds the fp32 temporaries to ~100 MB at 6B).
QUANTIZE_ROWS = 2048


def quantized_names(config: ModelConfig, spec: QuantSpec) -> list[str]:
    """Parameter names (this project's) whose weights are quantized."""
    names = [f"blocks.{i}.{p}" for i in range(config.num_layers) for p in BLOCK_PROJECTIONS]
    return [*names, "lm_head.weight"] if spec.quantize_head else names


def quantized_hf_names(config: ModelConfig, spec: QuantSpec) -> set[str]:
    rules = shard_rules(config)
    return {hf for name in quantized_names(config, spec) for hf in rules[name].hf_names}


def components(spec: QuantSpec) -> tuple[str, ...]:
    return ("qweight", "scales") if spec.bits == 8 else ("qweight", "scales", "zeros")


def component_shape(shape: tuple[int, int], part: str, spec: QuantSpec) -> tuple[int, ...]:
    """Stored shape of one component of a quantized [N, K] weight."""
    n, k = shape
    if spec.bits == 8:
        return (n, k) if part == "qweight" else (n,)
    return (n, k // 2) if part == "qweight" else (n, k // spec.group_size)


def quantized_hf_shapes(config: ModelConfig, spec: QuantSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor a quantized checkpoint holds, with its shape."""
    targets = quantized_hf_names(config, spec)
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in hf_shapes(config).items():
        if name in targets:
            out.update({f"{name}.{part}": component_shape(shape, part, spec) for part in components(spec)})
        else:
            out[name] = shape
    return out


def check_layout(config: ModelConfig, ctx: ParallelContext, spec: QuantSpec) -> None:
    """int4 groups must tile each rank's input columns: raise QuantizationError naming the tensor."""
    if spec.bits != 4:
        return
    t, g = ctx.tensor_parallel, spec.group_size
    widths = {
        "q/k/v/fc_in (input width d)": config.hidden_size,
        f"out_proj (input width d / tensor_parallel = {config.hidden_size} / {t})": config.hidden_size // t,
        f"fc_out (input width ffn / tensor_parallel = {config.ffn_dim} / {t})": config.ffn_dim // t,
    }
    for what, width in widths.items():
        if width % g:
            raise QuantizationError(
                f"int4 group size {g} does not divide the input width {width} of {what}: groups "
                f"must tile each rank's input columns (none may straddle a shard boundary); use a "
                f"group size that divides {width}"
            )


def quantize_weight(weight: torch.Tensor, spec: QuantSpec) -> QuantizedLinear:
    """QuantizedLinear.from_weight in blocks of QUANTIZE_ROWS rows (quantization is per row, so
    the result is the same), so that its fp32 temporaries stay small beside a 6B model."""
    if weight.shape[0] <= QUANTIZE_ROWS:
        return QuantizedLinear.from_weight(weight, spec.bits, spec.group_size, int8_activations=spec.int8_activations)
    parts: dict[str, torch.Tensor] = {}
    for start in range(0, weight.shape[0], QUANTIZE_ROWS):
        block = QuantizedLinear.from_weight(weight[start : start + QUANTIZE_ROWS], spec.bits, spec.group_size)
        for part in components(spec):
            value = getattr(block, part)
            if part not in parts:
                parts[part] = value.new_empty((weight.shape[0], *value.shape[1:]))
            parts[part][start : start + value.shape[0]] = value
    return stored_layer(spec, parts)


def stored_layer(spec: QuantSpec, parts: dict[str, torch.Tensor]) -> QuantizedLinear:
    """A layer of `spec` from its stored components (w8a8: the int8 weight, activations too)."""
    return QuantizedLinear(spec.bits, parts["qweight"], parts["scales"], parts.get("zeros"), spec.group_size,
                           int8_activations=spec.int8_activations)


def quantize_hf_tensor(name: str, tensor: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """The stored components of one quantized HF weight (see the module docstring)."""
    q = quantize_weight(tensor, spec)
    return {f"{name}.{part}": getattr(q, part) for part in components(spec)}


def quantized_component_reader(read: SliceReader, spec: QuantSpec, part: str) -> SliceReader:
    """A slice reader of component `part`, addressed in the units of the original weight.

    Slices along the output rows (dim 0) are the same rows; slices along the input columns
    (dim 1) shrink by 2 for packed int4 values and by the group size for int4 scales/zeros;
    int8 scales have one value per row and are not split by columns.
    """

    def reader(hf_name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        name = f"{hf_name}.{part}"
        if dim != 1:
            return read(name, dim, start, stop)
        if spec.bits == 8:
            return read(name, None, 0, 0) if part == "scales" else read(name, 1, start, stop)
        ratio = 2 if part == "qweight" else spec.group_size
        return read(name, 1, start // ratio, stop // ratio)

    return reader


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return model.get_submodule(path), attr


def build_quantized(
    config: ModelConfig,
    ctx: ParallelContext | None,
    dtype: torch.dtype,
    device: torch.device | str | None,
    spec: QuantSpec,
    value_of: Callable[[str], torch.Tensor | QuantizedLinear],
    kernels: bool = False,
) -> GPTJ:
    """A GPTJ (eval mode, no gradients) whose projections are QuantizedLinear modules.

    `value_of(name)` gives this rank's value of parameter `name`: a float tensor (quantized
    here when `name` is a projection) or an already quantized QuantizedLinear. `kernels`: build
    each layer's kernel operands right away (inference; see the module docstring).
    """
    device = torch.device(device or "cpu")
    spec.check()
    model = GPTJ(config, ctx, dtype=dtype, device="meta")
    check_layout(config, model.ctx, spec)
    targets = set(quantized_names(config, spec))
    with torch.no_grad():
        for name in shard_rules(config):
            value = value_of(name)
            module, attr = _owner(model, name)
            expected = tuple(module._parameters[attr].shape)
            if name in targets:
                if not isinstance(value, QuantizedLinear):
                    _check_shape(name, tuple(value.shape), expected)
                    value = quantize_weight(value.to(device), spec)
                _check_shape(name, (value.out_features, value.in_features), expected)
                if kernels:
                    value.prepare_kernel()
                del module._parameters[attr]
                module.add_module(attr, value)
            else:
                _check_shape(name, tuple(value.shape), expected)
                module._parameters[attr] = nn.Parameter(value.to(device=device, dtype=dtype), requires_grad=False)
    model.rotary = RotaryTables(config.rotary_dim, config.max_positions, device=device)
    model.quantization = spec
    return model.eval()


def _check_shape(name: str, found: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if found != expected:
        raise ValueError(f"{name}: expected shape {expected}, got {found}")


def _owns_its_memory(t: torch.Tensor) -> bool:
    storage = t.untyped_storage()
    return t.storage_offset() == 0 and storage.nbytes() == t.numel() * t.element_size()


def _owning(read: SliceReader) -> SliceReader:
    """Readers may return views (of a memory-mapped file, which closes with the reader, or of a
    larger tensor, which the view would keep alive): the quantized model keeps some values as
    read, so it takes its own copy of such a slice. Tensors read into their own memory (the
    safetensors reader) are kept as they are, with no second copy."""

    def reader(name, dim, start, stop):
        value = read(name, dim, start, stop)
        return value if _owns_its_memory(value) else value.clone()

    return reader


def quantize_from_reader(
    config: ModelConfig, ctx: ParallelContext | None, dtype, device, spec: QuantSpec, read: SliceReader,
    kernels: bool = False,
) -> GPTJ:
    """Quantize while loading: each rank reads its float shards one tensor at a time."""
    ctx, read = ctx or ParallelContext.single(), _owning(read)
    return build_quantized(config, ctx, dtype, device, spec,
                           lambda name: read_local_shard(name, config, ctx, read), kernels)


def load_quantized_from_reader(
    config: ModelConfig, ctx: ParallelContext | None, dtype, device, spec: QuantSpec, read: SliceReader,
    kernels: bool = False,
) -> GPTJ:
    """A model from a quantized checkpoint (components as stored, sliced for this rank)."""
    ctx, read = ctx or ParallelContext.single(), _owning(read)
    targets = set(quantized_names(config, spec))
    device = torch.device(device or "cpu")

    def value_of(name: str):
        if name not in targets:
            return read_local_shard(name, config, ctx, read)
        parts = {
            part: read_local_shard(name, config, ctx, quantized_component_reader(read, spec, part)).to(device)
            for part in components(spec)
        }
        return stored_layer(spec, parts)

    return build_quantized(config, ctx, dtype, device, spec, value_of, kernels)


def quantized_copy(model: GPTJ, spec: QuantSpec) -> GPTJ:
    """A quantized model for evaluation that shares every unquantized tensor with `model`."""
    if model.quantization is not None:
        raise QuantizationError(f"the model is already quantized ({model.quantization.name})")
    params = float_weights(model)  # packed projections (packed_linear.py) as plain weights
    return prepare_kernels(build_quantized(
        model.config, model.ctx, model.dtype, model.device, spec, lambda name: params[name].detach()
    ))



def prepare_kernels(model: nn.Module) -> nn.Module:
    """Build every quantized layer's kernel operands now (for inference: before compiling)."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.prepare_kernel()
    return model


def force_cpu_path(model: nn.Module, path: str | None) -> nn.Module:
    """Make every quantized layer of `model` take CPU path `path` (None: the measured choice
    again), e.g. int8 x int8 for a w8a8 quality measurement that must not depend on which path
    this CPU runs fastest. See QuantizedLinear.cpu_path."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.forced_path = path
    return model


def without_kernels(model: nn.Module) -> nn.Module:
    """Make every quantized layer of `model` always dequantize + matmul (a training run's frozen
    base: no packed kernel copies of the weights are ever built)."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.use_kernels = False
    return model


@torch.no_grad()
def dequantize_model(model: GPTJ) -> GPTJ:
    """Replace every quantized projection of `model` (in place) by its dequantized weight in
    the model's dtype: the same function, as plain tensors (to merge adapters, or export)."""
    dtype = model.dtype
    for name in [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]:
        module, attr = _owner(model, name)
        weight = getattr(module, attr).dequantize(dtype)
        delattr(module, attr)
        module.register_parameter(attr, nn.Parameter(weight, requires_grad=False))
    model.quantization = None
    return model
