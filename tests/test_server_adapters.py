"""Named LoRA adapters served over one base: /v1/models, `model` choosing one, unknown names,
an adapter that does not fit the base refused at start, adapters loaded and unloaded at run
time."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

import gptj.commands.serve as run_server
from gptj.execution.inference.generation import generate
from gptj.execution.inference.pipelines import load_model_and_tokenizer
from gptj.model.adapter_io import save_peft_adapter
from gptj.model.lora import LoraAdapters, LoraSettings
from tests.fixtures.server import metric, tiny_config, tiny_server, tp_server_process, wait_for

PROMPT = "The quick brown fox"
MAX_TOKENS = 6


def _adapter(model_config, directory, seed: int, rank: int) -> str:
    adapters = LoraAdapters(model_config, LoraSettings(rank=rank, alpha=2.0 * rank))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return str(save_peft_adapter(adapters, directory, None))


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    model, _ = load_model_and_tokenizer("random:tiny", precision="fp32", device="cpu")
    return {name: _adapter(model.config, tmp_path_factory.mktemp(name), seed, rank)
            for name, seed, rank in (("mnli", 1, 2), ("sst2", 2, 4))}


def _alone(directory: str | None, max_tokens: int = MAX_TOKENS, eos: bool = True) -> str:
    """run_inference.py's path: the adapter merged into the base at load."""
    model, tok = load_model_and_tokenizer("random:tiny", precision="fp32", device="cpu", adapter=directory)
    with torch.no_grad():
        result = generate(model, tok.encode([PROMPT]), max_tokens, tok.eos_id if eos else -1)[0]
    return tok.decode(result.token_ids)


def test_each_request_gets_the_adapter_its_model_names(adapter_dirs, caplog):
    caplog.set_level("INFO", logger="gptj.requests")
    argv = [arg for name, d in adapter_dirs.items() for arg in ("--adapter", f"{name}={d}")]
    with tiny_server("--precision", "fp32", *argv) as server:
        models = httpx.get(f"{server.url}/v1/models").json()["data"]
        base = models[0]["id"]
        assert [(m["id"], m.get("parent")) for m in models] == [(base, None), ("mnli", base), ("sst2", base)]

        def complete(model):
            body = {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
            return httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)

        names = [base, "mnli", "sst2"] * 2
        with ThreadPoolExecutor(len(names)) as pool:  # sent together, so they share decode steps
            bodies = [r.json() for r in pool.map(complete, names)]
        texts = [body["choices"][0]["text"] for body in bodies]
        assert [body["model"] for body in bodies] == names  # the response names what was asked
        for name in ("mnli", "sst2"):  # per-adapter metrics: each adapter was asked twice
            generated = sum(b["usage"]["completion_tokens"] for b, n in zip(bodies, names) if n == name)
            assert metric(server.url, "gptj_adapter_requests_total", f'adapter="{name}"') == 2
            assert metric(server.url, "gptj_adapter_generation_tokens_total", f'adapter="{name}"') == generated > 0
        missing = complete("qa")
        assert missing.status_code == 404 and "'qa'" in missing.json()["error"]["message"]
        chat = {"model": "sst2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=60).json()["model"] == "sst2"
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**chat, "stream": True},
                          timeout=60) as stream:
            chunks = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {")]
        assert chunks and {c["model"] for c in chunks} == {"sst2"}
    expected = {base: _alone(None), **{name: _alone(d) for name, d in adapter_dirs.items()}}
    assert texts == [expected[name] for name in names]
    logged = [r.getMessage() for r in caplog.records if r.name == "gptj.requests"]
    for name, body in zip(names, bodies):  # the request log names each request's adapter (or the base)
        assert any(line.startswith(f"request {body['id']}-0 model {name}: ") for line in logged), (name, logged)
    assert len(set(expected.values())) == 3  # the adapters really change the output


def test_an_adapter_that_does_not_fit_the_base_is_refused_at_start(tmp_path, capsys):
    model, _ = load_model_and_tokenizer("random:tiny", precision="fp32", device="cpu")
    wide = _adapter(model.config.replace(hidden_size=2 * model.config.hidden_size), tmp_path / "wide", 3, 2)
    config = tiny_config("--adapter", f"wide={wide}")
    assert config.model.adapters == {"wide": wide}
    code = run_server.main(["--port", "0", "--adapter", f"wide={wide}", "--log-level", "critical"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "adapter 'wide'" in err[0] and "does not fit the base" in err[0]


KEY = {"Authorization": "Bearer sesame"}


def _post(server, route: str, body: dict, headers=KEY) -> httpx.Response:
    return httpx.post(f"{server.url}{route}", json=body, headers=headers, timeout=60)


def _text(server, model: str, **extra) -> str:
    body = {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}
    resp = _post(server, "/v1/completions", body)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


def test_adapters_load_and_unload_at_run_time(adapter_dirs):
    with tiny_server("--precision", "fp32", "--max-adapters", "2", "--api-key", "sesame") as server:
        load = {"lora_name": "mnli", "lora_path": adapter_dirs["mnli"]}
        assert _post(server, "/v1/load_lora_adapter", load, headers={}).status_code == 401
        assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "mnli"}, headers={}).status_code == 401
        assert _post(server, "/v1/completions", {"model": "mnli", "prompt": PROMPT}).status_code == 404

        card = _post(server, "/v1/load_lora_adapter", load)
        base = httpx.get(f"{server.url}/v1/models", headers=KEY).json()["data"][0]["id"]
        assert card.status_code == 200 and (card.json()["id"], card.json()["parent"]) == ("mnli", base)
        bad = _post(server, "/v1/load_lora_adapter", {"lora_name": "qa", "lora_path": "/no/such/dir"})
        assert bad.status_code == 400 and "/no/such/dir" in bad.json()["error"]["message"]
        assert _post(server, "/v1/load_lora_adapter", {"lora_name": "sst2", "lora_path": adapter_dirs["sst2"]})\
            .status_code == 200
        models = httpx.get(f"{server.url}/v1/models", headers=KEY).json()["data"]
        assert [m["id"] for m in models] == [base, "mnli", "sst2"]
        full = _post(server, "/v1/load_lora_adapter", {"lora_name": "qa", "lora_path": adapter_dirs["mnli"]})
        assert full.status_code == 400 and "--max-adapters 2" in full.json()["error"]["message"]
        texts = {name: _text(server, name) for name in (base, "mnli", "sst2")}

        assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "mnli"}).json()["deleted"] is True
        gone = _post(server, "/v1/completions", {"model": "mnli", "prompt": PROMPT})
        assert gone.status_code == 404 and "'mnli'" in gone.json()["error"]["message"]
        again = _post(server, "/v1/unload_lora_adapter", {"lora_name": "mnli"})
        assert again.status_code == 404 and "'mnli'" in again.json()["error"]["message"]
        assert _text(server, "sst2") == texts["sst2"]  # sst2 moved into mnli's place: still its own
        assert _post(server, "/v1/load_lora_adapter", load).status_code == 200  # room again
        assert _text(server, "mnli") == texts["mnli"]
    assert texts == {base: _alone(None), **{name: _alone(d) for name, d in adapter_dirs.items()}}


