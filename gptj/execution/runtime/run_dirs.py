"""What a path given as a model or a LoRA adapter stands for, fine-tuning run directories included.

A run_finetuning.py output directory holds its exports next to its checkpoints:

    RUN_DIR/hf/        the model (for a LoRA run: the base with the adapter merged), config.json
    RUN_DIR/adapter/   a LoRA run's PEFT adapter, adapter_config.json
    RUN_DIR/checkpoints/

so a run directory is accepted wherever a model directory or an adapter directory is: every
command resolves such a path here, and a path that cannot be one is an InputError naming why
(missing, a file, a run not finished yet, a full fine-tuning run given as an adapter).
"""

from __future__ import annotations

from pathlib import Path

from gptj.execution.runtime.preflight import InputError

MODEL_FILE = "config.json"
ADAPTER_FILE = "adapter_config.json"
MODEL_EXPORT, ADAPTER_EXPORT, CHECKPOINTS = "hf", "adapter", "checkpoints"


def given(option: str, path: str) -> str:
    """How a message names what was typed: "--model DIR", or "--adapter NAME=DIR" for an option
    written as "--adapter NAME=" (no space after the "=")."""
    return f"{option}{'' if option.endswith('=') else ' '}{path}"


def _existing_directory(path: str, option: str, what: str) -> Path:
    directory = Path(path).expanduser()
    if not directory.exists():
        raise InputError(f"{given(option, path)}: {what} directory does not exist")
    if not directory.is_dir():
        raise InputError(f"{given(option, path)} is a file; pass the directory that holds "
                         f"{MODEL_FILE if what == 'model' else ADAPTER_FILE}")
    return directory


def resolve_run_path(path: str, kind: str, option: str) -> str:
    """The directory `path` stands for as a `kind` ("model" or "adapter"): itself when it holds
    the kind's config file, else its export inside a fine-tuning run directory. `option` names
    the path in messages ("--adapter", or "--adapter NAME=" for a named one)."""
    marker, export = (MODEL_FILE, MODEL_EXPORT) if kind == "model" else (ADAPTER_FILE, ADAPTER_EXPORT)
    directory = _existing_directory(path, option, kind)
    if (directory / marker).is_file():
        return str(directory)
    if (directory / export / marker).is_file():
        return str(directory / export)
    if (directory / CHECKPOINTS).is_dir():
        if kind == "adapter" and (directory / MODEL_EXPORT / MODEL_FILE).is_file():
            raise InputError(f"{given(option, path)}: this run fine-tuned the whole model, it has no adapter; "
                             f"serve it as the model (--model {path})")
        raise InputError(f"{given(option, path)}: this run directory has no {export}/ export yet (it is "
                         "written when the run finishes)")
    expected = ("a Hugging Face GPT-J directory" if kind == "model" else "a PEFT adapter directory")
    raise InputError(f"{given(option, path)}: no {marker}; expected {expected} or a run_finetuning.py "
                     f"output directory (with {export}/)")


def resolve_model_dir(path: str, option: str = "--model") -> str:
    """A model directory, or a run directory's hf/ export."""
    return resolve_run_path(path, "model", option)


def resolve_adapter_dir(path: str, option: str = "--adapter") -> str:
    """A PEFT adapter directory, or a LoRA run directory's adapter/ export."""
    return resolve_run_path(path, "adapter", option)
