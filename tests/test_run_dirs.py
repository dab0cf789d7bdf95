"""A fine-tuning run directory is accepted wherever a model or an adapter directory is (--model
and --adapter of every command, the server's /v1/load_lora_adapter, the planner's --model),
through one resolver; a path that cannot be one says why ("does not exist", a run not
finished, a full run given as an adapter)."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
import torch

from gptj.execution.inference.pipelines import load_model_and_tokenizer
from gptj.execution.runtime import run_dirs
from gptj.execution.runtime.preflight import InputError, resolve_model_source
from gptj.execution.runtime.run_dirs import resolve_adapter_dir, resolve_model_dir
from gptj.execution.training.planner import main as plan
from gptj.model import ModelConfig
from gptj.model.adapter_io import save_peft_adapter
from gptj.model.lora import LoraAdapters, LoraSettings
from gptj.serving.server import check_model_paths
from tests.fixtures.cli import run_inference_main
from tests.fixtures.server import tiny_config, tiny_server

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> str:
    model, _ = load_model_and_tokenizer("random:tiny", precision="fp32", device="cpu")
    adapters = LoraAdapters(model.config, LoraSettings(rank=2, alpha=4.0))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return str(save_peft_adapter(adapters, tmp_path_factory.mktemp("adapter"), None))


def lora_run_dir(root, adapter: str):
    """A LoRA run's directory as run_finetuning.py leaves it: adapter/, hf/, checkpoints/."""
    run = root / "run"
    shutil.copytree(adapter, run / "adapter")
    (run / "hf").mkdir()
    (run / "hf" / "config.json").write_text(json.dumps(ModelConfig.preset("tiny").to_hf_dict()))
    (run / "checkpoints").mkdir()
    return run


def test_paths_resolve_to_the_model_or_adapter_they_stand_for(tmp_path, adapter):
    run = lora_run_dir(tmp_path, adapter)
    assert resolve_adapter_dir(adapter) == adapter
    assert resolve_adapter_dir(str(run)) == str(run / "adapter")
    assert resolve_model_dir(str(run)) == str(run / "hf")
    assert resolve_model_dir(str(run / "hf")) == str(run / "hf")


@pytest.mark.parametrize("make, call, message", [
    (lambda t: t / "nope", resolve_adapter_dir, "--adapter {p}: adapter directory does not exist"),
    (lambda t: t / "nope", resolve_model_dir, "--model {p}: model directory does not exist"),
    (lambda t: (t / "f.txt").write_text("x") and t / "f.txt", resolve_adapter_dir, "--adapter {p} is a file"),
    (lambda t: (t / "c" / "checkpoints").mkdir(parents=True) or t / "c", resolve_adapter_dir,
     "--adapter {p}: this run directory has no adapter/ export yet"),
    (lambda t: ((t / "full" / "checkpoints").mkdir(parents=True), (t / "full" / "hf").mkdir(),
                (t / "full" / "hf" / "config.json").write_text("{}")) and t / "full", resolve_adapter_dir,
     "--adapter {p}: this run fine-tuned the whole model, it has no adapter; serve it as the model"),
    (lambda t: (t / "empty").mkdir() or t / "empty", resolve_adapter_dir,
     "--adapter {p}: no adapter_config.json; expected a PEFT adapter directory or a run_finetuning.py"),
])
def test_a_path_that_cannot_be_one_says_why(tmp_path, make, call, message):
    path = make(tmp_path)
    with pytest.raises(InputError) as err:
        call(str(path))
    assert str(err.value).startswith(message.format(p=path)), err.value


def test_the_server_loads_an_adapter_from_a_lora_run_directory(tmp_path, adapter):
    run = lora_run_dir(tmp_path, adapter)
    body = {"prompt": "The quick brown fox", "max_tokens": 6, "temperature": 0}
    with tiny_server("--precision", "fp32", "--max-adapters", "3") as server:
        url = server.url
        assert httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "direct", "lora_path": adapter},
                          timeout=60).status_code == 200
        loaded = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "run", "lora_path": str(run)},
                            timeout=60)
        assert loaded.status_code == 200, loaded.text
        texts = {name: httpx.post(f"{url}/v1/completions", json={**body, "model": name}, timeout=60)
                 .json()["choices"][0]["text"] for name in ("direct", "run")}
        assert texts["run"] == texts["direct"]
        missing = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nope"},
                             timeout=60)
        assert missing.status_code == 400
        assert missing.json()["error"]["message"] == "lora_path /nope: adapter directory does not exist"


