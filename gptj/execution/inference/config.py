"""The inference preset (gptj/config/inference.yml) as dataclasses, validated by config.presets.build."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from gptj.execution.inference.sampling import SamplingParams
from gptj.execution.runtime.precision import DEVICE_CHOICES, PRECISION_CHOICES
from gptj.model.quantized_linear import DEFAULT_GROUP_SIZE, GROUP_SIZES, GROUP_SIZES_TEXT, QUANTIZE_MODES


@dataclass
class ModelSection:
    # An HF directory / Hub id, or a run_finetuning.py output dir (its hf/ export is used).
    # None: a random-init model of shape `preset`, seeded by `init_seed`.
    name_or_path: str | None = None
    preset: str = "tiny"  # gptj.ModelConfig.preset name, for random init only
    init_seed: int = 0
    # Tokenizer spec for data.load_tokenizer; None = the model directory's own tokenizer.
    tokenizer: str | None = None
    adapter: str | None = None  # a PEFT LoRA adapter directory for this base (merged into plain weights at load)
    # Named PEFT adapter directories served together over the unmerged base (gptj/model/multi_lora.py);
    # a request's `model` chooses one.
    adapters: dict[str, str] = field(default_factory=dict)
    # auto: bf16 where the hardware runs it natively (not for tiny models), else fp32
    # (gptj/execution/runtime/defaults.py); an explicit dtype without native kernels warns once and runs.
    precision: Literal[PRECISION_CHOICES] = "auto"
    device: Literal[DEVICE_CHOICES] = "auto"
    tensor_parallel: int = 1
    offload_weights: bool = False  # keep block weights in host memory, stream them per block
    compile: bool = False  # torch.compile the decode step (CUDA graphs on GPU)
    # KV cache dtype. auto: the model's, except fp32 for bf16/fp16 models on CPUs without AMX
    # (faster attention there, twice the memory: gptj/model/kv_cache.py); or fp32 / bf16 / fp16.
    kv_cache_dtype: Literal[PRECISION_CHOICES] = "auto"
    # CPU threads for torch. auto: 1 for tiny models (each op is too small to split), else the
    # physical cores shared among this machine's processes; 0: torch's default.
    threads: int | Literal["auto"] = "auto"

    # Weight-only quantization of the projections while loading: int8 (per output channel) or
    # int4 (groups of `group_size` input columns, one of GROUP_SIZES). None: the model dtype.
    quantize: Literal[QUANTIZE_MODES] | None = None
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self):
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"model.group_size must be {GROUP_SIZES_TEXT}, "
                             f"got {self.group_size}")
        if self.quantize is not None and self.offload_weights:
            raise ValueError("model.quantize and model.offload_weights cannot be combined: quantized "
                             "weights stay on the device")
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
class ChatTemplate:
    """Plain-text rendering of chat messages (GPT-J has no chat format of its own).

    Each message becomes its role's pattern with `{content}` replaced; the prompt ends with
    `generation_prompt`, and `stop` strings end the assistant's turn.
    """

    system: str = "{content}\n\n"
    user: str = "User: {content}\n"
    assistant: str = "Assistant: {content}\n"
    generation_prompt: str = "Assistant:"
    stop: list[str] = field(default_factory=lambda: ["\nUser:"])


@dataclass
class ServerSection:
    """run_server.py settings; sampling defaults come from the generation section."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 16  # rows of KV cache: requests decoded together
    max_queue: int = 256  # requests waiting for a row beyond this get 429
    max_model_len: int | None = None  # KV cache length per row; None = the model's context
    max_n: int = 8  # most choices per request
    # Prefill batches are padded to a multiple of this many tokens: a few shapes instead of one
    # per prompt length, so per-shape kernel caches (CPU bf16) stop growing.
    prefill_multiple: int = 16
    # The KV cache grows as rows fill up to this fraction of the memory left after the weights.
    memory_utilization: float = 0.9
    request_timeout: float = 600.0  # seconds from arrival to the last token
    api_key: str | None = None
    served_model_name: str | None = None  # default: the model name or path
    # LoRA adapters held at once, those loaded at run time (POST /v1/load_lora_adapter) included;
    # None: as many as model.adapters names.
    max_adapters: int | None = None
    # Keep the KV of full prompt blocks (prefix_block_size tokens each) and reuse it for prompts
    # that start the same way, within the KV cache budget (gptj/execution/inference/prefix_cache.py).
    prefix_cache: bool = True
    prefix_block_size: int = 16
    chat_template: ChatTemplate = field(default_factory=ChatTemplate)

    def __post_init__(self):
        for name in ("max_batch_size", "max_n", "prefill_multiple", "prefix_block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"server.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"server.max_queue must be >= 0, got {self.max_queue}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"server.port must be in [0, 65535], got {self.port}")
        if self.request_timeout <= 0:
            raise ValueError(f"server.request_timeout must be > 0, got {self.request_timeout}")
        if not 0 < self.memory_utilization <= 1:
            raise ValueError(f"server.memory_utilization must be in (0, 1], got {self.memory_utilization}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"server.max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_adapters is not None and self.max_adapters < 0:
            raise ValueError(f"server.max_adapters must be >= 0, got {self.max_adapters}")


@dataclass
class InferenceConfig:
    model: ModelSection = field(default_factory=ModelSection)
    generation: GenerationSection = field(default_factory=GenerationSection)
    server: ServerSection = field(default_factory=ServerSection)
    prompts: list[str] = field(default_factory=lambda: ["mnli hypothesis: a cat sleeps premise: the cat is asleep target:"])
    output: str | None = None  # JSONL file

    def __post_init__(self):
        limit, named = self.server.max_adapters, len(self.model.adapters)
        if limit is not None and named > limit:
            raise ValueError(f"server.max_adapters is {limit} but {named} adapters are named to serve "
                             f"(--adapter NAME=DIR): raise --max-adapters or name fewer")
