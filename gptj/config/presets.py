"""YAML presets turned into validated dataclasses, with `section.field=value` overrides.

A preset file maps preset names to nested dicts. A preset may start from another with
`base: NAME`. Unknown fields are rejected with the list of known ones, so a typo never
silently does nothing.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from gptj.errors import GPTJError

CONFIG_DIR = Path(__file__).resolve().parent
T = TypeVar("T")


class PresetError(GPTJError, ValueError):
    """A preset or override that cannot be used, explained in words."""


def read_presets(path: str | Path) -> dict[str, dict[str, Any]]:
    path = Path(path)
    try:
        presets = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PresetError(f"preset file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise PresetError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(presets, dict) or not all(isinstance(v, dict) for v in presets.values()):
        raise PresetError(f"{path} must map preset names to settings")
    return presets


def resolve_preset(presets: dict[str, dict[str, Any]], name: str, source: str = "presets") -> dict[str, Any]:
    """The settings of preset `name`, with its `base:` chain merged underneath."""
    chain, current = [], name
    while current is not None:
        if current not in presets:
            known = ", ".join(sorted(presets))
            raise PresetError(f"unknown preset {current!r} in {source}; known presets: {known}")
        if current in chain:
            raise PresetError(f"preset {name!r} in {source} has a base cycle: {' -> '.join(chain + [current])}")
        chain.append(current)
        current = presets[current].get("base")
    merged: dict[str, Any] = {}
    for preset in reversed(chain):
        merged = merge(merged, {k: v for k, v in presets[preset].items() if k != "base"})
    return merged


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: nested dicts merge, everything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(settings: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings; values are parsed as YAML (numbers, booleans, lists, null)."""
    out = copy.deepcopy(settings)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise PresetError(f"override {item!r} must look like section.field=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise PresetError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return out


def build(cls: type[T], values: dict[str, Any] | None, where: str = "") -> T:
    """Instantiate dataclass `cls` from nested dicts, rejecting unknown fields and bad types."""
    values = values or {}
    if not isinstance(values, dict):
        raise PresetError(f"{where or cls.__name__} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise PresetError(
            f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(_dotted(where, u) for u in unknown)}; "
            f"known in {where or cls.__name__}: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _coerce(hints[name], value, _dotted(where, name))
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise PresetError(f"{where or cls.__name__}: {err}") from err


def _dotted(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where)
            except PresetError as err:
                errors.append(str(err))
        raise PresetError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]
        (item,) = typing.get_args(hint)[:1] or (Any,)
        items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise PresetError(f"{where} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if hint is Any or origin is dict:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise PresetError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise PresetError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                return float(value)  # YAML reads 5e-6 as a string
            except (TypeError, ValueError):
                raise PresetError(f"{where} must be a number, got {value!r}") from None
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise PresetError(f"{where} must be a string, got {value!r}")
        return value
    return value


def threads_value(text: str) -> int | str:
    """A command-line thread count: a number, or "auto" (the machine decides)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of threads or 'auto', got {text!r}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