def test_unloading_lets_requests_in_flight_finish(adapter_dirs):
    argv = ["--precision", "fp32", "--api-key", "sesame", "--adapter", f"mnli={adapter_dirs['mnli']}"]
    long = 400
    with tiny_server(*argv) as server, ThreadPoolExecutor(1) as pool:
        body = {"model": "mnli", "prompt": PROMPT, "max_tokens": long, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=KEY, timeout=60) as stream:
            lines = stream.iter_lines()
            chunks = [next(lines)]  # the request runs
            unload = pool.submit(_post, server, "/v1/unload_lora_adapter", {"lora_name": "mnli"})
            assert wait_for(lambda: "mnli" not in server.state.adapters)
            refused = _post(server, "/v1/completions", {"model": "mnli", "prompt": PROMPT})
            assert refused.status_code == 404 and "'mnli'" in refused.json()["error"]["message"]
            chunks += list(lines)
        assert unload.result().status_code == 200
    parts = [json.loads(c.removeprefix("data: ")) for c in chunks if c.startswith("data: {")]
    assert all("error" not in p for p in parts)
    assert "".join(p["choices"][0]["text"] for p in parts) == _alone(adapter_dirs["mnli"], long, eos=False)


def test_a_tensor_parallel_2_server_gives_each_adapter_its_own_tokens_in_one_batch(adapter_dirs):
    """Two adapters over a TP-2 server (each rank stacks its shards): a long mnli request streams
    while sst2 and the base run beside it, each output the single process's with that adapter alone."""
    argv = ["--precision", "fp32", *[a for name, d in adapter_dirs.items() for a in ("--adapter", f"{name}={d}")]]
    long = 160
    with tp_server_process(*argv) as (url, _), ThreadPoolExecutor(2) as pool:
        base = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]

        def complete(model: str, tokens: int = MAX_TOKENS, **extra):
            body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
                    **extra}
            return httpx.post(f"{url}/v1/completions", json=body, timeout=120)

        body = {"model": "mnli", "prompt": PROMPT, "max_tokens": long, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as stream:
            lines = stream.iter_lines()
            chunks = [next(line for line in lines if line.startswith("data: {"))]  # mnli is running
            short = [r.json()["choices"][0]["text"] for r in pool.map(complete, ["sst2", base])]
            # Both finished while mnli still held its row: the three shared decode steps.
            assert metric(url, "gptj_requests_finished_total", 'finish_reason="length"') == 2
            chunks += list(lines)
    parts = [json.loads(c.removeprefix("data: ")) for c in chunks if c.startswith("data: {")]
    assert all("error" not in p for p in parts)
    assert "".join(p["choices"][0]["text"] for p in parts) == _alone(adapter_dirs["mnli"], long, eos=False)
    assert short == [_alone(adapter_dirs["sst2"], eos=False), _alone(None, eos=False)]
    assert len({*short, _alone(adapter_dirs["mnli"], eos=False)}) == 3  # the adapters really change the output


def test_a_compiled_decode_step_with_adapters_is_refused_with_one_line(adapter_dirs, capsys):
    for argv in (["--adapter", f"mnli={adapter_dirs['mnli']}"], ["--max-adapters", "2"]):
        code = run_server.main(["--port", "0", "--compile", *argv, "--log-level", "critical"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "drop --compile" in err[0], err
