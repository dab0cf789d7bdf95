"""A cut safetensors file is one line naming it (exit 2 on the command lines), not a traceback.

Reference: the file the test itself truncated.
"""

from __future__ import annotations

import pytest

from gptj.execution.runtime.model_files import ModelFileError, safetensors_problem
from gptj.model.config import ModelConfig
from gptj.model.hf import export_hf
from gptj.model.model import GPTJ


@pytest.fixture()
def cut_model(tmp_path):
    model = GPTJ(ModelConfig.preset("tiny")).init_weights(seed=0)
    directory = export_hf(model, tmp_path / "model")
    file = directory / "model.safetensors"
    assert safetensors_problem(file) is None  # intact, as written
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    return directory, file


def test_pipeline_names_the_cut_file(cut_model):
    from gptj.execution.inference.pipelines import TextGenerationPipeline

    directory, file = cut_model
    with pytest.raises(ModelFileError, match=f"damaged model file {file}: .*cut short"):
        TextGenerationPipeline.from_pretrained(str(directory), tokenizer="bundled:tiny")


@pytest.mark.parametrize("command", ["run_inference", "run_finetuning"])
def test_command_lines_say_one_line_and_exit_2(cut_model, command, tmp_path, capsys):
    import importlib

    directory, file = cut_model
    args = {"run_inference": ["--model", str(directory), "--tokenizer", "bundled:tiny", "--prompt", "hi"],
            "run_finetuning": ["--model", str(directory), "--set", "data.tokenizer=bundled:tiny",
                               "--output-dir", str(tmp_path / "run"), "--steps", "1"]}[command]
    assert importlib.import_module(command).main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: damaged model file {file}: "), err
    assert not any("Traceback" in line for line in err)
