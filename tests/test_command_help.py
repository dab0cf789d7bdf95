"""--help of the commands: options in groups, each value option with its default, and the
quantizer spelled as everywhere else (--quantize int8|int4)."""

from __future__ import annotations

import argparse

import pytest

import gptj.commands.finetune as finetune
import gptj.commands.generate as generate
import gptj.commands.quantize as quantize
import gptj.commands.serve as serve
from gptj.execution.inference.cli import preset_defaults

# Options whose help names its default in words (no single value), and flags (off unless given).
WORDED = {"--prompt", "--prompts-file", "--stop", "--output", "--adapter", "--api-key", "--served-model-name",
          "--max-adapters", "--max-model-len", "--set", "--help", "--model", "--tokenizer", "--quantize"}


def parser_of(module, monkeypatch) -> argparse.ArgumentParser:
    """The parser `module.parse_args` builds (captured instead of parsing)."""
    built = {}

    def capture(self, argv=None):
        built["parser"] = self
        return argparse.Namespace()

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    module.parse_args([])
    return built["parser"]


@pytest.mark.parametrize("module,groups", [
    (generate, {"model", "precision and quantization", "hardware", "prompts", "generation", "output"}),
    (serve, {"model", "precision and quantization", "hardware", "server", "limits"}),
    (quantize, {"checkpoint", "quantization"}),
    (finetune, {"model", "data", "training", "LoRA", "hardware", "output"}),
])
def test_help_is_in_groups_and_every_value_option_shows_its_default(module, groups, monkeypatch):
    parser = parser_of(module, monkeypatch)
    titles = {g.title for g in parser._action_groups if g._group_actions} - {"options", "optional arguments"}
    assert titles == groups
    for action in parser._actions:
        flag = action.option_strings[-1] if action.option_strings else None
        if flag is None or flag in WORDED or action.nargs == 0 or action.required:
            continue
        assert "default" in (action.help or "") or module is quantize, f"{flag} shows no default"
    text = parser.format_help()
    if module is quantize:  # ArgumentDefaultsHelpFormatter writes them
        assert "(default: 128)" in text


def test_help_defaults_are_those_an_option_left_out_gets(monkeypatch):
    parser = parser_of(generate, monkeypatch)
    defaults = preset_defaults()
    helps = {a.option_strings[-1]: a.help for a in parser._actions if a.option_strings}
    assert helps["--max-new-tokens"].endswith(f"(default: {defaults.generation.max_new_tokens})")
    assert helps["--batch-size"].endswith(f"(default: {defaults.generation.batch_size})")
    assert helps["--device"].endswith(f"(default: {defaults.model.device})")
    monkeypatch.undo()
    config = generate.build_config(generate.parse_args(["--prompt", "x"]))
    assert (config.generation.max_new_tokens, config.generation.batch_size, config.model.device) == (
        defaults.generation.max_new_tokens, defaults.generation.batch_size, defaults.model.device)


def test_the_quantizer_takes_quantize_not_bits(capsys):
    with pytest.raises(SystemExit):
        quantize.parse_args(["--model", "m", "--output", "o", "--quantize", "int4", "--bits", "4"])
    assert "unrecognized arguments: --bits 4" in capsys.readouterr().err
    args = quantize.parse_args(["--model", "m", "--output", "o", "--quantize", "int4"])
    assert (args.quantize, args.group_size) == ("int4", 128)
    with pytest.raises(SystemExit):
        quantize.parse_args(["--model", "m", "--output", "o", "--quantize", "int3"])


def test_finetune_help_defaults_are_those_an_option_left_out_gets(monkeypatch, tmp_path):
    from gptj.execution.training.config import load_config

    parser = parser_of(finetune, monkeypatch)
    defaults = load_config("tiny")
    helps = {a.option_strings[-1]: a.help for a in parser._actions if a.option_strings}
    fields = {"--steps": defaults.training.steps, "--lr": defaults.optimizer.lr,
              "--checkpoint-every": defaults.checkpoint.every, "--sequence-length": defaults.data.sequence_length,
              "--dataset": defaults.data.dataset, "--group-size": defaults.model.group_size}
    for option, value in fields.items():
        assert helps[option].endswith(f"(default: {value})"), (option, helps[option])
    assert "--config tiny" in parser.epilog
    monkeypatch.undo()
    config = finetune.build_config(finetune.parse_args(["--output-dir", str(tmp_path)]))
    assert (config.training.steps, config.optimizer.lr, config.checkpoint.every, config.data.sequence_length,
            config.data.dataset, config.model.group_size) == tuple(fields.values())
