"""The inference preset (config/inference.yml) as dataclasses, validated by config.presets.build."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from execution.sampling import SamplingParams


@dataclass
class ModelSection:
    # An HF directory / Hub id, or a run_finetuning.py output dir (its hf/ export is used).
    # None: a random-init model of shape `preset`, seeded by `init_seed`.
    name_or_path: str | None = None
    preset: str = "tiny"  # gptj.ModelConfig.preset name, for random init only
    init_seed: int = 0
    # Tokenizer spec for data.load_tokenizer; None = the model directory's own tokenizer.
    tokenizer: str | None = None
    adapter: str | None = None  # a PEFT LoRA adapter directory for this base, merged at load
    # auto: bf16 where the hardware runs it natively (not for tiny models), else fp32
    # (execution/defaults.py); an explicit dtype without native kernels warns once and runs.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tensor_parallel: int = 1
    offload_weights: bool = False  # keep block weights in host memory, stream them per block
    compile: bool = False  # torch.compile the decode step (CUDA graphs on GPU)
    # CPU threads for torch. auto: 1 for tiny models (each op is too small to split), else the
    # physical cores shared among this machine's processes; 0: torch's default.
    threads: int | Literal["auto"] = "auto"

    def __post_init__(self):
        if self.tensor_parallel < 1:
            raise ValueError(f"model.tensor_parallel must be >= 1, got {self.tensor_parallel}")
        if self.threads != "auto" and self.threads < 0:
            raise ValueError(f"model.threads must be >= 0, got {self.threads}")


@dataclass
class GenerationSection:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    batch_size: int = 16
    truncate_prompts: bool = False  # keep the last tokens of too-long prompts instead of failing
    stream: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        SamplingParams(self.temperature, self.top_k, self.top_p)  # checked where they are used


@dataclass
class InferenceConfig:
    model: ModelSection = field(default_factory=ModelSection)
    generation: GenerationSection = field(default_factory=GenerationSection)
    prompts: list[str] = field(default_factory=lambda: ["mnli hypothesis: a cat sleeps premise: the cat is asleep target:"])
    output: str | None = None  # JSONL file
