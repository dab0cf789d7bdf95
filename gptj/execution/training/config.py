"""The fine-tuning configuration: nested dataclasses filled from gptj/config/finetuning.yml presets.

`load_config(preset, overrides)` reads a preset, applies `section.field=value` overrides and
builds a validated `FinetuneConfig`. `check_layout(config, world_size)` rejects values that
cannot work together (batch split, tensor-parallel split, model shape) before any work starts.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gptj.config import CONFIG_DIR, PresetError, apply_overrides, build, read_presets, resolve_preset
from gptj.errors import GPTJError
from gptj.execution.runtime.precision import PRECISION_CHOICES, PRECISIONS
from gptj.model.quantized_linear import DEFAULT_GROUP_SIZE, GROUP_SIZES, GROUP_SIZES_TEXT, QUANTIZE_MODES

PRESET_FILE = CONFIG_DIR / "finetuning.yml"
DEFAULT_PRESET = "tiny"


class TrainConfigError(GPTJError, ValueError):
    """A configuration value that cannot work, explained in one line."""


@dataclass
class ModelSection:
    preset: str = "tiny"  # ModelConfig.preset used for random init when `name_or_path` is unset
    name_or_path: str | None = None  # HF directory or Hub id: initial weights (and shape)
    shape: dict = field(default_factory=dict)  # ModelConfig fields replacing the preset's values
    match_tokenizer_vocab: bool = True  # random init: vocab_size (and eos) from the tokenizer
    init_seed: int = 0
    recompute_blocks: bool = False  # activation recomputation per block
    stream_block_weights: bool = False  # keep block weights on the host, stream them in
    # Frozen base weights quantized while loading (int8 per channel, int4 in groups of
    # `group_size` input columns), for LoRA only; see gptj/model/quantized_linear.py.
    quantize: Literal[("none", *QUANTIZE_MODES)] = "none"
    group_size: int = DEFAULT_GROUP_SIZE


@dataclass
class LoraSection:
    rank: int = 0  # 0: full fine-tuning; R > 0: LoRA adapters of rank R on the frozen base
    alpha: float | None = None  # scaling alpha / rank; None: 2 x rank
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "out_proj", "fc_in", "fc_out"])
    init_seed: int = 0  # the A factors' random init (B starts at zero)

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def settings(self):
        from gptj.model.lora import LoraSettings

        return LoraSettings(rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=tuple(self.targets))


@dataclass
class DataSection:
    task: str = "mnli"
    dataset: str | None = None  # None: the task's bundled sample
    tokenizer: str | None = "bundled:tiny"  # None: the tokenizer of model.name_or_path
    eval_datasets: list[str] = field(default_factory=list)  # "SOURCE" or "SOURCE@SPLIT"
    sequence_length: int = 32
    layout: Literal["packed", "padded"] = "padded"
    loss_mask: Literal["all", "target"] = "target"
    keep_boundaries: bool = False
    strict: bool = False  # the first bad row is an error naming file, line and reason
    cache_dir: str | None = None


@dataclass
class OptimizerSection:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    offload: bool = False  # fp32 master weights and Adam state on the host


@dataclass
class ScheduleSection:
    warmup_steps: int = 0
    decay: Literal["constant", "linear", "cosine"] = "constant"
    min_lr_ratio: float = 0.0  # the decayed lr ends at lr * min_lr_ratio


@dataclass
class LossScaleSection:
    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 1000
    min_scale: float = 1.0


@dataclass
class TrainingSection:
    steps: int = 100
    global_batch_size: int = 32
    micro_batch_size: int = 32
    seed: int = 0
    # auto: bf16 where the hardware runs it natively (a GPU with bf16; a CPU with AMX-BF16 or
    # AVX512-BF16, for models that are not tiny), else fp32 (gptj/execution/runtime/defaults.py)
    precision: Literal[PRECISION_CHOICES] = "auto"
    loss_scale: LossScaleSection = field(default_factory=LossScaleSection)
    max_bad_steps: int = 5  # this many non-finite steps in a row stop the run
    # CPU threads per process. auto: 1 for tiny models, else the physical cores shared among
    # this machine's processes; null or 0: torch's default.
    threads: int | Literal["auto"] | None = "auto"


@dataclass
class ParallelSection:
    tensor_parallel: int = 1
    # Longest wait of any collective for the other ranks; a rank that hangs longer ends the job.
    # Generous: rank 0 alone prepares the data (first run: download + tokenize) while others wait.
    timeout_s: float = 1800.0


@dataclass
class CheckpointSection:
    every: int = 0  # steps between checkpoints; 0: only at the end
    keep: int = 2  # newest checkpoints kept
    overwrite: bool = False  # a fresh run may delete the checkpoints of an earlier run in its dir
    at_end: bool = True
    export_hf: bool = True  # write OUTPUT_DIR/hf at the end
    export_dtype: Literal[("model", *PRECISIONS)] = "model"
    on_error: Literal["stop", "continue"] = "stop"  # a failed write (disk full, ...): stop or go on


@dataclass
class EvalSection:
    every: int = 0  # steps between evaluations during training; 0: only at the end
    at_end: bool = True
    batch_size: int = 64
    max_examples: int | None = None  # per split (None: all)
    generate: bool = True  # accuracy by greedy generation of the label
    likelihood: bool = True  # accuracy by the most likely label
    max_new_tokens: int | None = None  # None: the longest label + 2
    # Also evaluate a weight-only quantized copy of the model ("int8", or "int4" with groups of
    # `group_size`); its results are reported under "SPLIT@int8" / "SPLIT@int4".
    quantize: Literal[QUANTIZE_MODES] | None = None
    group_size: int = DEFAULT_GROUP_SIZE


@dataclass
class LoggingSection:
    progress: bool = True
    tensorboard: bool = True  # when the tensorboard package is installed
    show_config: bool = False  # print the full resolved config at the start (it is always in OUTPUT_DIR/config.yaml)
    peak_flops_per_device: float | None = None  # for MFU; None: a table of known devices


@dataclass
class FinetuneConfig:
    name: str = DEFAULT_PRESET
    output_dir: str | None = None  # None: runs/<name>
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    # true: continue from the newest valid checkpoint; auto: the same, and start fresh when the
    # output directory holds none (for runs restarted by torchrun --max-restarts)
    resume: bool | Literal["auto"] = False

    @property
    def out_path(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(preset: str = DEFAULT_PRESET, overrides: list[str] | None = None,
                updates: dict[str, Any] | None = None,
                preset_file: str | Path = PRESET_FILE) -> FinetuneConfig:
    """Preset `preset` of `preset_file`, then `section.field=value` override strings, then
    `updates` ({"section.field": typed value}, e.g. from command-line options)."""
    presets = read_presets(preset_file)
    values = resolve_preset(presets, preset, str(preset_file))
    values.setdefault("name", preset)
    preset_config = build(FinetuneConfig, values)
    values = apply_overrides(values, list(overrides or []))
    if overrides:
        check_values(build(FinetuneConfig, values))  # a bad --set value fails even if an option replaces it
    for dotted, value in (updates or {}).items():
        node = values
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    config = build(FinetuneConfig, values)
    check_values(config)
    if config.output_dir is None:  # named, so the printed config shows where the run writes
        config.output_dir = default_output_dir(config, preset_config) or f"runs/{config.name}"
    return config


def default_output_dir(config: FinetuneConfig, preset: FinetuneConfig) -> str | None:
    """runs/PRESET for the preset's own task, data and kind of training; another task or data
    set, or LoRA / a quantized base where the preset has none, gets its own directory
    (runs/PRESET-TASK-DATASET, runs/tiny-lora8, runs/tiny-lora8-int4), so it never meets the
    checkpoints of the preset's own run."""
    parts, preset_data = [], preset.data
    if config.data.task != preset_data.task:
        parts.append(Path(config.data.task).stem)
    if config.data.dataset != preset_data.dataset and config.data.dataset:
        parts.append(Path(config.data.dataset.rstrip("/").split(":")[-1]).stem)
    if (config.lora.rank, config.model.quantize) != (preset.lora.rank, preset.model.quantize):
        parts.append(f"lora{config.lora.rank}" if config.lora.rank else "full")
        if config.model.quantize != "none":
            parts.append(config.model.quantize)
    if not parts:
        return None
    slug = "-".join(dict.fromkeys(re.sub(r"[^A-Za-z0-9_.]+", "_", p) for p in parts))
    return f"runs/{config.name}-{slug}"


