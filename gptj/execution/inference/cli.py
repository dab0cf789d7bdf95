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


DEFAULTS_NOTE = ("option defaults shown are those of --config tiny; another preset (gptj/config/inference.yml) "
                 "may set its own, and --set SECTION.FIELD=VALUE reaches any field")


def preset_defaults(preset: str = "tiny"):
    """The config an option left out falls back to (InferenceConfig of `preset`), for --help."""
    from gptj.config import build, read_presets, resolve_preset
    from gptj.execution.inference.config import InferenceConfig

    return build(InferenceConfig, resolve_preset(read_presets(PRESET_FILE), preset, PRESET_FILE), "")


def default_text(defaults, field: str) -> str:
    """" (default: VALUE)" for the dotted config `field` of `defaults` ("" when it has none)."""
    value = defaults
    for part in field.split("."):
        value = getattr(value, part)
    if value is None or value == [] or isinstance(value, bool):
        return ""
    return f" (default: {value})"


def add_model_arguments(p: argparse.ArgumentParser, named_adapters: bool = False, defaults=None) -> None:
    """--config/--preset-file and every option of MODEL_OPTION_FIELDS and MODEL_FLAGS, in the
    groups "model", "precision and quantization" and "hardware", each help with its default.
    named_adapters: --adapter may repeat, as NAME=DIR (served by name) or one plain DIR
    (`split_adapter_options` sorts them)."""
    from gptj.config import threads_value
    from gptj.execution.runtime.precision import DEVICE_CHOICES, PRECISION_CHOICES
    from gptj.model.quantized_linear import GROUP_SIZES, GROUP_SIZES_TEXT, QUANTIZE_MODES

    defaults = defaults if defaults is not None else preset_defaults()

    def d(field: str) -> str:
        return default_text(defaults, field)

    model = p.add_argument_group("model")
    model.add_argument("--config", default="tiny", metavar="PRESET",
                       help="preset in gptj/config/inference.yml (default: tiny, a random model, offline)")
    model.add_argument("--preset-file", default=str(PRESET_FILE), metavar="FILE",
                       help="another preset YAML file (default: gptj/config/inference.yml)")
    model.add_argument("--model", metavar="HF_ID_OR_DIR",
                       help="HF directory or Hub id, or a gptj-finetune output dir (uses its hf/ export); "
                            f"default: random:{defaults.model.preset}")
    model.add_argument("--tokenizer", metavar="HF_ID_OR_DIR",
                       help="tokenizer (default: the model's own; the random model's: bundled:tiny)")
    if named_adapters:
        model.add_argument("--adapter", action="append", metavar="DIR|NAME=DIR",
                           help="DIR: a PEFT LoRA adapter merged into the base at load; NAME=DIR (repeatable): "
                                "an adapter served over the base under NAME, chosen by a request's model")
    else:
        model.add_argument("--adapter", metavar="DIR",
                           help="a PEFT LoRA adapter directory for --model (merged into plain weights at load, "
                                "kept beside quantized ones)")
    numbers = p.add_argument_group("precision and quantization")
    numbers.add_argument("--precision", choices=PRECISION_CHOICES,
                         help="auto: bf16 where the hardware runs it natively and the model is not tiny, "
                              "else fp32" + d("model.precision"))
    numbers.add_argument("--quantize", choices=QUANTIZE_MODES,
                         help="quantization while loading: int8 per channel, int4 group-wise (weight-only), "
                              "w8a8 (int8 weights and per-token int8 activations; lm_head float) "
                              "(default: none)")
    numbers.add_argument("--group-size", type=int, choices=GROUP_SIZES, metavar="N",
                         help=f"int4 group size: {GROUP_SIZES_TEXT}" + d("model.group_size"))
    numbers.add_argument("--kv-cache-dtype", choices=PRECISION_CHOICES,
                         help="KV cache dtype (auto: the model's, but fp32 for bf16/fp16 models on a CPU "
                              "whose attention is slow in bf16)" + d("model.kv_cache_dtype"))
    hardware = p.add_argument_group("hardware")
    hardware.add_argument("--device", choices=DEVICE_CHOICES, help="auto: a GPU when there is one" + d("model.device"))
    hardware.add_argument("--threads", type=threads_value, metavar="N|auto",
                          help="CPU threads for torch (auto: 1 for tiny models, else the physical cores; "
                               "0: torch's default)" + d("model.threads"))
    hardware.add_argument("--tensor-parallel", type=int, metavar="T",
                          help="tensor-parallel ranks (launch with torchrun)" + d("model.tensor_parallel"))
    hardware.add_argument("--offload-weights", action="store_true", help="stream block weights from host memory")
    hardware.add_argument("--compile", action="store_true", help="compile the decode step")


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
