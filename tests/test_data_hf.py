"""Hugging Face sources and Hub tokenizers, offline: the Hub calls are replaced by local objects."""

from __future__ import annotations

import json

import pytest

import gptj.data as data
from tests.fixtures.data import MNLI_ROWS, tiny_tokenizer, tiny_tokenizer_dir

datasets = pytest.importorskip("datasets")


@pytest.fixture
def fake_hub_dataset(monkeypatch):
    calls = []

    def load_dataset(name, config=None, split=None, **kw):
        calls.append((name, config, split))
        if split == "missing":
            raise ValueError("Unknown split")
        return datasets.Dataset.from_list(MNLI_ROWS + [{**MNLI_ROWS[0], "label": -1}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hf_source_loads_through_datasets(fake_hub_dataset, tmp_path):
    rows, summary = data.load_examples("mnli", "hf:glue/mnli", split="validation_matched")
    assert fake_hub_dataset == [("glue", "mnli", "validation_matched")]
    assert len(rows) == 5 and summary.skipped == {"unlabeled": 1}
    assert summary.first_seen["unlabeled"].startswith("hf:glue/mnli[validation_matched]:row 5")
    ev = data.build_eval_data("mnli", "glue/mnli", tiny_tokenizer(), "validation_mismatched",
                              cache_dir=tmp_path)
    assert len(ev) == 5 and fake_hub_dataset[-1] == ("glue", "mnli", "validation_mismatched")
    again = data.build_eval_data("mnli", "glue/mnli", tiny_tokenizer(), "validation_mismatched",
                                 cache_dir=tmp_path)
    assert again.summary.cached


def test_hf_errors_are_data_errors(fake_hub_dataset):
    with pytest.raises(data.DataError, match="cannot load Hugging Face dataset 'glue'"):
        data.load_examples("mnli", "hf:glue/mnli", split="missing")


def test_hub_tokenizer(monkeypatch):
    import huggingface_hub
    seen = []

    def snapshot_download(repo_id, allow_patterns=None, **kw):
        seen.append((repo_id, allow_patterns))
        return str(tiny_tokenizer_dir())

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    tok = data.load_tokenizer("someone/tiny-tokenizer")
    assert seen[0][0] == "someone/tiny-tokenizer" and "tokenizer.json" in seen[0][1]
    assert tok.name_or_path == "someone/tiny-tokenizer"
    assert tok.encode(["the cat"]) == tiny_tokenizer().encode(["the cat"])
    assert tok.pad_id == tiny_tokenizer().pad_id


def test_hub_errors_are_data_errors(monkeypatch):
    import huggingface_hub

    def offline(repo_id, **kw):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(data.DataError, match="cannot load tokenizer 'someone/x'.*no network"):
        data.load_tokenizer("someone/x")


def test_vocab_merges_with_added_tokens_json(tmp_path):
    """The GPT-J Hub layout: vocab.json + merges.txt + added_tokens.json."""
    tiny = tiny_tokenizer()
    tiny.backend.model.save(str(tmp_path))
    n = tiny.backend.get_vocab_size(with_added_tokens=False)
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<|extra_b|>": n + 1, "<|extra_a|>": n}))
    tok = data.load_tokenizer(tmp_path)
    assert tok.token_to_id("<|extra_a|>") == n and tok.token_to_id("<|extra_b|>") == n + 1
    assert tok.vocab_size == n + 2
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<|x|>": n + 5}))
    with pytest.raises(data.DataError, match="continue the vocabulary"):
        data.load_tokenizer(tmp_path)
