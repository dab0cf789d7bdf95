"""The one inference start-up, shared by gptj-generate and gptj-serve: every step once.

    plan = plan_inference(config.model, device, prompts=..., max_new_tokens=..., rows=..., tokens=...)
    model = plan.load(ctx)        # the weights: the only slow step

`plan_inference` reads nothing but small files, so bad input is refused before any weight is
read (and before a server says it is serving):

1. the model named (a Hugging Face directory, a run_finetuning.py output directory, a Hub id,
   `random:PRESET`) is resolved, a Hub id downloaded, and its config.json read;
2. the tokenizer is loaded, and the prompts tokenized and fitted to the context;
3. "auto" precision and threads become what this machine runs best for this model;
4. the model as it will run (weights, KV cache, working memory) is checked against the memory
   there is.

`InferencePlan.load` then builds the model from what was read: config.json, the tokenizer and
the precision are not looked up again.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gptj.errors import UsageError
from gptj.execution.inference.config import ModelSection
from gptj.execution.runtime.defaults import (
    auto_choices,
    resolve_precision,
    resolve_threads,
    warn_slow_precision,
)
from gptj.execution.runtime.precision import parse_dtype
from gptj.model import ModelConfig, ParallelContext
from gptj.model.hf import CheckpointInfo


@dataclass
class InferencePlan:
    """What a start-up settled before loading; `load` builds the model it describes."""

    settings: ModelSection  # precision and threads as chosen (no "auto" left)
    name: str  # "random:PRESET", the model directory (a Hub id once downloaded)
    config: ModelConfig  # the model's shape (a random model's vocabulary is its tokenizer's)
    checkpoint: CheckpointInfo | None  # None: random weights
    tokenizer: Any  # gptj.data.Tokenizer
    device: torch.device
    dtype: torch.dtype
    auto_note: str = ""  # what "auto" chose and why, for the `machine:` line
    prompt_ids: list[list[int]] | None = None  # the prompts, tokenized and fitted to the context
    estimate: Any = None  # gptj.execution.runtime.memory_fit.Estimate (None: not known)
    loaded: Any = field(default=None, repr=False)  # gptj.execution.runtime.model_loading.LoadedModel

    @property
    def precision(self) -> str:
        return self.settings.precision

    def load(self, ctx: ParallelContext | None = None):
        """The model in eval mode (quantized, with its adapter, streamed as the settings say)."""
        from gptj.execution.runtime.model_files import model_file_errors
        from gptj.execution.runtime.model_loading import load_model
        from gptj.model.quantized_linear import QuantSpec

        m = self.settings
        source = self.checkpoint if self.checkpoint is not None else self.config
        with model_file_errors(self.name, m.adapter):  # a cut weight file: one line naming it
            loaded = load_model(source, ctx, device=self.device, precision=self.dtype,
                                quantize=QuantSpec.parse(m.quantize, m.group_size), adapters=m.adapter or None,
                                offload=m.offload_weights, init_seed=m.init_seed, tokenizer=self.tokenizer,
                                load_tokenizer=True, pack_weights=not m.compile)
        if loaded.streamer is not None:
            # Streaming hooks stay attached for the model's lifetime (it holds the streamer).
            loaded.model.weight_streamer = loaded.streamer
        self.loaded = loaded
        return loaded.model


def read_model_source(name_or_path: str, option: str = "--model") -> tuple[str, CheckpointInfo | None]:
    """(the resolved name, its checkpoint's config.json as read; None for `random:PRESET`).
    A Hub id is downloaded first; a path that holds no model is a UsageError naming it."""
    from gptj.execution.runtime.preflight import resolve_model_source
    from gptj.model.hf import read_checkpoint_info, resolve_checkpoint

    name = resolve_model_source(name_or_path, option)
    if name.startswith("random:"):
        return name, None
    directory = Path(name) if Path(name).is_dir() else resolve_checkpoint(name)
    return str(directory), read_checkpoint_info(directory)


def plan_inference(settings: ModelSection, device: torch.device, *, prompts: list[str] | None = None,
                   max_new_tokens: int = 1, truncate_prompts: bool = False, rows: int = 1,
                   tokens: int | None = None, rows_option: str = "--batch-size",
                   max_length_option: str | None = None, main: bool = True) -> InferencePlan:
    """Steps 1-4 of the module docstring, each once. `settings` is updated in place: "auto"
    precision and threads become the chosen values (torch's thread count is set here).

    rows x tokens: the KV cache to check the fit for (tokens None: the model's context; with
    prompts: the longest prompt plus max_new_tokens, prompts longer than the context refused
    or, with truncate_prompts, cut). max_length_option: the option that asked for `tokens`,
    named when it is beyond the model's context (a server's --max-model-len)."""
    from gptj.data import load_tokenizer
    from gptj.execution.inference.pipelines import fit_prompts
    from gptj.execution.runtime.memory_fit import check_source

    name, checkpoint = read_model_source(settings.name_or_path or f"random:{settings.preset}")
    tokenizer = load_tokenizer(settings.tokenizer or (checkpoint.directory if checkpoint else "bundled:tiny"))
    if checkpoint is not None:
        config = checkpoint.config
        if tokenizer.vocab_size > config.vocab_size:
            raise UsageError(f"tokenizer {settings.tokenizer or name} has {tokenizer.vocab_size} tokens but the "
                             f"model's vocabulary is {config.vocab_size}")
    else:  # a random model takes the tokenizer's vocabulary, so every id it emits decodes
        config = ModelConfig.preset(name.removeprefix("random:")).replace(
            vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id, bos_token_id=tokenizer.eos_id)
    context = config.max_positions
    if tokens is not None and max_length_option and not 1 < tokens <= context:
        raise UsageError(f"{max_length_option} {tokens}: the model's context is {context} positions "
                         f"({name}); use a value in [2, {context}]")

    prompt_ids = None
    prompt_tokens = None
    if prompts is not None:
        prompt_ids = fit_prompts(tokenizer.encode(prompts), context, max_new_tokens, truncate_prompts)
        prompt_tokens = max(len(ids) for ids in prompt_ids)
        tokens = prompt_tokens + max_new_tokens

    asked = (settings.precision, settings.threads)
    settings.precision = resolve_precision(settings.precision, device, config)
    if main:
        warn_slow_precision(settings.precision, device)
    threads = resolve_threads(settings.threads, config)
    if threads:
        torch.set_num_threads(threads)
    settings.threads = torch.get_num_threads()
    dtype = parse_dtype(settings.precision)

    estimate = check_source(name, config, checkpoint, dtype=dtype, quantize=settings.quantize,
                            group_size=settings.group_size, device=device, rows=rows, tokens=tokens,
                            kv_cache_dtype=settings.kv_cache_dtype, prompt_tokens=prompt_tokens,
                            tensor_parallel=settings.tensor_parallel, offload_weights=settings.offload_weights,
                            rows_option=rows_option)
    note = auto_choices(config, asked[0], settings.precision, asked[1], settings.threads)
    return InferencePlan(settings, name, config, checkpoint, tokenizer, torch.device(device), dtype, note,
                         prompt_ids, estimate)


def print_machine(plan: InferencePlan, file=None) -> None:
    """The `machine:` line: the hardware, and what "auto" chose for this model."""
    from gptj.execution.runtime.hardware import detect

    print(f"machine: {detect().summary()}{plan.auto_note}", file=file or sys.stdout, flush=True)
