"""Presets (YAML files beside this module) and the machinery that validates them."""

from .presets import (
    CONFIG_DIR,
    PresetError,
    apply_overrides,
    build,
    merge,
    read_presets,
    resolve_preset,
    threads_value,
)

__all__ = ["CONFIG_DIR", "PresetError", "apply_overrides", "build", "merge", "read_presets", "resolve_preset",
           "threads_value"]
