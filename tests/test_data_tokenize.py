"""Tokenizers and tokenization: exact ids, truncation, saving, the GPT-2/GPT-J vocabulary."""

from __future__ import annotations

import numpy as np
import pytest

import gptj.data as data
from tests.fixtures.data import EOS, MNLI_ROWS, SHARED_DATA, mnli_file, tiny_tokenizer

GPT2 = SHARED_DATA / "gpt2"
needs_gpt2 = pytest.mark.skipif(not (GPT2 / "vocab.json").is_file(),
                                reason=f"GPT-2 tokenizer files not present at {GPT2}")


def test_tiny_tokenizer_wrapper():
    tok = tiny_tokenizer()
    assert tok.eos_id == tok.token_to_id(EOS) and tok.pad_id == tok.token_to_id("<|pad|>")
    assert tok.vocab_size == len(tok.backend.get_vocab())
    ids = tok.encode(["the cat sleeps", "a dog"])
    assert tok.decode(ids[0]) == "the cat sleeps"
    assert tok.encode(["x" + EOS])[0][-1] == tok.eos_id


def test_train_tokens_of_a_known_row_match_the_tokenizer(tmp_path):
    tok = tiny_tokenizer()
    train = data.build_train_data("mnli", str(mnli_file(tmp_path)), tok, sequence_length=256,
                                  layout="padded", use_cache=False)
    expected_text = ("mnli hypothesis: The dog is hungry. premise: The old dog runs in the park. "
                     "target: neutral<|endoftext|>")
    expected = tok.encode([expected_text])[0]
    row = train.tokens[train.offsets[1]:train.offsets[2]]
    assert row.tolist() == expected and expected[-1] == tok.eos_id
    target = [i for i, flag in zip(row, train.is_target[train.offsets[1]:train.offsets[2]]) if flag]
    assert target == tok.encode([" neutral"])[0] + [tok.eos_id]


def test_truncation_shortens_the_premise_only(tmp_path):
    tok = tiny_tokenizer()
    long_premise = "The old dog runs in the park and the cat sleeps in the kitchen " * 6 + "."
    rows = [{"premise": long_premise, "hypothesis": "The dog runs.", "label": 0}, MNLI_ROWS[1]]
    path = mnli_file(tmp_path, rows)
    full = tok.encode([data.load_task("mnli").render_train(
        {"premise": long_premise, "hypothesis": "The dog runs.", "label": "entailment"})])[0]
    limit = len(full) - 10
    train = data.build_train_data("mnli", str(path), tok, sequence_length=limit - 1,
                                  layout="padded", use_cache=False)
    assert train.summary.truncated == 1 and train.summary.kept == 2
    ex = train.tokens[train.offsets[0]:train.offsets[1]].tolist()
    assert len(ex) == limit
    text = tok.decode(ex)
    assert text.startswith("mnli hypothesis: The dog runs. premise: The old dog")
    assert text.endswith(" target: entailment" + EOS)
    # Token-wise: the kept tokens are the original ones minus 10 from the premise's end.
    suffix = tok.encode([" target: entailment"])[0] + [tok.eos_id]
    assert ex[:-len(suffix)] == full[:len(ex) - len(suffix)]


def test_too_long_even_without_premise_is_dropped(tmp_path):
    tok = tiny_tokenizer()
    path = mnli_file(tmp_path)
    with pytest.raises(data.DataError, match=r"no usable training rows in .*mnli.jsonl: too_long 5 of 5 read "
                                             r"\(first: .*mnli.jsonl:1: too_long"):
        data.build_train_data("mnli", str(path), tok, sequence_length=8, use_cache=False)
    with pytest.raises(data.DataError, match=r"mnli.jsonl:1: too_long"):
        data.build_train_data("mnli", str(path), tok, sequence_length=8, strict=True,
                              use_cache=False)


def test_eval_prompts_truncate_to_max_prompt_length(tmp_path):
    tok = tiny_tokenizer()
    path = mnli_file(tmp_path)
    full = data.build_eval_data("mnli", str(path), tok, max_prompt_length=None, use_cache=False)
    limit = int(full.prompt_lengths.max()) - 2
    cut = data.build_eval_data("mnli", str(path), tok, max_prompt_length=limit, use_cache=False)
    assert cut.prompt_lengths.max() == limit and cut.summary.truncated >= 1
    longest = int(np.argmax(full.prompt_lengths))
    assert tok.decode(cut.prompt(longest)).endswith(" target:")


def test_save_round_trips_through_transformers(tmp_path):
    from transformers import AutoTokenizer
    tok = data.load_tokenizer("bundled:tiny")
    tok.save(tmp_path / "tok")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert len(hf) == tok.vocab_size
    assert hf.eos_token_id == tok.eos_id and hf.pad_token_id == tok.pad_id
    text = "mnli hypothesis: A cat. premise: The cat sleeps. target: neutral"
    assert hf(text)["input_ids"] == tok.encode([text])[0]
    again = data.load_tokenizer(tmp_path / "tok")
    assert again.identity == tok.identity