def test_the_planner_takes_a_run_directory(tmp_path, adapter, capsys):
    run = lora_run_dir(tmp_path, adapter)
    assert plan(["--model", str(run), "--machine", "cpu-24gb", "--seq", "64", "--global-batch", "4",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recommended"] is not None
    assert plan(["--model", str(tmp_path / "nope")]) == 2
    assert "model directory does not exist" in capsys.readouterr().err


def _generated(argv, capsys, tmp_path) -> str:
    """gptj-generate's text for one greedy prompt (fp32, 6 tokens) with `argv` added."""
    out = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}.jsonl"
    code, _, err = run_inference_main(["--prompt", PROMPT, "--max-new-tokens", "6", "--precision", "fp32",
                                       "--output", str(out), *argv], capsys)
    assert code == 0, err
    return json.loads(out.read_text())["text"]


def _served(server, model: str | None = None) -> str:
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, **({"model": model} if model else {})}
    resp = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


def test_adapter_options_take_a_run_directory(tmp_path, adapter, capsys):
    """--adapter RUN_DIR (gptj-generate, gptj-serve merged) and --adapter NAME=RUN_DIR (served by
    name) give what the adapter directory itself gives."""
    run = lora_run_dir(tmp_path, adapter)
    direct = _generated(["--adapter", adapter], capsys, tmp_path)
    assert _generated(["--adapter", str(run)], capsys, tmp_path) == direct
    with tiny_server("--precision", "fp32", "--adapter", str(run)) as server:
        assert server.config.model.adapter == str(run / "adapter")
        assert _served(server) == direct
    with tiny_server("--precision", "fp32", "--adapter", f"run={run}", "--adapter", f"direct={adapter}") as server:
        assert server.config.model.adapters == {"run": str(run / "adapter"), "direct": adapter}
        assert _served(server, "run") == _served(server, "direct") == direct
        assert _served(server) != direct  # the base alone: the adapter changes the text


@pytest.mark.parametrize("argv, message", [
    (["--adapter", "{p}"], "--adapter {p}: adapter directory does not exist"),
    (["--adapter", "qa={p}"], "--adapter qa={p}: adapter directory does not exist"),
])
def test_a_missing_adapter_says_it_does_not_exist(tmp_path, argv, message):
    missing = tmp_path / "nope"
    config = tiny_config(*[a.format(p=missing) for a in argv])
    with pytest.raises(InputError) as err:
        check_model_paths(config)
    assert str(err.value) == message.format(p=missing)


def test_gptj_generate_says_a_missing_adapter_does_not_exist_before_loading(tmp_path, capsys):
    missing = tmp_path / "nope"
    code, out, err = run_inference_main(["--prompt", PROMPT, "--adapter", str(missing)], capsys)
    assert code == 2 and "machine:" not in out
    assert err.strip() == f"error: --adapter {missing}: adapter directory does not exist"


def test_every_model_option_follows_the_one_run_directory_rule(tmp_path, monkeypatch):
    """resolve_model_source (--model of every command) resolves a run directory by run_dirs.py's
    rule, not a copy of it: a changed export name is followed."""
    monkeypatch.setattr(run_dirs, "MODEL_EXPORT", "export")
    (tmp_path / "run" / "export").mkdir(parents=True)
    (tmp_path / "run" / "export" / "config.json").write_text("{}")
    assert resolve_model_source(str(tmp_path / "run")) == str(tmp_path / "run" / "export")
    assert resolve_model_source("EleutherAI/gpt-j-6b") == "EleutherAI/gpt-j-6b"  # a Hub id, as it is
    with pytest.raises(InputError, match="model directory does not exist"):
        resolve_model_source(str(tmp_path / "gone"))
