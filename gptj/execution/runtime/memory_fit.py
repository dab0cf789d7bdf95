"""Will it fit? The resident bytes of a model as it will run, against the memory available.

Computed before anything loads, from the checkpoint's config.json and the safetensors headers
(no tensor is read):

- weights in their final form: plain tensors in the model dtype; quantized projections as the
  kernels hold them (int8: values + fp32 scales + the kernel's bf16 scales; int4 on CPU: the
  kernel's packed values + bf16 scales and zeros, which replace the stored copy; int4 on CUDA:
  the stored copy and the kernel's); the rotary tables;
- the KV cache: layers x 2 (keys, values) x heads * head_dim x cache-dtype bytes per token,
  for the rows and tokens asked;
- working memory: the interpreter and torch (RUNTIME_BYTES), plus the larger of the biggest
  tensor a load holds beside the model (as stored) and a prefill's activations.

Available: MemAvailable from /proc/meminfo on a CPU, free device memory on CUDA;
GPTJ_AVAILABLE_MEMORY (bytes, or with a K/M/G suffix) replaces the measured figure.
A model that cannot fit is one line naming both numbers and what would fit: callers report it
and exit 2 instead of being killed by the out-of-memory killer half way through a load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from gptj.errors import GPTJError
from gptj.execution.runtime.precision import parse_dtype
from gptj.model import ModelConfig
from gptj.model.quantized_linear import QuantSpec

RUNTIME_BYTES = 512 * 2**20  # the interpreter, torch's libraries and allocator slack
AVAILABLE_ENV = "GPTJ_AVAILABLE_MEMORY"
GIB = 2**30
_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1}


class MemoryFitError(GPTJError, ValueError):
    """The model, as asked, needs more memory than is available (one line, with the numbers)."""


@dataclass(frozen=True)
class Layout:
    """What will be resident: a model config, its dtype, quantization and device."""

    config: ModelConfig
    dtype: torch.dtype
    spec: QuantSpec | None = None
    device: str = "cpu"
    kv_dtype: torch.dtype | None = None  # None: gptj.model.kv_cache.cache_dtype's choice
    tensor_parallel: int = 1


@dataclass(frozen=True)
class Estimate:
    weights: int
    kv_cache: int
    working: int
    rows: int
    tokens: int
    prompt_tokens: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.working


def quantized_bytes(n: int, k: int, spec: QuantSpec, device: str) -> int:
    """Resident bytes of one quantized [n, k] weight once its kernel is prepared."""
    if spec.bits == 8:
        return n * k + n * 4 + n * 2  # int8 values, fp32 scales, the kernel's bf16 scales
    groups = n * (k // spec.group_size)
    kernel = n * k // 2 + groups * 2 * 2  # packed values, bf16 scales and zeros
    if device == "cpu":
        return kernel  # replaces the stored copy
    return kernel + n * k // 2 + groups * 2 * 4  # the stored values, fp32 scales and zeros


def weight_bytes(layout: Layout) -> int:
    """Every parameter and buffer of the model in its final form (see the module docstring)."""
    from gptj.model.quantized_model import quantized_hf_names
    from gptj.model.sharding import hf_shapes

    config, spec = layout.config, layout.spec
    targets = quantized_hf_names(config, spec) if spec is not None else set()
    size = torch.empty((), dtype=layout.dtype).element_size()
    total = 0
    for name, shape in hf_shapes(config).items():
        if name in targets:
            total += quantized_bytes(shape[0], shape[1], spec, layout.device)
        else:
            total += _numel(shape) * size
    rotary = 2 * config.max_positions * (config.rotary_dim // 2) * 4  # fp32 cos and sin tables
    return total + rotary


def kv_bytes_per_token(layout: Layout) -> int:
    from gptj.model.kv_cache import cache_dtype, token_bytes

    dtype = layout.kv_dtype or cache_dtype(layout.dtype, torch.device(layout.device))
    return token_bytes(layout.config.num_layers, layout.config.hidden_size, dtype)


def working_bytes(layout: Layout, rows: int, prompt_tokens: int, largest_tensor: int) -> int:
    """The runtime, plus the larger of a load's tensor in hand and a prefill's activations
    (the widest hidden state, fp32, for every prompt token of every row)."""
    activations = rows * prompt_tokens * layout.config.ffn_dim * 4
    return RUNTIME_BYTES + max(largest_tensor, activations)


def estimate(layout: Layout, rows: int = 0, tokens: int = 0, largest_tensor: int = 0,
             prompt_tokens: int | None = None) -> Estimate:
    """Resident bytes of `layout` with a KV cache of `rows` x `tokens` (0: weights only), of
    which `prompt_tokens` (default: all) are prefilled at once."""
    prompt_tokens = tokens if prompt_tokens is None else prompt_tokens
    return Estimate(weight_bytes(layout), rows * tokens * kv_bytes_per_token(layout),
                    working_bytes(layout, rows, prompt_tokens, largest_tensor), rows, tokens, prompt_tokens)


def checkpoint_tensors(directory: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (safetensors dtype, shape)} from the headers of a checkpoint's safetensors files."""
    from gptj.model.hf import read_weight_map
    from gptj.model.tensor_files import read_header

    indexed = read_weight_map(directory)
    if indexed is not None:
        files = sorted({f for f in indexed.values() if f.suffix == ".safetensors"})
    else:
        files = sorted(directory.glob("*.safetensors"))
    out = {}
    for file in files:
        with open(file, "rb") as f:
            header, _ = read_header(f)
        header.pop("__metadata__", None)
        out.update({name: (info["dtype"], tuple(info["shape"])) for name, info in header.items()})
    return out


