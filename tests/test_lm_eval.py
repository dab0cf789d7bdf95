"""lm-evaluation-harness's `local-completions` against the server (optional: skips without lm_eval).

A 10-row multiple-choice task from a local MNLI jsonl runs through the server and through
lm-eval's in-process transformers backend (`hf`) on the same saved weights; every choice's
log-likelihood and greedy flag must agree.
"""

from __future__ import annotations

import json

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed")

import gptj.data as data  # noqa: E402
from gptj.data import bundled  # noqa: E402
from gptj.model.config import ModelConfig  # noqa: E402
from tests.fixtures.reference import hf_model  # noqa: E402
from tests.fixtures.server import tiny_server  # noqa: E402

TASK = """task: mnli_local_test
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {rows}
output_type: multiple_choice
validation_split: validation
doc_to_text: "mnli hypothesis: {{{{hypothesis}}}} premise: {{{{premise}}}} target:"
doc_to_choice: ["entailment", "neutral", "contradiction"]
doc_to_target: label
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    tok = data.load_tokenizer("bundled:tiny")
    config = ModelConfig.preset("tiny").replace(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                                                bos_token_id=tok.eos_id)
    model_dir = root / "model"
    hf_model(config, seed=5).save_pretrained(model_dir)
    tok.save(model_dir)
    sample = bundled.sample_dir("mnli_sample") / "validation_matched.jsonl"
    rows = root / "rows.jsonl"
    rows.write_text("".join(sample.read_text().splitlines(keepends=True)[:10]))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "mnli_local_test.yaml").write_text(TASK.format(rows=rows))
    return model_dir, tasks


def per_choice(results) -> list[tuple[float, bool]]:
    samples = sorted(results["samples"]["mnli_local_test"], key=lambda s: s["doc_id"])
    return [(float(r[0][0]), r[0][1] in (True, "True")) for s in samples for r in s["resps"]]


def test_local_completions_multiple_choice_equals_the_hf_backend(setup, monkeypatch):
    from lm_eval.tasks import TaskManager

    model_dir, tasks = setup
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manager = TaskManager(include_path=str(tasks))
    options = dict(tasks=["mnli_local_test"], limit=10, log_samples=True, task_manager=manager, batch_size=8)
    with tiny_server("--model", str(model_dir), "--precision", "fp32", "--served-model-name", "tiny") as server:
        served = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=f"base_url={server.url}/v1/completions,model=tiny,tokenizer={model_dir},max_length=512",
            **options)
    local = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32", device="cpu",
                                    **options)
    got, want = per_choice(served), per_choice(local)
    assert len(got) == len(want) == 30
    assert [g for _, g in got] == [g for _, g in want]
    assert [v for v, _ in got] == pytest.approx([v for v, _ in want], abs=1e-4)
    assert json.dumps(served["results"]["mnli_local_test"]["acc,none"]) == \
        json.dumps(local["results"]["mnli_local_test"]["acc,none"])
