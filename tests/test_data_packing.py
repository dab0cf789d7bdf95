"""Layouts and masks: packed rows, document boundaries, padding, eval batches."""

from __future__ import annotations

import numpy as np
import pytest

import gptj.data as data
from gptj.data.packing import TrainData
from tests.fixtures.data import mnli_file, tiny_tokenizer

PAD = -7


def toy(lengths, target_lengths, s, **kw):
    """A TrainData over examples whose tokens are distinct numbers (example i: 1000*i + k)."""
    tokens = np.concatenate([1000 * (i + 1) + np.arange(n) for i, n in enumerate(lengths)])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    is_target = np.concatenate([np.arange(n) >= n - t for n, t in zip(lengths, target_lengths)])
    return TrainData(tokens, offsets, is_target, s, PAD, **kw)


LENGTHS, TARGETS = [5, 3, 7, 4, 6], [2, 1, 3, 2, 2]


@pytest.mark.parametrize("keep", [False, True])
def test_packing_loses_and_duplicates_nothing(keep):
    d = toy(LENGTHS, TARGETS, s=6, keep_boundaries=keep)
    total = sum(LENGTHS)
    assert d.num_rows == -(-total // 7)
    b = d.batch(np.arange(d.num_rows))
    assert b["input_ids"].shape == (d.num_rows, 6)
    rows = np.concatenate([b["input_ids"], b["labels"][:, -1:]], axis=1)  # the S+1 row tokens
    np.testing.assert_array_equal(b["labels"][:, :-1], b["input_ids"][:, 1:])  # shifted by one
    flat = rows.reshape(-1)
    np.testing.assert_array_equal(flat[:total], d.tokens)
    assert (flat[total:] == PAD).all()
    for k, dtype in [("input_ids", np.int64), ("labels", np.int64), ("loss_mask", np.float32),
                     ("position_ids", np.int64), ("segment_ids", np.int32),
                     ("attention_mask", np.int64)]:
        assert b[k].dtype == dtype and b[k].shape == (d.num_rows, 6)


def test_loss_mask_all_is_the_reference():
    d = toy(LENGTHS, TARGETS, s=6)
    b = d.batch(np.arange(d.num_rows))
    np.testing.assert_array_equal(b["loss_mask"], (b["labels"] != PAD).astype(np.float32))
    assert (b["segment_ids"] == b["attention_mask"]).all()
    np.testing.assert_array_equal(b["position_ids"][0], np.arange(6))


def test_target_mask_covers_exactly_target_tokens_and_eos():
    d = toy(LENGTHS, TARGETS, s=6, loss_mask="target")
    b = d.batch(np.arange(d.num_rows))
    trained = sorted(b["labels"][b["loss_mask"] > 0].tolist())
    expected = sorted(t for i, (n, k) in enumerate(zip(LENGTHS, TARGETS))
                      for t in 1000 * (i + 1) + np.arange(n - k, n)
                      if t not in b["input_ids"][:, 0])  # a row's first token is never a label
    assert trained == expected


def test_boundaries_restart_positions_and_number_segments():
    d = toy([3, 4, 2], [1, 1, 1], s=5, keep_boundaries=True)
    b = d.batch([0, 1])
    # stream: A0 A1 A2 B0 B1 B2 | B3 C0 C1 pad pad pad
    np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 2, 2], [1, 2, 2, 0, 0]])
    np.testing.assert_array_equal(b["position_ids"][0], [0, 1, 2, 0, 1])
    np.testing.assert_array_equal(b["position_ids"][1][:3], [0, 0, 1])
    # A2 -> B0 crosses examples: not trained; B1 -> B2 is.
    np.testing.assert_array_equal(b["loss_mask"], [[1, 1, 0, 1, 1], [0, 1, 0, 0, 0]])
    np.testing.assert_array_equal(b["attention_mask"], b["segment_ids"] > 0)