def largest_stored_tensor(tensors: dict[str, tuple[str, tuple[int, ...]]]) -> int:
    return max((_numel(shape) * _DTYPE_BYTES.get(dtype, 4) for dtype, shape in tensors.values()), default=0)


def available_bytes(device: str | torch.device = "cpu") -> tuple[int, str] | None:
    """(bytes available, where the figure comes from), or None where it cannot be known."""
    override = os.environ.get(AVAILABLE_ENV)
    if override:
        return parse_size(override), AVAILABLE_ENV
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free memory on {device}"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "MemAvailable"
    except OSError:
        pass
    return None


def parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = units.get(value[-1:], 1)
    try:
        return int(float(value[:-1] if scale > 1 else value) * scale)
    except ValueError:
        raise MemoryFitError(f"{AVAILABLE_ENV}={text!r} is not a size (bytes, or a number with K, M or G)") from None


def gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def check_fits(layout: Layout, rows: int, tokens: int, largest_tensor: int = 0, *, what: str = "the model",
               prompt_tokens: int | None = None, rows_option: str = "--batch-size",
               offload_weights: bool = False, can_quantize: bool = True) -> Estimate:
    """The estimate when it fits what is available; otherwise MemoryFitError (see the module
    docstring). On CPU every tensor-parallel rank shares one machine's memory; on CUDA each
    rank has its own device and holds about 1/tensor_parallel of the model."""
    est = estimate(layout, rows, tokens, largest_tensor, prompt_tokens)
    found = available_bytes(layout.device)
    if found is None:
        return est
    available, source = found
    if offload_weights and layout.device != "cpu":
        return _check_offloaded(layout, est, available, source, what)
    if _need(layout, est) <= available:
        return est
    kv = f" + KV cache {gib(est.kv_cache)} for {rows} x {tokens} tokens" if rows else ""
    raise MemoryFitError(
        f"{what} does not fit: it needs {gib(_need(layout, est))} (weights {gib(est.weights)}{kv} + working "
        f"{gib(est.working)}) but {gib(available)} is available ({source}); "
        + _what_would_fit(layout, est, largest_tensor, available, rows_option, can_quantize))


def _need(layout: Layout, est: Estimate) -> int:
    t = layout.tensor_parallel
    if layout.device == "cpu":
        return est.weights + est.kv_cache + t * est.working
    return (est.weights + est.kv_cache) // t + est.working


def _what_would_fit(layout, est, largest_tensor, available, rows_option, can_quantize) -> str:
    def need(of: Layout, rows: int) -> int:
        return _need(of, estimate(of, rows, est.tokens, largest_tensor, est.prompt_tokens))

    options = []
    smallest = layout
    if can_quantize and (layout.spec is None or layout.spec.bits != 4):
        smallest = replace(layout, spec=QuantSpec(4, 128))
        if need(smallest, est.rows) <= available:
            options.append(f"--quantize int4 ({gib(need(smallest, est.rows))})")
    fewer = next((r for r in range(est.rows - 1, 0, -1) if need(layout, r) <= available), None)
    if fewer is not None:
        options.append(f"{rows_option} {fewer} ({gib(need(layout, fewer))})")
    if layout.device != "cpu":
        options.append("--offload-weights (weights in host memory, one block at a time on the device)")
    if options:
        return "would fit: " + ", ".join(options)
    least = need(smallest, min(est.rows, 1))
    if least <= available:  # int4 and fewer rows together
        rows = next(r for r in range(est.rows, 0, -1) if need(smallest, r) <= available)
        return f"would fit: --quantize int4 with {rows_option} {rows} ({gib(need(smallest, rows))})"
    how = "int4 with one row" if smallest is not layout else "one row"
    return f"nothing smaller fits: even {how} needs {gib(least)}"


