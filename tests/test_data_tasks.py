"""Task templates: exact reference text, user tasks from YAML, label handling."""

from __future__ import annotations

import pytest

import gptj.data as data
from gptj.data.errors import RowProblem

ROW = {"premise": "The red cat sleeps in the kitchen.", "hypothesis": "A cat sleeps in the kitchen.",
       "label": "entailment"}


def test_mnli_template_is_the_reference_text():
    task = data.load_task("mnli")
    assert task.labels == ("entailment", "neutral", "contradiction")
    assert task.render_train(ROW) == ("mnli hypothesis: A cat sleeps in the kitchen. premise: The red "
                                      "cat sleeps in the kitchen. target: entailment<|endoftext|>")
    assert task.render_prompt(ROW).endswith("premise: The red cat sleeps in the kitchen. target:")
    assert task.target(ROW) == " entailment"
    assert task.answer(ROW) == "entailment"
    assert task.render_prompt(ROW) + task.target(ROW) + "<|endoftext|>" == task.render_train(ROW)
    assert task.truncate == "premise"
    assert task.hf_dataset == "glue/mnli"
    assert task.eval_splits == ("validation_matched", "validation_mismatched")


def test_builtin_tasks():
    assert {"mnli", "sst2", "qa"} <= set(data.builtin_task_names())
    sst2 = data.load_task("sst2")
    assert sst2.labels == ("negative", "positive")
    assert sst2.render_train(sst2.extract({"sentence": "a fine film", "label": 1})) == (
        "sst2 sentence: a fine film target: positive<|endoftext|>")
    qa = data.load_task("qa")
    assert qa.labels is None and qa.truncate == "context"
    row = qa.extract({"question": "Who?", "context": "Ann came.",
                      "answers": {"text": ["Ann"], "answer_start": [0]}})
    assert qa.render_train(row) == "question: Who? context: Ann came. answer: Ann<|endoftext|>"
    assert qa.label_id(row) == -1


def test_field_alternatives_and_label_forms():
    task = data.load_task("mnli")
    tsv = {"sentence1": "P.", "sentence2": "H.", "gold_label": "contradiction"}
    assert task.extract(tsv) == {"premise": "P.", "hypothesis": "H.", "label": "contradiction"}
    for value, name in [(0, "entailment"), (2, "contradiction"), ("1", "neutral"), (1.0, "neutral")]:
        assert task.extract({**ROW, "label": value})["label"] == name


@pytest.mark.parametrize("record, reason", [
    ({"premise": "P.", "label": 0}, "missing_field"),
    ({"premise": "  ", "hypothesis": "H.", "label": 0}, "empty_field"),
    ({"premise": "P.", "hypothesis": None, "label": 0}, "empty_field"),
    ({"premise": "P.", "hypothesis": "H.", "label": -1}, "unlabeled"),
    ({"premise": "P.", "hypothesis": "H.", "label": "-"}, "unlabeled"),
    ({"premise": "P.", "hypothesis": "H.", "label": "maybe"}, "unknown_label"),
    ({"premise": "P.", "hypothesis": "H.", "label": 7}, "unknown_label"),
    ({"premise": "P.", "hypothesis": "H.", "label": ""}, "empty_field"),
])
def test_bad_rows_are_classified(record, reason):
    with pytest.raises(RowProblem) as e:
        data.load_task("mnli").extract(record)
    assert e.value.reason == reason


def test_user_task_from_yaml(tmp_path):
    path = tmp_path / "topic.yml"
    path.write_text(
        "prompt: 'classify {{topic}}: {text} =>'\n"
        "target: ' {topic}'\n"
        "fields: {text: body, topic: category}\n"
        "labels: [sport, food]\n"
        "label_aliases: {S: sport}\n"
        "truncate: text\n")
    task = data.load_task(path)
    assert task.name == "topic" and task.label_field == "topic"
    row = task.extract({"body": "goal!", "category": "S"})
    assert task.render_train(row) == "classify {topic}: goal! => sport<|endoftext|>"


def test_user_task_file_with_several_tasks(tmp_path):
    path = tmp_path / "many.yaml"
    path.write_text("a: {prompt: 'x {q}', target: ' {r}', fields: {q: q, r: r}}\n"
                    "b: {prompt: 'y {q}', target: ' {r}', fields: {q: q, r: r}}\n")
    assert data.load_task(f"{path}:b").render_prompt({"q": "1"}) == "y 1"
    with pytest.raises(data.DataError, match="several tasks"):
        data.load_task(path)


@pytest.mark.parametrize("body, message", [
    ("prompt: '{a}'\ntarget: ' {b}'\nfields: {a: a}\n", "does not map"),
    ("prompt: '{a:>3}'\ntarget: ' {b}'\nfields: {a: a, b: b}\n", "plain name"),
    ("prompt: '{a}'\ntarget: ' {b}'\nfields: {a: a, b: b}\ntruncate: b\n", "truncate"),
    ("prompt: '{a}'\nfields: {a: a}\n", "missing 'target'"),
    ("prompt: '{a}'\ntarget: ' {b}'\nfields: {a: a, b: b}\ncolour: red\n", "unknown keys"),
])
def test_bad_task_files_are_clear_errors(tmp_path, body, message):
    path = tmp_path / "bad.yml"
    path.write_text(body)
    with pytest.raises(data.DataError, match=message):
        data.load_task(path)


def test_unknown_task_and_missing_file():
    with pytest.raises(data.DataError, match="unknown task 'nope'"):
        data.load_task("nope")
    with pytest.raises(data.DataError, match="task file not found"):
        data.load_task("missing.yml")
