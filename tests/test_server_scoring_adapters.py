"""The LoRA adapter a request names runs in the server's scorer: /v1/classify's "model" and a
guided choice's answer equal the classification pipeline and plain scoring over the adapter
merged into the base; an unknown name is a 400 naming "model"."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from gptj.execution.inference.classification import ClassificationPipeline
from gptj.execution.inference.pipelines import load_model_and_tokenizer
from gptj.execution.inference.scoring import score_rows
from gptj.model.lora import LoraSettings
from tests.fixtures.lora import seeded_adapter_dirs
from tests.fixtures.server import tiny_server
from tests.test_server_classify import assert_same

ROWS = [{"sentence": "a fine film"}, {"sentence": "dull, long and loud"}, {"sentence": "it was fine"}]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    model, _ = load_model_and_tokenizer("random:tiny", precision="fp32", device="cpu")
    return seeded_adapter_dirs(model.config, {"sst2": LoraSettings(rank=4, alpha=8.0)}, 3, tmp_path_factory)["sst2"]


@pytest.fixture(scope="module")
def server(adapter_dir):
    with tiny_server("--precision", "fp32", "--adapter", f"sst2={adapter_dir}", "--max-model-len", "96") as s:
        yield s


def load(adapter=None):
    return load_model_and_tokenizer("random:tiny", "bundled:tiny", precision="fp32", device="cpu", adapter=adapter)


def test_classify_runs_the_adapter_its_model_names(server, adapter_dir):
    bodies = [{"task": "sst2", "inputs": ROWS, "model": "sst2"}, {"task": "sst2", "inputs": ROWS}]

    async def together():  # sent at once: one engine step may score for both
        async with httpx.AsyncClient(timeout=60) as http:
            return await asyncio.gather(*(http.post(f"{server.url}/v1/classify", json=b) for b in bodies))

    with_adapter, base = [r.json()["results"] for r in asyncio.run(together())]
    merged = ClassificationPipeline(*load(adapter_dir), task="sst2")(ROWS)
    assert_same(with_adapter, merged)
    assert_same(base, ClassificationPipeline(*load(), task="sst2")(ROWS))
    assert with_adapter != base  # the adapter changes the answer
    unknown = httpx.post(f"{server.url}/v1/classify", json={**bodies[0], "model": "nope"}, timeout=60)
    assert unknown.status_code == 400, unknown.text
    assert unknown.json()["error"]["param"] == "model" and "'nope'" in unknown.json()["error"]["message"]


def test_a_guided_choice_runs_the_adapter_its_model_names(server, adapter_dir):
    prompt, choices = "sst2 sentence: a fine film target:", [" negative", " positive"]
    for name, directory in (("sst2", adapter_dir), (None, None)):
        model, tok = load(directory)
        body = {"prompt": prompt, "temperature": 0, "logprobs": 0, "guided_choice": choices}
        if name is not None:
            body["model"] = name
        got = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
        (choice,) = got["choices"]
        assert got["model"] == (name or server.state.model_name) and choice["text"] in choices
        prompt_ids, answer_ids = tok.encode([prompt, choice["text"]])
        alone = score_rows(model, [prompt_ids + answer_ids], [len(prompt_ids)])[0]
        assert choice["logprobs"]["token_logprobs"] == pytest.approx(alone.logprobs.tolist(), abs=1e-4)
