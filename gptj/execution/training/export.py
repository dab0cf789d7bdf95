"""A finished fine-tuning run's model in Hugging Face format: OUTPUT_DIR/hf (and, for a LoRA
run, the PEFT adapter in OUTPUT_DIR/adapter). Collective over the tensor-parallel group."""

from __future__ import annotations

from pathlib import Path

from gptj.execution.training.config import FinetuneConfig
from gptj.model import GPTJ


def export(model: GPTJ, out_dir: Path, tokenizer, export_dtype: str = "model") -> Path | None:
    """HF-format directory (config, safetensors, tokenizer); collective over the TP group."""
    from gptj.execution.runtime.precision import DTYPES
    from gptj.model.hf import export_hf

    dtype = None if export_dtype == "model" else DTYPES[export_dtype]
    return export_hf(model, out_dir, dtype=dtype, extra=lambda tmp: tokenizer.save(tmp))


def export_run(config: FinetuneConfig, model: GPTJ, adapters, out: Path, tokenizer,
               log) -> tuple[Path | None, Path | None]:
    """(adapter directory, hf directory) of the run's export; `log` gets the line naming them.
    With LoRA the adapters are merged into `model` (see gptj.execution.training.lora_runs.export)."""
    if adapters is not None:
        from gptj.execution.runtime.precision import DTYPES
        from gptj.execution.training.lora_runs import base_source
        from gptj.execution.training.lora_runs import export as export_adapters

        export_dtype = config.checkpoint.export_dtype
        adapter_dir, hf_dir = export_adapters(
            adapters, model, out, tokenizer, config.model.name_or_path or base_source(config),
            None if export_dtype == "model" else DTYPES[export_dtype])
        if adapter_dir is not None:
            log(f"exported PEFT adapter: {adapter_dir}; merged model: {hf_dir}")
        return adapter_dir, hf_dir
    hf_dir = export(model, out / "hf", tokenizer, config.checkpoint.export_dtype)
    if hf_dir is not None:
        log(f"exported Hugging Face model: {hf_dir}")
    return None, hf_dir
