"""Preset files: base chains, overrides and field validation."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from gptj.config import PresetError, apply_overrides, build, resolve_preset


@dataclass
class Optim:
    lr: float = 1e-3
    schedule: Literal["constant", "linear", "cosine"] = "constant"


@dataclass
class Run:
    steps: int = 10
    name: str = "x"
    tags: list[str] = field(default_factory=list)
    seed: int | None = None
    optim: Optim = field(default_factory=Optim)


PRESETS = {
    "small": {"steps": 5, "optim": {"lr": "5e-6"}},
    "big": {"base": "small", "steps": 500, "optim": {"schedule": "cosine"}},
    "loop": {"base": "loop"},
}


def test_base_chain_merges_nested_sections():
    run = build(Run, resolve_preset(PRESETS, "big"))
    assert run.steps == 500 and run.optim.lr == 5e-6 and run.optim.schedule == "cosine"


def test_overrides_parse_yaml_values():
    values = apply_overrides(resolve_preset(PRESETS, "small"), ["optim.lr=0.5", "tags=[a, b]", "seed=null"])
    run = build(Run, values)
    assert run.optim.lr == 0.5 and run.tags == ["a", "b"] and run.seed is None


@pytest.mark.parametrize(
    "values, message",
    [
        ({"stepz": 3}, r"unknown field stepz; known in Run: steps, name"),
        ({"optim": {"lrr": 1}}, r"unknown field optim.lrr"),
        ({"steps": "many"}, r"steps must be an integer, got 'many'"),
        ({"optim": {"schedule": "step"}}, r"optim.schedule must be one of 'constant', 'linear', 'cosine'"),
    ],
)
def test_bad_fields_are_named(values, message):
    with pytest.raises(PresetError, match=message):
        build(Run, values)


def test_unknown_preset_and_cycles():
    with pytest.raises(PresetError, match="unknown preset 'nope'.*known presets: big, loop, small"):
        resolve_preset(PRESETS, "nope")
    with pytest.raises(PresetError, match="base cycle"):
        resolve_preset(PRESETS, "loop")
    with pytest.raises(PresetError, match="must look like section.field=value"):
        apply_overrides({}, ["steps"])
