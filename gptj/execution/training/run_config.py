"""A run directory keeps its resolved configuration, and `--resume` continues that run.

Every run writes OUTPUT_DIR/config.yaml once its setup has succeeded (the full resolved config,
what the run description used to print). `--resume --output-dir DIR` then builds its config
from that file, not from the preset, and applies only what its own command line sets: a resumed
run keeps its steps, schedule, task and data unless told otherwise. A setting changed on the
command line is named; one that a checkpoint cannot continue under (the data, the model, the
batch, the layout) is a TrainConfigError naming it.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from gptj.config import PresetError, apply_overrides, build
from gptj.execution.training.config import FinetuneConfig, TrainConfigError, check_values

RUN_CONFIG_FILE = "config.yaml"

# What a checkpoint's state depends on: changing one of these on --resume would continue some
# other run (the sampler's order, the weights' shape, the shards' layout).
FIXED_ON_RESUME = ("name", "model.preset", "model.name_or_path", "model.shape", "model.match_tokenizer_vocab",
                   "model.init_seed", "model.quantize", "model.group_size", "lora.", "data.task", "data.dataset", "data.tokenizer",
                   "data.sequence_length", "data.layout", "data.loss_mask", "data.keep_boundaries",
                   "training.global_batch_size", "training.seed", "parallel.tensor_parallel")
# Where the run is and how it was started, not what it is.
NOT_COMPARED = ("output_dir", "resume", "logging.show_config")


def save_run_config(config: FinetuneConfig, out: Path) -> Path:
    """Write OUTPUT_DIR/config.yaml (atomically: a resume never reads half a file)."""
    path = Path(out) / RUN_CONFIG_FILE
    partial = path.with_suffix(".yaml.partial")
    partial.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    os.replace(partial, path)
    return path


def read_run_config(out: Path) -> dict[str, Any] | None:
    """The values in OUTPUT_DIR/config.yaml; None when the directory has none (an older run)."""
    path = Path(out) / RUN_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        values = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise TrainConfigError(f"{path}: cannot read the run's config ({err})") from None
    if not isinstance(values, dict):
        raise TrainConfigError(f"{path}: expected the run's config as a mapping, found {type(values).__name__}")
    return values


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """{"section.field": value} for nested mappings (model.shape stays one value)."""
    flat = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted != "model.shape":
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def resumed_config(config: FinetuneConfig, overrides: list[str], updates: dict[str, Any]
                   ) -> tuple[FinetuneConfig, list[str]]:
    """(config, changes): for a --resume whose output directory holds config.yaml, that config
    with this command line's `overrides` (--set strings) and `updates` (options) applied, and one
    line per setting they changed. Without config.yaml: `config` as it is."""
    out = config.out_path
    saved = read_run_config(out)
    if saved is None:
        return config, []
    values = copy.deepcopy(saved)
    try:
        values = apply_overrides(values, list(overrides))
        for dotted, value in updates.items():
            node = values
            *parents, last = dotted.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
        values["output_dir"], values["resume"] = str(out), config.resume
        resumed = build(FinetuneConfig, values)
    except PresetError as err:
        raise TrainConfigError(f"{out / RUN_CONFIG_FILE}: {err}") from None
    check_values(resumed)
    before, after = flatten(saved), flatten(resumed.to_dict())
    changed = [key for key in after if key not in NOT_COMPARED and before.get(key) != after[key]]
    fixed = [key for key in changed if key.startswith(FIXED_ON_RESUME)]
    if fixed:
        key = fixed[0]
        raise TrainConfigError(
            f"{out} was trained with {key}={before.get(key)!r}; --resume cannot continue it with "
            f"{after[key]!r}. Leave that option out to continue the run, or start a new run in another --output-dir")
    return resumed, [f"resume: {key} changed from {before.get(key)!r} to {after[key]!r} on this command line"
                     for key in changed]
