"""The one place a GPTJ is built: random or Hugging Face weights, quantized or not, with or
without LoRA adapters, resident or streamed from host memory, for training or for inference.

    loaded = load_model("EleutherAI/gpt-j-6b", ctx, device=device, precision="bf16",
                        quantize=QuantSpec(4, 128), adapters="runs/lora/adapter")
    loaded.model, loaded.tokenizer, loaded.dtype, loaded.quantization, loaded.source

`source` is one of:
- a gptj.ModelConfig: seeded random weights of that shape (`init_seed`);
- "random:PRESET": the same for a preset, its vocabulary taken from the tokenizer so every id
  the model emits decodes;
- a Hugging Face directory, Hub id or run_finetuning.py output directory (its hf/ export),
  or a directory's config.json as already read (gptj.model.hf.CheckpointInfo);
  a checkpoint written by `gptj-quantize` loads quantized as stored;
- a loaded GPTJ: a quantized copy of it (`quantize` required) that shares every unquantized
  tensor and the LoRA adapters with it, as evaluation's quantized pass needs.

`trainable`: the model is put in training mode, quantized layers never build kernel copies of
the frozen weights, and adapters (`NewAdapters`) are freshly initialised for training.
Otherwise it is put in eval mode, quantized kernels are built now, and a PEFT adapter
directory is merged into plain weights (kept beside quantized ones).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from gptj.errors import UsageError
from gptj.execution.runtime.defaults import resolve_precision, warn_slow_precision
from gptj.execution.runtime.precision import parse_dtype
from gptj.model import GPTJ, ModelConfig, ParallelContext
from gptj.model.hf import CheckpointInfo
from gptj.model.lora import LoraAdapters, LoraSettings
from gptj.model.quantized_linear import QuantSpec


@dataclass(frozen=True)
class NewAdapters:
    """LoRA adapters to train on a frozen base: initialised from `init_seed`, attached."""

    settings: LoraSettings
    init_seed: int = 0


@dataclass
class LoadedModel:
    """A built model and what the loader knows about it."""

    model: GPTJ
    config: ModelConfig
    dtype: torch.dtype
    quantization: QuantSpec | None  # of the weights as held (a stored quantization included)
    source: str  # "random:...", the resolved model directory or Hub id, or "copy"
    adapters: LoraAdapters | None = None  # attached adapters; None when none or merged in
    adapter_source: str | None = None  # the PEFT directory the adapters came from
    tokenizer: Any = None  # data.Tokenizer when the loader loaded one
    streamer: Any = None  # gptj.execution.runtime.offload.BlockWeightStreamer when block weights stream


def load_model(source: str | ModelConfig | GPTJ | CheckpointInfo, ctx: ParallelContext | None = None, *,
               device: torch.device | str = "cpu", precision: str | torch.dtype = "auto",
               quantize: QuantSpec | None = None, adapters: str | NewAdapters | None = None,
               offload: bool = False, trainable: bool = False, init_seed: int = 0,
               tokenizer: str | None = None, load_tokenizer: bool = False,
               recompute_blocks: bool = False, pack_weights: bool = False) -> LoadedModel:
    """Build the model of `source` (see the module docstring); raises ValueError subclasses
    naming the problem. `precision` is a dtype, or a name resolved for the device and model
    ("auto": the fastest native one; a slow choice is warned about once on the main rank).
    `offload`: block weights live on the host and stream to `device` one block ahead.
    `pack_weights`: an inference model's float projections in oneDNN's layout where that is
    faster on this CPU (gptj/model/packed_linear.py; not with `trainable` or `offload`)."""
    device = torch.device(device)
    if isinstance(source, GPTJ):
        return _quantized_copy(source, quantize)
    if quantize is not None and offload:
        raise UsageError("quantized weights are not streamed from host memory: use --quantize or "
                         "--offload-weights, not both")
    place = torch.device("cpu") if offload else device  # the streamer moves the rest
    if isinstance(source, ModelConfig) or (isinstance(source, str) and source.startswith("random:")):
        loaded = _random(source, ctx, device, place, precision, quantize, trainable, init_seed,
                         tokenizer, load_tokenizer)
    else:
        loaded = _pretrained(source, ctx, device, place, precision, quantize, trainable, offload,
                             tokenizer, load_tokenizer)
    model = loaded.model
    if trainable and model.quantization is not None:
        from gptj.model.quantized_model import without_kernels

        without_kernels(model)  # no packed kernel copies of the frozen weights
    model.recompute_blocks = recompute_blocks
    if trainable:
        model.train()
    if adapters is not None:
        _add_adapters(loaded, adapters, ctx, trainable)
    if model.quantization is not None and not trainable:
        from gptj.model.quantized_model import prepare_kernels

        prepare_kernels(model)
    if offload:
        from gptj.execution.runtime.offload import BlockWeightStreamer

        loaded.streamer = BlockWeightStreamer(model, device)
        loaded.streamer.attach()
    if not trainable:
        model.eval()
        if pack_weights and not offload:
            from gptj.model.packed_linear import pack_projections

            pack_projections(model)
    return loaded


def _dtype(precision: str | torch.dtype, device: torch.device, config: ModelConfig,
           ctx: ParallelContext | None) -> torch.dtype:
    if isinstance(precision, torch.dtype):
        return precision
    precision = resolve_precision(precision, device, config)
    if ctx is None or ctx.is_main:
        warn_slow_precision(precision, device)
    return parse_dtype(precision)


def _random(source, ctx, device, place, precision, spec, trainable, init_seed, tokenizer,
            load_tokenizer) -> LoadedModel:
    from gptj.model.model import random_reader
    from gptj.model.quantized_model import quantize_from_reader

    tok = None
    if isinstance(source, ModelConfig):
        config, name = source, "random"
        if load_tokenizer:
            tok = _tokenizer(tokenizer or "bundled:tiny")
    else:
        config, name = ModelConfig.preset(source.removeprefix("random:")), source
        tok = _tokenizer(tokenizer or "bundled:tiny")
        # The random model takes the tokenizer's vocabulary so every id it emits decodes.
        config = config.replace(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, bos_token_id=tok.eos_id)
    dtype = _dtype(precision, device, config, ctx)
    if spec is None:
        model = GPTJ(config, ctx, dtype=dtype, device=place).init_weights(seed=init_seed)
    else:  # quantized while it is built, one tensor at a time
        model = quantize_from_reader(config, ctx, dtype, place, spec, random_reader(config, init_seed),
                                     kernels=not trainable)
    return LoadedModel(model, config, dtype, model.quantization, name, tokenizer=tok)


def _pretrained(source, ctx, device, place, precision, spec, trainable, offload, tokenizer,
                load_tokenizer) -> LoadedModel:
    from gptj.execution.runtime.preflight import resolve_model_source
    from gptj.model.hf import CheckpointInfo, load_pretrained, read_checkpoint_info, resolve_checkpoint

    info = source if isinstance(source, CheckpointInfo) else \
        read_checkpoint_info(resolve_checkpoint(resolve_model_source(source, option="model")))
    directory = info.directory
    dtype = _dtype(precision, device, info.config, ctx)
    model, _ = load_pretrained(directory, ctx, dtype=dtype, device=place, quantize=spec,
                               kernels=not trainable, info=info)
    if offload and model.quantization is not None:
        raise UsageError(f"{directory} holds quantized weights, which are not streamed from host memory: "
                         "drop --offload-weights")
    tok = None
    if load_tokenizer:
        tok = _tokenizer(tokenizer or directory)
        if tok.vocab_size > model.config.vocab_size:
            raise UsageError(f"tokenizer {tokenizer or directory} has {tok.vocab_size} tokens but the "
                             f"model's vocabulary is {model.config.vocab_size}")
    return LoadedModel(model, model.config, dtype, model.quantization, str(directory), tokenizer=tok)


def _tokenizer(spec):
    """The tokenizer of `spec`: a name or directory is loaded; a loaded one is used as it is."""
    import gptj.data as data

    return data.load_tokenizer(spec) if isinstance(spec, (str, os.PathLike)) else spec


def _add_adapters(loaded: LoadedModel, adapters: str | NewAdapters, ctx, trainable: bool) -> None:
    model = loaded.model
    if isinstance(adapters, NewAdapters):
        device = model.device
        new = LoraAdapters(model.config, adapters.settings, model.ctx, loaded.dtype, device)
        new.init_weights(seed=adapters.init_seed).attach(model)  # the base weights frozen
        if trainable:
            new.train()
        loaded.adapters = new
        return
    from gptj.model.adapter_io import load_peft_adapter

    found = load_peft_adapter(adapters, model, ctx=ctx)  # attached
    loaded.adapter_source = str(adapters)
    if model.quantization is None and not trainable:
        # Merged into plain weights, generation costs exactly what the base model's does.
        found.merge_into(model)
    else:
        loaded.adapters = found


def _quantized_copy(model: GPTJ, spec: QuantSpec | None) -> LoadedModel:
    from gptj.model.quantized_model import quantized_copy

    if spec is None:
        raise UsageError("a copy of a loaded model is a quantized copy: name the quantization")
    copy = quantized_copy(model, spec)  # shares every unquantized tensor with `model`
    for plain, block in zip(model.blocks, copy.blocks):
        block.lora = plain.lora  # the same adapters (if any) over the quantized weights
    return LoadedModel(copy, copy.config, model.dtype, spec, "copy")