def test_missing_tokenizer_directory(tmp_path):
    with pytest.raises(data.DataError, match="tokenizer not found"):
        data.load_tokenizer(str(tmp_path / "none"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="neither tokenizer.json"):
        data.load_tokenizer(tmp_path / "empty")


@needs_gpt2
def test_gpt2_files_plus_gptj_tokens():
    tok = data.load_tokenizer(GPT2)
    assert tok.vocab_size == 50400
    assert tok.token_to_id("Ġthe") == 262
    assert tok.eos_id == 50256
    assert tok.token_to_id("<|extratoken_1|>") == 50257 == tok.pad_id
    assert tok.token_to_id("<|extratoken_143|>") == 50399
    assert data.load_tokenizer(GPT2, gptj_extra_tokens=False).vocab_size == 50257


@needs_gpt2
def test_gpt2_matches_transformers():
    from transformers import GPT2TokenizerFast
    hf = GPT2TokenizerFast(str(GPT2 / "vocab.json"), str(GPT2 / "merges.txt"))
    tok = data.load_tokenizer(GPT2)
    texts = ["mnli hypothesis: Everyone really likes the newest benefits  premise: The new rights "
             "are nice enough target: neutral<|endoftext|>", "  odd   spacing\tand émojis 🙂 "]
    assert tok.encode(texts) == [hf(t)["input_ids"] for t in texts]
    assert tok.encode([" entailment"])[0] == hf(" entailment")["input_ids"]


def test_target_that_merges_with_the_prompt(tmp_path):
    """A token straddling the prompt/target boundary carries target text: it is a target token."""
    tok = tiny_tokenizer()
    task_file = tmp_path / "glue.yml"
    task_file.write_text("prompt: 'word: {a}'\ntarget: '{b}'\nfields: {a: a, b: b}\n")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"a": "ca", "b": "t"}\n{"a": "the", "b": " cat"}\n')
    train = data.build_train_data(task_file, str(rows), tok, 32, layout="padded", use_cache=False)
    for i, (text, target) in enumerate([("word: cat", "t"), ("word: the cat", " cat")]):
        ids = tok.encode([text])[0]
        ex = train.tokens[train.offsets[i]:train.offsets[i + 1]].tolist()
        assert ex == ids + [tok.eos_id]
        enc = tok.encode_with_offsets([text])[0]
        n = sum(1 for _, end in enc.offsets if end > len(text) - len(target))
        flags = train.is_target[train.offsets[i]:train.offsets[i + 1]].tolist()
        assert flags == [0] * (len(ids) - n) + [1] * (n + 1)


@needs_gpt2
def test_target_masks_on_real_mnli_agree_with_offsets():
    mnli = SHARED_DATA / "mnli" / "train_sample_heldout.jsonl"
    if not mnli.is_file():
        pytest.skip(f"{mnli} not present")
    tok = data.load_tokenizer(GPT2)
    task = data.load_task("mnli")
    train = data.build_train_data(task, str(mnli), tok, 1024, use_cache=False, progress=False)
    rows, _ = data.load_examples(task, str(mnli))
    for i in range(0, len(rows), 50):
        prompt = task.render_prompt(rows[i])
        enc = tok.encode_with_offsets([prompt + task.target(rows[i])])[0]
        n = sum(1 for _, end in enc.offsets if end > len(prompt))
        flags = train.is_target[train.offsets[i]:train.offsets[i + 1]]
        assert flags.sum() == n + 1 and flags[-(n + 1):].all()


def test_a_warning_names_the_sequence_length_when_most_examples_are_cut(tmp_path, capsys):
    tok = tiny_tokenizer()
    long_premise = "The old dog runs in the park and the cat sleeps in the kitchen " * 3
    rows = [{"premise": f"{long_premise} {i}", "hypothesis": "The dog runs.", "label": 0} for i in range(3)]
    path = mnli_file(tmp_path, [*rows, MNLI_ROWS[1]])
    train = data.build_train_data("mnli", str(path), tok, sequence_length=40, layout="padded", use_cache=False,
                                  progress=False)
    assert (train.summary.truncated, train.summary.kept) == (3, 4)
    err = capsys.readouterr().err
    assert ("warning: 3 of 4 examples are longer than the sequence length 40 and lost the end of their "
            "'premise' field; raise --sequence-length") in err
    # Half or fewer cut: the counts in the data line say it, no warning.
    data.build_train_data("mnli", str(mnli_file(tmp_path, [rows[0], *MNLI_ROWS[1:3]])), tok, sequence_length=40,
                          layout="padded", use_cache=False, progress=False)
    assert "warning:" not in capsys.readouterr().err
