"""LoRA adapters in and out of a PEFT adapter directory.

A PEFT adapter directory holds `adapter_config.json` (peft_type LORA, r, lora_alpha,
lora_dropout, target_modules, ...) and `adapter_model.safetensors` with tensors named
`base_model.model.transformer.h.{i}.attn.q_proj.lora_A.weight` ([r, in]) and `...lora_B.weight`
([out, r]). `peft.PeftModel.from_pretrained(GPTJForCausalLM..., DIR)` loads what `save_peft_adapter`
writes; `load_peft_adapter` reads such a directory (also one written by PEFT) shard by shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from gptj.errors import GPTJError

from .hf import replace_directory
from .json_files import read_json
from .lora import HF_MODULES, TARGETS, LoraAdapters, LoraSettings, peft_shapes
from .parallel import ParallelContext

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
PEFT_TARGET = {target: module.split(".")[1] for target, module in HF_MODULES.items()}


class AdapterError(GPTJError, ValueError):
    """An adapter directory that cannot be used with this model, in one line."""


FINGERPRINT_KEY = "base_model_fingerprint"  # in the weights file's metadata, which PEFT ignores


def weights_fingerprint(model) -> str:
    """A short hash of the base model's shape and of weights no quantization touches: the
    LayerNorms, the fc_out biases and the first 8 token embeddings (those live on TP rank 0,
    which writes and checks the fingerprint). Rounded to bf16, so one checkpoint loaded in
    fp32, bf16 or quantized gives one fingerprint; two random inits differ in the embeddings."""
    digest = hashlib.sha256(repr(sorted(model.config.to_dict().items())).encode())
    pieces = [model.embed.weight[:8]]
    pieces += [p for name, p in model.named_parameters()
               if ".lora." not in name and ("ln_" in name or name.endswith("fc_out_bias"))]
    for p in pieces:
        digest.update(p.detach().to("cpu", torch.bfloat16).view(torch.int16).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def adapter_config(settings: LoraSettings, base_model_name_or_path: str | None) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path, "revision": None,
        "r": settings.rank, "lora_alpha": settings.lora_alpha, "lora_dropout": settings.dropout,
        "target_modules": [PEFT_TARGET[t] for t in settings.targets],
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def save_peft_adapter(adapters: LoraAdapters, out_dir: str | os.PathLike, base_model_name_or_path: str | None,
                      dtype: torch.dtype | None = None, extra: Callable[[Path], None] | None = None,
                      base_fingerprint: str | None = None) -> Path | None:
    """Write the PEFT directory atomically from rank 0; collective over the TP group.
    `base_fingerprint` (weights_fingerprint of the base) lets a loader tell a wrong base."""
    from .tensor_files import save_file

    ctx = adapters.ctx
    tensors = adapters.gather_peft()  # every TP rank takes part in the gathers
    if ctx.rank != 0:
        return None
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({PREFIX + name: t.to("cpu", dtype or t.dtype).contiguous() for name, t in tensors.items()},
              str(tmp / WEIGHTS_FILE),
              metadata={"format": "pt", **({FINGERPRINT_KEY: base_fingerprint} if base_fingerprint else {})})
    config = adapter_config(adapters.settings, base_model_name_or_path)
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if extra is not None:
        extra(tmp)
    replace_directory(tmp, out_dir)
    return out_dir


def read_adapter_settings(directory: str | os.PathLike) -> LoraSettings:
    directory = Path(directory)
    file = directory / CONFIG_FILE
    if not file.is_file():
        raise AdapterError(f"{directory} is not a PEFT adapter directory: {CONFIG_FILE} is missing")
    values = read_json(file, AdapterError)
    if values.get("peft_type") != "LORA":
        raise AdapterError(f"{file}: peft_type {values.get('peft_type')!r}, expected 'LORA'")
    unsupported = {k: values.get(k) for k in ("use_dora", "use_rslora", "fan_in_fan_out")
                   if values.get(k)}
    if values.get("bias", "none") != "none":
        unsupported["bias"] = values["bias"]
    if values.get("rank_pattern") or values.get("alpha_pattern") or values.get("layers_to_transform"):
        unsupported["per-layer patterns"] = True
    if unsupported:
        raise AdapterError(f"{file}: unsupported LoRA options {unsupported}")
    by_module = {module: target for target, module in PEFT_TARGET.items()}
    modules = values.get("target_modules") or []
    if isinstance(modules, str):
        raise AdapterError(f"{file}: target_modules as a regular expression ({modules!r}) is not supported")
    unknown = [m for m in modules if m not in by_module]
    if unknown:
        raise AdapterError(f"{file}: target_modules {unknown} are not GPT-J linear layers "
                           f"(known: {', '.join(by_module)})")
    targets = tuple(t for t in TARGETS if PEFT_TARGET[t] in modules)
    return LoraSettings(rank=int(values["r"]), alpha=float(values["lora_alpha"]),
                        dropout=float(values.get("lora_dropout") or 0.0), targets=targets)


def load_peft_adapter(directory: str | os.PathLike, model, dtype: torch.dtype | None = None,
                      ctx: ParallelContext | None = None) -> LoraAdapters:
    """Adapters for `model` from a PEFT directory, each rank reading only its slices; attached
    to the model (its base weights frozen)."""
    from safetensors import safe_open

    directory = Path(directory)
    settings = read_adapter_settings(directory)
    file = directory / WEIGHTS_FILE
    if not file.is_file():
        raise AdapterError(f"{directory} has no {WEIGHTS_FILE}")
    param = next(model.parameters())
    adapters = LoraAdapters(model.config, settings, ctx or model.ctx, dtype or param.dtype, param.device)
    shapes = peft_shapes(model.config, settings)
    with safe_open(str(file), framework="pt") as handle:
        names = set(handle.keys())
        missing = [n for n in shapes if PREFIX + n not in names]
        if missing:
            raise AdapterError(f"{file} has no tensor {PREFIX + missing[0]}"
                               + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        extra = sorted(n for n in names if ".lora_" in n and n.removeprefix(PREFIX) not in shapes)
        if extra:  # e.g. trained on a deeper model: layers this one lacks
            raise AdapterError(f"{file}: tensor {extra[0]} has no place in this model "
                               f"({model.config.num_layers} layers)"
                               + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
        for name, want in shapes.items():
            found = tuple(handle.get_slice(PREFIX + name).get_shape())
            if found != want:
                raise AdapterError(f"{file}: tensor {PREFIX + name} has shape {found}, this model "
                                   f"needs {want}")

        def read(name, dim, start, stop):
            piece = handle.get_slice(PREFIX + name)
            if dim is None:
                return piece[:]
            return piece[:, start:stop] if dim == 1 else piece[start:stop]

        adapters.load_shards(read)
        recorded = (handle.metadata() or {}).get(FINGERPRINT_KEY)
    _warn_on_another_base(directory, recorded, model, ctx or model.ctx)
    return adapters.attach(model)


def _warn_on_another_base(directory: Path, recorded: str | None, model, ctx: ParallelContext) -> None:
    """Same shapes, other weights: allowed (it may be deliberate) but said once, on rank 0."""
    if recorded is None:  # written by PEFT or an older version: nothing to compare
        return
    found = weights_fingerprint(model)
    if found != recorded and ctx.rank == 0:
        try:
            base = json.loads((directory / CONFIG_FILE).read_text()).get("base_model_name_or_path")
        except (OSError, json.JSONDecodeError):
            base = None
        print(f"warning: adapter {directory} was trained on base model {base!r} (weights fingerprint "
              f"{recorded}), but the model it is loaded onto has fingerprint {found}: another base, "
              "so its output may be meaningless", file=sys.stderr, flush=True)