def test_padded_layout():
    d = toy([5, 3, 7], [2, 1, 3], s=6, layout="padded", loss_mask="target")
    assert d.num_rows == 3
    b = d.batch([1, 0])
    np.testing.assert_array_equal(b["input_ids"][0], [2000, 2001, 2002, PAD, PAD, PAD])
    np.testing.assert_array_equal(b["labels"][0], [2001, 2002, PAD, PAD, PAD, PAD])
    np.testing.assert_array_equal(b["attention_mask"][0], [1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(b["segment_ids"][0], [1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(b["loss_mask"][0], [0, 1, 0, 0, 0, 0])  # only the final token
    np.testing.assert_array_equal(b["loss_mask"][1], [0, 0, 1, 1, 0, 0])
    full = d.batch([2])
    np.testing.assert_array_equal(full["labels"][0], 3001 + np.arange(6))
    assert full["attention_mask"].all()


def test_bad_options():
    with pytest.raises(ValueError, match="layout"):
        toy([3], [1], s=4, layout="ragged")
    with pytest.raises(ValueError, match="loss_mask"):
        toy([3], [1], s=4, loss_mask="some")
    with pytest.raises(IndexError):
        toy([3], [1], s=4).batch([5])


def test_real_pipeline_target_mask(tmp_path):
    """MNLI with loss_mask=target trains exactly each example's label tokens and its EOS."""
    tok = tiny_tokenizer()
    s = 32
    d = data.build_train_data("mnli", str(mnli_file(tmp_path)), tok, sequence_length=s,
                              loss_mask="target", keep_boundaries=True, use_cache=False)
    b = d.batch(np.arange(d.num_rows))
    # The reference, from the task and tokenizer alone: the stream of prompt + label + EOS
    # examples, cut into rows of s + 1 tokens, of which the first is an input only.
    task = data.load_task("mnli")
    rows, _ = data.load_examples(task, str(mnli_file(tmp_path)))
    stream, expected = [], []
    for row in rows:
        prompt = tok.encode([task.render_prompt(row)])[0]
        label = tok.encode([task.target(row)])[0] + [tok.eos_id]
        stream += prompt + label
        start = len(stream) - len(label)  # stream position of the label's first token
        expected += [t for position, t in enumerate(label, start) if position % (s + 1)]
    assert b["labels"][b["loss_mask"] > 0].tolist() == expected
    assert len(expected) >= 2 * len(rows)  # at least one label token and EOS each


def test_eval_batches_and_candidates(tmp_path):
    tok = tiny_tokenizer()
    ev = data.build_eval_data("mnli", str(mnli_file(tmp_path)), tok, use_cache=False)
    assert len(ev) == 5 and ev.labels == ["entailment", "neutral", "contradiction"]
    b = next(ev.batches(4))
    assert b["prompt_ids"].shape[0] == 4 and b["prompt_ids"].dtype == np.int64
    assert b["answers"] == ["entailment", "neutral", "contradiction", "entailment"]
    np.testing.assert_array_equal(b["label_ids"], [0, 1, 2, 0])
    task = data.load_task("mnli")
    rows, _ = data.load_examples(task, str(mnli_file(tmp_path)))
    for i in range(4):
        n = b["prompt_lengths"][i]
        assert b["prompt_ids"][i, :n].tolist() == tok.encode([task.render_prompt(rows[i])])[0]
        assert (b["prompt_ids"][i, n:] == tok.pad_id).all()
    for k, name in enumerate(ev.labels):
        assert b["candidate_ids"][k].tolist() == tok.encode([f" {name}"])[0]
        assert b["candidate_ids_eos"][k].tolist() == tok.encode([f" {name}"])[0] + [tok.eos_id]
    # prompt + candidate (with EOS) is exactly the training example
    train = data.build_train_data(task, str(mnli_file(tmp_path)), tok, 64, use_cache=False)
    first = np.concatenate([ev.prompt(0), b["candidate_ids_eos"][0]])
    np.testing.assert_array_equal(first, train.tokens[train.offsets[0]:train.offsets[1]])


def test_eval_shards_are_a_disjoint_cover(tmp_path):
    ev = data.build_eval_data("mnli", None, tiny_tokenizer(), "validation_mismatched",
                              use_cache=False)
    shards = [ev.shard(3, r) for r in range(3)]
    seen = np.concatenate([s.example_index for s in shards])
    assert sorted(seen.tolist()) == list(range(len(ev)))
    s = shards[1]
    np.testing.assert_array_equal(s.prompt(2), ev.prompt(int(s.example_index[2])))
    assert s.answers[2] == ev.answers[int(s.example_index[2])]


def test_open_ended_eval(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "Who sleeps?", "context": "The cat sleeps.", "answer": "the cat"}\n')
    ev = data.build_eval_data("qa", str(path), tiny_tokenizer(), use_cache=False)
    b = next(ev.batches(8))
    assert b["answers"] == ["the cat"] and b["label_ids"].tolist() == [-1]
    assert b["candidate_ids"] is None