def from_dict(values: dict[str, Any]) -> FinetuneConfig:
    config = build(FinetuneConfig, values)
    check_values(config)
    return config


def check_values(config: FinetuneConfig) -> None:
    """Value checks that need no world size and no model shape."""
    t, o, s = config.training, config.optimizer, config.schedule
    positive = {"training.steps": t.steps, "training.global_batch_size": t.global_batch_size,
                "training.micro_batch_size": t.micro_batch_size,
                "data.sequence_length": config.data.sequence_length,
                "parallel.tensor_parallel": config.parallel.tensor_parallel,
                "eval.batch_size": config.eval.batch_size, "checkpoint.keep": config.checkpoint.keep,
                "training.max_bad_steps": t.max_bad_steps}
    for name, value in positive.items():
        if value < 1:
            raise TrainConfigError(f"{name} must be >= 1, got {value}")
    for name, value in {"checkpoint.every": config.checkpoint.every, "eval.every": config.eval.every,
                        "schedule.warmup_steps": s.warmup_steps}.items():
        if value < 0:
            raise TrainConfigError(f"{name} must be >= 0, got {value}")
    if not config.parallel.timeout_s > 0:
        raise TrainConfigError(f"parallel.timeout_s must be positive, got {config.parallel.timeout_s}")
    if o.lr <= 0:
        raise TrainConfigError(f"optimizer.lr must be positive, got {o.lr}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise TrainConfigError(f"optimizer.betas must be two numbers in [0, 1), got {o.betas}")
    if not 0 <= s.min_lr_ratio <= 1:
        raise TrainConfigError(f"schedule.min_lr_ratio must be in [0, 1], got {s.min_lr_ratio}")
    if isinstance(t.threads, int) and t.threads < 0:
        raise TrainConfigError(f"training.threads must be >= 0 or auto, got {t.threads}")
    if t.global_batch_size % t.micro_batch_size:
        raise TrainConfigError(
            f"training.global_batch_size {t.global_batch_size} is not divisible by "
            f"training.micro_batch_size {t.micro_batch_size}")
    if config.model.stream_block_weights and not config.optimizer.offload:
        raise TrainConfigError("model.stream_block_weights needs optimizer.offload: true (the "
                               "streamed blocks' gradients are kept on the host)")
    if config.eval.group_size not in GROUP_SIZES:
        raise TrainConfigError(f"eval.group_size must be {GROUP_SIZES_TEXT}, "
                               f"got {config.eval.group_size}")
    check_lora(config)
    if config.model.name_or_path is None and config.data.tokenizer is None:
        raise TrainConfigError("data.tokenizer is required when model.name_or_path is not set")
    if config.model.shape:
        from gptj.model import ModelConfig

        # Typed like every other field: unknown keys list the valid ones, "abc" is no integer.
        shape = build(ModelConfig, config.model.shape, "model.shape")
        config.model.shape = {name: getattr(shape, name) for name in config.model.shape}


def check_lora(config: FinetuneConfig) -> None:
    """LoRA settings, and the combinations LoRA does not support."""
    lora = config.lora
    if lora.rank < 0:
        raise TrainConfigError(f"lora.rank must be >= 0 (0: full fine-tuning), got {lora.rank}")
    if not lora.enabled:
        if config.model.quantize != "none":
            raise TrainConfigError(f"model.quantize {config.model.quantize} needs LoRA (--lora-rank R): "
                                   "quantized base weights are frozen")
        return
    from gptj.model.lora import LoraConfigError

    try:
        lora.settings()
    except LoraConfigError as err:
        raise TrainConfigError(str(err)) from None
    if config.model.group_size not in GROUP_SIZES:
        raise TrainConfigError(f"model.group_size must be {GROUP_SIZES_TEXT}, "
                               f"got {config.model.group_size}")
    if config.eval.quantize and config.model.quantize != "none":
        raise TrainConfigError(f"eval.quantize {config.eval.quantize} with model.quantize {config.model.quantize}: "
                               "the quantized base is already what evaluation sees")
    if config.model.stream_block_weights:
        raise TrainConfigError("model.stream_block_weights does not apply to LoRA: the frozen base has "
                               "no gradients to stream, and the adapters' state is small")


def check_layout(config: FinetuneConfig, world_size: int, model_config=None) -> int:
    """Check the parallel layout against the world size (and the model shape, when given);
    return the number of replicas."""
    tp = config.parallel.tensor_parallel
    if world_size % tp:
        hint = f" (launch with torchrun --nproc-per-node {tp} or a multiple)" if world_size == 1 else ""
        raise TrainConfigError(
            f"world size {world_size} is not divisible by parallel.tensor_parallel {tp}{hint}")
    replicas = world_size // tp
    t = config.training
    per_step = t.micro_batch_size * replicas
    if t.global_batch_size % per_step:
        raise TrainConfigError(
            f"training.global_batch_size {t.global_batch_size} is not divisible by "
            f"micro_batch_size {t.micro_batch_size} x replicas {replicas} = {per_step}")
    if model_config is None:
        return replicas
    if model_config.num_heads % tp:
        raise TrainConfigError(
            f"parallel.tensor_parallel {tp} does not divide the model's {model_config.num_heads} "
            "attention heads")
    if config.data.sequence_length > model_config.max_positions:
        raise TrainConfigError(
            f"data.sequence_length {config.data.sequence_length} exceeds the model's "
            f"max_positions {model_config.max_positions}")
    try:
        model_config.validate(tp)
    except ValueError as err:
        raise TrainConfigError(str(err)) from None
    return replicas


__all__ = ["FinetuneConfig", "PresetError", "TrainConfigError", "check_layout", "load_config",
           "from_dict", "DEFAULT_PRESET", "PRESET_FILE"]
