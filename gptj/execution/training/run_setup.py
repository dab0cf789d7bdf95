"""What a fine-tuning run settles before its first step: the model's shape, dtype and
quantization, the checks that fail before any work, the lines that describe the run, the
model itself, and the checkpoint directory it starts from."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml

from gptj.execution.runtime import hardware
from gptj.execution.runtime.defaults import auto_choices, resolve_precision, warn_slow_precision
from gptj.execution.runtime.distributed import barrier
from gptj.execution.training import checkpoint as ckpt
from gptj.execution.training.config import FinetuneConfig, TrainConfigError
from gptj.model import ModelConfig, ParallelContext


def model_config_for(config: FinetuneConfig, tokenizer) -> ModelConfig:
    """The model shape: from the initial checkpoint, else the preset (+ shape overrides)."""
    m = config.model
    if m.name_or_path:
        from gptj.model.hf import read_model_config, resolve_checkpoint

        if m.shape:
            raise TrainConfigError("model.shape cannot change the shape of a pretrained model "
                                   f"({m.name_or_path})")
        return read_model_config(resolve_checkpoint(m.name_or_path))
    try:
        mc = ModelConfig.preset(m.preset)
        if m.match_tokenizer_vocab:
            mc = mc.replace(vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id,
                            bos_token_id=tokenizer.eos_id)
        return mc.replace(**m.shape) if m.shape else mc
    except (TypeError, ValueError) as err:
        raise TrainConfigError(f"model: {err}") from None


def base_quantization(config: FinetuneConfig):
    """The gptj.model.quantized_linear.QuantSpec of a quantized frozen base (LoRA), or None."""
    from gptj.model.quantized_linear import QuantSpec

    return QuantSpec.parse(config.model.quantize, config.model.group_size)


def eval_quantization(config: FinetuneConfig):
    """The gptj.model.quantized_linear.QuantSpec evaluation also runs the model at, or None."""
    from gptj.model.quantized_linear import QuantSpec

    return QuantSpec.parse(config.eval.quantize, config.eval.group_size)


def compute_dtype(precision: str, device: torch.device, mc: ModelConfig) -> tuple[str, torch.dtype]:
    """The precision name and dtype of the run ("auto" resolved for this device and model)."""
    from gptj.execution.runtime.precision import DTYPES

    precision = resolve_precision(precision, device, mc)
    return precision, DTYPES[precision]


def check_run(config: FinetuneConfig, mc: ModelConfig, ctx: ParallelContext, tokenizer) -> None:
    """What would fail after training (a quantization that does not fit the layout) or make it
    meaningless fails now, as a TrainConfigError (or QuantizationError) naming it."""
    from gptj.model.quantized_model import check_layout as check_quantized_layout

    quantized_eval = eval_quantization(config)
    for spec in (base_quantization(config), quantized_eval):
        if spec is not None:
            check_quantized_layout(mc, ctx, spec)
    if ctx.tensor_parallel != config.parallel.tensor_parallel:
        raise TrainConfigError(f"the parallel context has tensor_parallel {ctx.tensor_parallel}, "
                               f"the config {config.parallel.tensor_parallel}")
    if tokenizer.vocab_size > mc.vocab_size:
        raise TrainConfigError(f"tokenizer {config.data.tokenizer} has {tokenizer.vocab_size} tokens, "
                               f"the model only {mc.vocab_size}")


def run_summary(config: FinetuneConfig) -> str:
    """What is trained on what, for how long: the settings a user chose or should know."""
    t, s, d = config.training, config.schedule, config.data
    kind = "full fine-tuning"
    if config.lora.enabled:
        kind = f"LoRA rank {config.lora.rank}" + (f" on an {config.model.quantize} base"
                                                  if config.model.quantize != "none" else "")
    model = config.model.name_or_path or f"random {config.model.preset}"
    schedule = s.decay + (f", warmup {s.warmup_steps}" if s.warmup_steps else "")
    data = d.dataset or "its bundled sample"
    from gptj.execution.training.run_config import RUN_CONFIG_FILE

    return (f"run: {kind} of {model}, task {d.task} on {data}; {t.steps} steps x {t.global_batch_size} rows "
            f"x {d.sequence_length} tokens, lr {config.optimizer.lr:g} ({schedule}); full config: "
            f"{config.out_path / RUN_CONFIG_FILE} (--show-config prints it)")


def describe_run(config: FinetuneConfig, mc: ModelConfig, ctx: ParallelContext, device: torch.device,
                 precision: str) -> None:
    """The run in one line (the full resolved config with logging.show_config), machine,
    layout and model, printed by rank 0 before any work."""
    if config.logging.show_config:
        print("resolved config:\n" + yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip())
    print(run_summary(config))
    print(f"machine: {hardware.detect().summary()}" + auto_choices(
        mc, config.training.precision, precision, config.training.threads, torch.get_num_threads()))
    print(f"layout: world {ctx.world_size} = tensor_parallel {ctx.tensor_parallel} x "
          f"replicas {ctx.replicas}; device {device.type}; precision {precision} "
          f"(configured {config.training.precision}); threads {torch.get_num_threads()} "
          f"(configured {config.training.threads})")
    warn_slow_precision(precision, device)
    print(f"model: {mc.num_parameters():,} parameters ({mc.num_layers} layers, d {mc.hidden_size})")


def load_model_for(config: FinetuneConfig, mc: ModelConfig, ctx: ParallelContext,
                   device: torch.device, dtype: torch.dtype):
    """The run's model (gptj.execution.runtime.model_loading.LoadedModel): the initial weights, quantized
    while loading for a quantized LoRA base, fresh LoRA adapters attached when enabled, block
    weights streamed from the host when asked."""
    from gptj.execution.runtime.model_loading import NewAdapters, load_model

    m = config.model
    lora = NewAdapters(config.lora.settings(), config.lora.init_seed) if config.lora.enabled else None
    return load_model(m.name_or_path or mc, ctx, device=device, precision=dtype,
                      quantize=base_quantization(config), adapters=lora,
                      offload=m.stream_block_weights, trainable=True, init_seed=m.init_seed,
                      recompute_blocks=m.recompute_blocks)


def describe_adapters(mc: ModelConfig, adapters, meta: dict) -> str:
    from gptj.model.lora import adapter_parameter_count

    count = adapter_parameter_count(mc, adapters.settings)
    return (f"LoRA rank {adapters.settings.rank} on {', '.join(adapters.settings.targets)}: "
            f"{count:,} trainable parameters ({count / mc.num_parameters():.3%} of the model); "
            f"base {meta['base_model']} frozen (fingerprint {meta['base_fingerprint']})")


def check_run_dir(config: FinetuneConfig) -> list:
    """The checkpoints in the run's directory; a TrainConfigError when a fresh run would mix
    with them (checked before anything is loaded, and again by every rank before training)."""
    root = ckpt.checkpoint_root(config.out_path)
    existing = ckpt.list_checkpoints(root)
    if existing and not config.resume and not config.checkpoint.overwrite:
        raise TrainConfigError(
            f"{root} already holds checkpoints (newest: step {existing[-1][0]}); pass --resume to "
            "continue that run, another --output-dir, or --set checkpoint.overwrite=true to start over")
    return existing


def remove_if_empty(directory: Path) -> None:
    """Remove a run directory this run created when it holds no file (a run that failed before
    writing anything leaves nothing behind)."""
    if directory.is_dir() and not any(path.is_file() for path in directory.rglob("*")):
        shutil.rmtree(directory, ignore_errors=True)


def prepare_checkpoint_root(config: FinetuneConfig, root: Path, main: bool, say) -> None:
    """Refuse to mix runs; remove half-written checkpoints, and an earlier run's when starting
    over on purpose. Collective: every rank has looked before rank 0 removes anything."""
    existing = check_run_dir(config)
    barrier("checkpoint directory check")
    if main:
        for path in ckpt.remove_partial(root):
            say(f"removed an incomplete checkpoint write: {path}")
        if existing and not config.resume:
            for _, path in existing:
                shutil.rmtree(path, ignore_errors=True)
            say(f"starting over: removed {len(existing)} checkpoint(s) of an earlier run in {root}")
    barrier("checkpoint directory cleanup")


def check_resume(meta: dict, config: FinetuneConfig, mc: ModelConfig, ctx: ParallelContext,
                 path: Path, adapter_meta: dict | None) -> None:
    """A checkpoint resumes only a run of the same kind, model, layout and data."""
    from gptj.execution.training.lora_runs import check_resume as check_adapters

    check_adapters(meta, adapter_meta, path)
    saved_model = meta.get("model_config", {})
    if saved_model != mc.to_dict():
        diffs = [f"{k}: checkpoint {saved_model.get(k)!r}, this run {v!r}"
                 for k, v in mc.to_dict().items() if saved_model.get(k) != v]
        raise ckpt.CheckpointLoadError(f"checkpoint {path} holds a different model shape ({'; '.join(diffs)})")
    for key, want in (("tensor_parallel", ctx.tensor_parallel), ("replicas", ctx.replicas)):
        if meta.get(key) != want:
            raise ckpt.CheckpointLoadError(
                f"checkpoint {path} was written with {key}={meta.get(key)}, this run has {want}; "
                "resume with the same layout")
    saved_data = meta.get("config", {}).get("data", {})
    for key in ("sequence_length", "layout", "task", "dataset"):
        if saved_data.get(key) != getattr(config.data, key):
            raise ckpt.CheckpointLoadError(
                f"checkpoint {path} was trained with data.{key}={saved_data.get(key)!r}, "
                f"this run has {getattr(config.data, key)!r}")
