"""LoRA in the fine-tuning run: build the adapters on the frozen base, record which base they
belong to, and export them (a PEFT adapter directory, and the adapters merged into full weights).

With LoRA the optimizer and the checkpoints see only `LoraAdapters` (the trained module); the
base model is rebuilt from its source on every (re)start and identified by a fingerprint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gptj.execution.training.checkpoint import CheckpointLoadError
from gptj.execution.training.config import FinetuneConfig
from gptj.model import GPTJ
from gptj.model.lora import LoraAdapters, base_fingerprint


def base_source(config: FinetuneConfig) -> str:
    """Where the base weights come from, as a string recorded with the adapters."""
    m = config.model
    source = m.name_or_path or f"random:{m.preset}:init_seed={m.init_seed}"
    if m.quantize != "none":
        source += f" ({m.quantize}" + (f", group size {m.group_size})" if m.quantize == "int4" else ")")
    return source


def adapter_meta(config: FinetuneConfig, model: GPTJ, adapters: LoraAdapters) -> dict:
    s = adapters.settings
    return {"lora": {"rank": s.rank, "alpha": s.lora_alpha, "dropout": s.dropout, "targets": list(s.targets)},
            "base_model": base_source(config), "base_fingerprint": base_fingerprint(model, base_source(config))}


def check_resume(meta: dict, expected: dict | None, path: Path) -> None:
    """A checkpoint resumes only the same kind of run on the same base model."""
    saved = meta.get("adapters")
    if (saved is None) != (expected is None):
        kinds = {True: "full fine-tuning", False: "LoRA"}
        raise CheckpointLoadError(f"checkpoint {path} is from a {kinds[saved is None]} run, this run is "
                                  f"{kinds[expected is None]}")
    if expected is None:
        return
    if saved["base_fingerprint"] != expected["base_fingerprint"]:
        raise CheckpointLoadError(
            f"checkpoint {path} holds adapters for base model {saved['base_model']!r} (fingerprint "
            f"{saved['base_fingerprint']}); this run's base is {expected['base_model']!r} (fingerprint "
            f"{expected['base_fingerprint']})")
    if saved["lora"] != expected["lora"]:
        raise CheckpointLoadError(f"checkpoint {path} has LoRA settings {saved['lora']}, this run "
                                  f"{expected['lora']}")


def export(adapters: LoraAdapters, model: GPTJ, out: Path, tokenizer, base_name: str | None,
           dtype: torch.dtype | None) -> tuple[Path | None, Path | None]:
    """OUTPUT_DIR/adapter (PEFT) and OUTPUT_DIR/hf (merged); collective over the TP group.

    The merge happens in place: afterwards `model` holds W + scaling * B A and no adapters. A
    quantized base is dequantized first, so hf/ holds the weights the adapters were trained on.
    """
    from gptj.model.adapter_io import save_peft_adapter, weights_fingerprint
    from gptj.model.hf import export_hf
    from gptj.model.quantized_model import dequantize_model

    save = (lambda tmp: tokenizer.save(tmp)) if tokenizer is not None else None
    fingerprint = weights_fingerprint(model)  # of the base, before the adapters are merged in
    adapter_dir = save_peft_adapter(adapters, out / "adapter", base_name, dtype, extra=save,
                                    base_fingerprint=fingerprint)
    if model.quantization is not None:
        dequantize_model(model)
    adapters.merge_into(model)
    hf_dir = export_hf(model, out / "hf", dtype=dtype, extra=save)
    return adapter_dir, hf_dir