def _check_offloaded(layout: Layout, est: Estimate, available: int, source: str, what: str) -> Estimate:
    """Weights in host memory; the device holds the embedding and head, two blocks and the cache."""
    host = available_bytes("cpu")
    if host is not None and est.weights + RUNTIME_BYTES > host[0]:
        raise MemoryFitError(f"{what} does not fit in host memory for --offload-weights: the weights need "
                             f"{gib(est.weights + RUNTIME_BYTES)} but {gib(host[0])} is available ({host[1]})")
    config = layout.config
    one, two = (weight_bytes(replace(layout, config=config.replace(num_layers=n))) for n in (1, 2))
    per_block = two - one
    outside = one - per_block
    device_need = outside + 2 * per_block + est.kv_cache + est.working
    if device_need > available:
        raise MemoryFitError(f"{what} with --offload-weights needs {gib(device_need)} on the device (KV cache "
                             f"{gib(est.kv_cache)}) but {gib(available)} is available ({source}); "
                             f"use a smaller batch or fewer tokens")
    return est


def check_model(name_or_path: str, *, precision: str = "auto", quantize: str | None = None, group_size: int = 128,
                device: str | torch.device = "cpu", rows: int = 0, tokens: int | None = 0, kv_cache_dtype: str = "auto",
                prompt_tokens: int | None = None, tensor_parallel: int = 1, offload_weights: bool = False,
                rows_option: str = "--batch-size") -> Estimate | None:
    """check_fits for a model as the loaders name it (a local directory, a run directory or
    `random:PRESET`); None for a Hub id that is not downloaded yet (the loader checks it then).
    `tokens` per row is capped at the model's context; None: the whole context."""
    from gptj.execution.runtime.defaults import resolve_precision
    from gptj.execution.runtime.preflight import resolve_model_source

    name = resolve_model_source(name_or_path)
    if name.startswith("random:"):
        config, checkpoint = ModelConfig.preset(name.removeprefix("random:")), None
    elif Path(name).is_dir():
        from gptj.model.hf import read_checkpoint_info

        checkpoint = read_checkpoint_info(Path(name))
        config = checkpoint.config
    else:
        return None
    dtype = parse_dtype(resolve_precision(precision, device, config))
    return check_source(name, config, checkpoint, dtype=dtype, quantize=quantize, group_size=group_size,
                        device=device, rows=rows, tokens=tokens, kv_cache_dtype=kv_cache_dtype,
                        prompt_tokens=prompt_tokens, tensor_parallel=tensor_parallel,
                        offload_weights=offload_weights, rows_option=rows_option)


def check_source(name: str, config: ModelConfig, checkpoint=None, *, dtype: torch.dtype, quantize: str | None = None,
                 group_size: int = 128, device: str | torch.device = "cpu", rows: int = 0, tokens: int | None = 0,
                 kv_cache_dtype: str = "auto", prompt_tokens: int | None = None, tensor_parallel: int = 1,
                 offload_weights: bool = False, rows_option: str = "--batch-size") -> Estimate:
    """check_fits for a model whose config is already read: `checkpoint` is its directory's
    gptj.model.hf.CheckpointInfo (None: random weights), `dtype` its resolved precision."""
    device = torch.device(device).type
    spec = QuantSpec.parse(quantize, group_size)
    kv_dtype = None if kv_cache_dtype == "auto" else parse_dtype(kv_cache_dtype)
    largest, stored = 0, False
    if checkpoint is not None:
        largest = largest_stored_tensor(checkpoint_tensors(checkpoint.directory))
        stored = checkpoint.quantization is not None
        spec = checkpoint.quantization or spec
    tokens = config.max_positions if tokens is None else min(tokens, config.max_positions)
    layout = Layout(config, dtype, spec, device, kv_dtype, tensor_parallel)
    return check_fits(layout, rows, tokens, largest, what=name, prompt_tokens=prompt_tokens, rows_option=rows_option,
                      offload_weights=offload_weights, can_quantize=not stored)
