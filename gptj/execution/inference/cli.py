"""Command-line options shared by run_inference.py and run_server.py: which model, on what
hardware, in which precision (the `model:` section of gptj/config/inference.yml)."""

from __future__ import annotations

import argparse
from pathlib import Path

from gptj.errors import UsageError

__all__ = ["UsageError", "add_model_arguments", "apply_model_options", "split_adapter_options"]


PRESET_FILE = Path(__file__).resolve().parents[2] / "config" / "inference.yml"

# Command-line option -> config field.
MODEL_OPTION_FIELDS = {
    "model": "model.name_or_path",
    "tokenizer": "model.tokenizer",
    "adapter": "model.adapter",
    "precision": "model.precision",
    "quantize": "model.quantize",
    "group_size": "model.group_size",
    "device": "model.device",
    "tensor_parallel": "model.tensor_parallel",
    "threads": "model.threads",
    "kv_cache_dtype": "model.kv_cache_dtype",
}
MODEL_FLAGS = ("offload_weights", "compile")  # store_true options of the model section


def add_model_arguments(p: argparse.ArgumentParser, named_adapters: bool = False) -> None:
    """--config/--preset-file and every option of MODEL_OPTION_FIELDS and MODEL_FLAGS.
    named_adapters: --adapter may repeat, as NAME=DIR (served by name) or one plain DIR
    (`split_adapter_options` sorts them)."""
    from gptj.config import threads_value
    from gptj.execution.runtime.precision import DEVICE_CHOICES, PRECISION_CHOICES
    from gptj.model.quantized_linear import DEFAULT_GROUP_SIZE, GROUP_SIZES, QUANTIZE_MODES

    p.add_argument("--config", default="tiny", metavar="PRESET", help="preset in gptj/config/inference.yml (default: tiny)")
    p.add_argument("--preset-file", default=str(PRESET_FILE), help="another preset YAML file")
    p.add_argument("--model", metavar="HF_ID_OR_DIR",
                   help="HF directory or Hub id, or a run_finetuning.py output dir (uses its hf/ export)")
    p.add_argument("--tokenizer", metavar="HF_ID_OR_DIR", help="tokenizer (default: the model's own)")
    if named_adapters:
        p.add_argument("--adapter", action="append", metavar="DIR|NAME=DIR",
                       help="DIR: a PEFT LoRA adapter merged into the base at load; NAME=DIR (repeatable): "
                            "an adapter served over the base under NAME, chosen by a request's model")
    else:
        p.add_argument("--adapter", metavar="DIR",
                       help="a PEFT LoRA adapter directory for --model (merged into plain weights at load, "
                            "kept beside quantized ones)")
    p.add_argument("--precision", choices=PRECISION_CHOICES,
                   help="auto (default): bf16 where the hardware runs it natively and the model is "
                        "not tiny, else fp32")
    p.add_argument("--quantize", choices=QUANTIZE_MODES,
                   help="weight-only quantization while loading (int8 per channel, int4 group-wise)")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, metavar="N",
                   help=f"int4 group size: one of {', '.join(map(str, GROUP_SIZES))} (default {DEFAULT_GROUP_SIZE})")
    p.add_argument("--tensor-parallel", type=int, metavar="T", help="tensor-parallel ranks (launch with torchrun)")
    p.add_argument("--device", choices=DEVICE_CHOICES)
    p.add_argument("--threads", type=threads_value, metavar="N|auto",
                   help="CPU threads for torch (auto, the default: 1 for tiny models, else the "
                        "physical cores; 0: torch's default)")
    p.add_argument("--kv-cache-dtype", choices=PRECISION_CHOICES,
                   help="KV cache dtype (auto: the model's, but fp32 for bf16/fp16 models on CPU, "
                        "where attention over it is 4-7x faster, at twice the memory)")
    p.add_argument("--offload-weights", action="store_true", help="stream block weights from host memory")
    p.add_argument("--compile", action="store_true", help="compile the decode step")


def split_adapter_options(settings: dict, args: argparse.Namespace) -> None:
    """A repeated --adapter: NAME=DIR entries go to model.adapters; a plain DIR stays --adapter."""
    values = args.adapter or []
    plain = [v for v in values if "=" not in v]
    if len(plain) > 1:
        raise UsageError(f"--adapter DIR was given {len(plain)} times ({', '.join(plain)}): "
                         "name each adapter to serve several, --adapter NAME=DIR")
    args.adapter = plain[0] if plain else None
    named = settings.setdefault("model", {}).setdefault("adapters", {})
    for value in values:
        if "=" in value:
            name, _, directory = value.partition("=")
            if not name or not directory:
                raise UsageError(f"--adapter {value!r}: expected NAME=DIR")
            named[name] = directory


def apply_model_options(settings: dict, args: argparse.Namespace) -> dict:
    """Write the model options that were given into preset `settings` (in place)."""
    model = settings.setdefault("model", {})
    for option, field in MODEL_OPTION_FIELDS.items():
        value = getattr(args, option)
        if value is not None:
            model[field.removeprefix("model.")] = value
    if args.model is not None and args.tokenizer is None:
        model["tokenizer"] = None  # a model brings its own tokenizer
    for flag in MODEL_FLAGS:
        if getattr(args, flag):
            model[flag] = True
    return settings
