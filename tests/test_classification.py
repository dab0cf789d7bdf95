"""ClassificationPipeline: any task with labels, taken from a fine-tuning run's saved config,
against transformers' numbers computed by hand; the refusals in one line."""

from __future__ import annotations

import json

import pytest

import gptj.data as data
from gptj.execution.inference.classification import ClassificationPipeline
from gptj.execution.inference.pipelines import EntailmentPipeline
from tests.fixtures.generation import reference_pair
from tests.fixtures.reference import TINY
from tests.test_pipelines import hand_label_scores

TASK_YAML = ('prompt: "review: {text} sentiment:"\ntarget: " {label}"\n'
             "fields: {text: text, label: label}\nlabels: [negative, positive]\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two run directories sharing one tiny model: one trained (per its saved config) on a
    user's task file given by a relative path, one on the built-in sst2."""
    tok = data.load_tokenizer("bundled:tiny")
    config = TINY.replace(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, bos_token_id=tok.eos_id)
    hf, _ = reference_pair(seed=6, config=config)
    root = tmp_path_factory.mktemp("runs")
    (root / "sentiment.yml").write_text(TASK_YAML)
    made = {}
    for name, task in (("user", "sentiment.yml"), ("sst2", "sst2")):
        run = root / name
        hf.save_pretrained(run / "hf")
        tok.save(run / "hf")
        (run / "checkpoints" / "step-00000010").mkdir(parents=True)
        (run / "checkpoints" / "step-00000010" / "meta.json").write_text(
            json.dumps({"step": 10, "config": {"data": {"task": task}}}))
        made[name] = run
    return made, hf, tok


def test_a_run_classifies_with_its_own_task(runs):
    made, hf, tok = runs
    clf = ClassificationPipeline.from_pretrained(str(made["user"]), precision="fp32", device="cpu")
    assert clf.task.name == "sentiment" and clf.labels == ["negative", "positive"]
    rows = [{"text": "the film was great"}, {"text": "a dull and long plot"}]
    out = clf(rows)
    for row, result in zip(rows, out):
        sums, probs = hand_label_scores(hf, tok, f"review: {row['text']} sentiment:", clf.labels)
        assert result["log_likelihoods"] == pytest.approx(dict(zip(clf.labels, sums)), abs=1e-4)
        assert result["probabilities"] == pytest.approx(dict(zip(clf.labels, probs)), abs=1e-5)
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert result["label"] == clf.labels[probs.index(max(probs))]
    single = clf(rows[0])
    assert single["label"] == out[0]["label"]
    assert single["probabilities"] == pytest.approx(out[0]["probabilities"], abs=1e-5)
    # Other labels for the same template: the choices override the task's.
    other = clf(rows[0], choices=["bad", "good", "so-so"])
    sums, probs = hand_label_scores(hf, tok, "review: the film was great sentiment:", ["bad", "good", "so-so"])
    assert other["probabilities"] == pytest.approx(dict(zip(["bad", "good", "so-so"], probs)), abs=1e-5)
    # The hf/ export inside the run finds the run's task too; the built-in sst2 run likewise.
    assert ClassificationPipeline.from_pretrained(str(made["user"] / "hf"), precision="fp32").task.name == "sentiment"
    sst2 = ClassificationPipeline.from_pretrained(str(made["sst2"]), precision="fp32")
    assert sst2.task.name == "sst2" and sst2({"sentence": "fine"})["label"] in ("negative", "positive")
    # A run that keeps its resolved config (config.yaml) is read from it first.
    (made["sst2"] / "config.yaml").write_text("data:\n  task: mnli\n")
    try:
        assert ClassificationPipeline.from_pretrained(str(made["sst2"]), precision="fp32").task.name == "mnli"
    finally:
        (made["sst2"] / "config.yaml").unlink()


def test_bad_rows_and_choices_are_refused_naming_the_field(runs):
    made, _, _ = runs
    clf = ClassificationPipeline.from_pretrained(str(made["user"]), precision="fp32")
    with pytest.raises(ValueError, match="row 1: missing field 'text' \\(task sentiment needs text\\)"):
        clf([{"text": "ok"}, {"sentence": "wrong field"}])
    with pytest.raises(ValueError, match="row 0: field 'text' must be a non-empty string"):
        clf({"text": "  "})
    with pytest.raises(ValueError, match="choices must be a non-empty list"):
        clf({"text": "ok"}, choices=[])
    with pytest.raises(ValueError, match="choices holds the same label twice"):
        clf({"text": "ok"}, choices=["a", "a"])
    with pytest.raises(TypeError, match="takes a dict of the task's fields \\['text'\\]"):
        clf("just a string")
    with pytest.raises(ValueError, match="prompt 0 with candidate 0 takes .* tokens but the model context is 64"):
        clf({"text": "word " * 80})


def test_another_tasks_labels_are_refused_unless_the_task_is_named(runs):
    made, _, _ = runs
    with pytest.raises(ValueError) as refused:
        EntailmentPipeline.from_pretrained(str(made["user"]), precision="fp32")
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"{made['user']} was fine-tuned on task 'sentiment', not 'mnli'")
    named = EntailmentPipeline.from_pretrained(str(made["user"]), precision="fp32", task="mnli")
    assert named("a b", "c d")["label"] in ("entailment", "neutral", "contradiction")
    with pytest.raises(ValueError, match="is not a fine-tuning run with a saved config: name the task"):
        ClassificationPipeline.from_pretrained(str(made["user"] / "hf" / "nothing"))
    (made["user"].parent / "sentiment.yml").rename(made["user"].parent / "moved.yml")
    try:
        with pytest.raises(ValueError, match="was trained on task file sentiment.yml, which is not found"):
            ClassificationPipeline.from_pretrained(str(made["user"]))
    finally:
        (made["user"].parent / "moved.yml").rename(made["user"].parent / "sentiment.yml")
