"""Sources and bad data: every file format, every bad-row kind, strict mode, summaries."""

from __future__ import annotations

import csv
import json

import pytest

import gptj.data as data
from gptj.data.sources import Source, parse_hf_name
from tests.fixtures.data import MNLI_ROWS, SHARED_DATA, mnli_file, write_jsonl

LABELS = ["entailment", "neutral", "contradiction"]


def test_jsonl_rows(tmp_path):
    rows, summary = data.load_examples("mnli", mnli_file(tmp_path))
    assert len(rows) == 5
    assert rows[0] == {"premise": MNLI_ROWS[0]["premise"], "hypothesis": MNLI_ROWS[0]["hypothesis"],
                       "label": "entailment"}
    assert (summary.read, summary.kept, summary.num_skipped, summary.truncated) == (5, 5, 0, 0)


def test_csv_and_parquet_give_the_same_rows(tmp_path):
    expected, _ = data.load_examples("mnli", mnli_file(tmp_path))
    with open(tmp_path / "m.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["premise", "hypothesis", "label"])
        w.writeheader()
        w.writerows(MNLI_ROWS)
    assert data.load_examples("mnli", str(tmp_path / "m.csv"))[0] == expected
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(MNLI_ROWS), tmp_path / "m.parquet")
    assert data.load_examples("mnli", str(tmp_path / "m.parquet"))[0] == expected


def glue_tsv(path, rows):
    """The original GLUE MNLI layout: parse columns, label strings, quotes left unescaped."""
    header = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse",
              "sentence2_binary_parse", "sentence1_parse", "sentence2_parse", "sentence1",
              "sentence2", "label1", "gold_label"]
    lines = ["\t".join(header)]
    for i, (p, h, label) in enumerate(rows):
        lines.append("\t".join([str(i), "1", f"{i}e", "fiction", "( x )", "( y )", "(ROOT)",
                                "(ROOT)", p, h, label, label]))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_glue_tsv_layout(tmp_path):
    path = glue_tsv(tmp_path / "train.tsv", [
        ('He said "no.', "He spoke.", "entailment"),
        ("A cat.", "A dog.", "contradiction"),
        ("A man.", "Someone.", "-"),  # no gold label in MNLI
    ])
    rows, summary = data.load_examples("mnli", str(path))
    assert rows[0] == {"premise": 'He said "no.', "hypothesis": "He spoke.", "label": "entailment"}
    assert rows[1]["label"] == "contradiction"
    assert summary.kept == 2 and summary.skipped == {"unlabeled": 1}


BAD_LINES = [
    (b'{"premise": "P.", "hypothesis": "H.", "label": 0}', None),
    (b'{"premise": "P.", "hypothesis": "H.", "label": 0', "malformed"),
    (b'["not", "an", "object"]', "malformed"),
    (b'{"premise": "P\xff.", "hypothesis": "H.", "label": 0}', "bad_encoding"),
    (b'{"premise": "P.", "label": 0}', "missing_field"),
    (b'{"premise": "", "hypothesis": "H.", "label": 0}', "empty_field"),
    (b'{"premise": "P.", "hypothesis": "H.", "label": -1}', "unlabeled"),
    (b'{"premise": "P.", "hypothesis": "H.", "label": "-"}', "unlabeled"),
    (b'{"premise": "P.", "hypothesis": "H.", "label": "maybe"}', "unknown_label"),
    (b'{"premise": "P.", "hypothesis": "H.", "label": 1}', None),
]


def bad_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in BAD_LINES) + b"\n")
    return path


def test_every_bad_row_kind_is_counted(tmp_path):
    rows, summary = data.load_examples("mnli", str(bad_jsonl(tmp_path)))
    assert len(rows) == 2 and summary.read == len(BAD_LINES) and summary.kept == 2
    assert summary.skipped == {"malformed": 2, "bad_encoding": 1, "missing_field": 1,
                               "empty_field": 1, "unlabeled": 2, "unknown_label": 1}
    line = summary.line()
    assert "read 10, kept 2, skipped 8" in line and "unlabeled 2" in line
    assert summary.first_seen["bad_encoding"].startswith(f"{tmp_path / 'bad.jsonl'}:4")


def test_strict_raises_with_file_and_line(tmp_path):
    path = bad_jsonl(tmp_path)
    with pytest.raises(data.DataError, match=rf"{path}:2: malformed \(invalid JSON"):
        data.load_examples("mnli", str(path), strict=True)


def test_strict_names_each_reason(tmp_path):
    for i, (line, reason) in enumerate(BAD_LINES):
        if reason is None:
            continue
        path = tmp_path / f"one{i}.jsonl"
        path.write_bytes(BAD_LINES[0][0] + b"\n" + line + b"\n")
        with pytest.raises(data.DataError, match=rf"one{i}.jsonl:2: {reason}"):
            data.load_examples("mnli", str(path), strict=True)


def test_wrong_column_count_and_bad_encoding_in_tsv(tmp_path):
    path = glue_tsv(tmp_path / "t.tsv", [("A.", "B.", "neutral")])
    with open(path, "ab") as f:
        f.write(b"1\t2\t3\n")
        f.write("\t".join(["9", "1", "9e", "g", "x", "y", "p", "q", "Caf\xe9", "B.", "neutral",
                           "neutral"]).encode("latin-1") + b"\n")
    rows, summary = data.load_examples("mnli", str(path))
    assert len(rows) == 1 and summary.skipped == {"malformed": 1, "bad_encoding": 1}
    with pytest.raises(data.DataError, match=r"t.tsv:3: malformed \(expected 12 columns, got 3\)"):
        data.load_examples("mnli", str(path), strict=True)


def test_missing_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(data.DataError, match=f"data file not found: {missing}"):
        data.load_examples("mnli", str(missing))


def test_directory_of_splits_and_bundled_sample(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", MNLI_ROWS[:3])
    write_jsonl(tmp_path / "dev.jsonl", MNLI_ROWS[3:])
    assert len(data.load_examples("mnli", str(tmp_path), split="dev")[0]) == 2
    with pytest.raises(data.DataError, match="no file for split 'test'.*dev, train"):
        data.load_examples("mnli", str(tmp_path), split="test")
    sizes = {s: data.load_examples("mnli", "bundled:mnli_sample", split=s)[1].kept
             for s in ("train", "validation_matched", "validation_mismatched")}
    assert sizes == {"train": 4000, "validation_matched": 400, "validation_mismatched": 400}
    rows, _ = data.load_examples("mnli", None, split="validation_matched")  # task default
    assert {r["label"] for r in rows} == set(LABELS)


def test_hf_names():
    assert parse_hf_name("glue/mnli") == ("glue", "mnli")
    assert parse_hf_name("squad") == ("squad", None)
    assert parse_hf_name("nyu-mll/glue:mnli") == ("nyu-mll/glue", "mnli")
    assert parse_hf_name("org/name:") == ("org/name", None)
    assert Source("hf:glue/mnli", "validation_matched").hf == ("glue", "mnli")
    assert Source("glue/mnli", "validation_matched").hf == ("glue", "mnli")


def test_bundled_sample_is_reproducible(tmp_path):
    from gptj.data.bundled import HERE, make_sample
    splits = make_sample.make_sample()
    for name, rows in splits.items():
        make_sample.write_jsonl(rows, tmp_path / f"{name}.jsonl")
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (
            HERE / "mnli_sample" / f"{name}.jsonl").read_bytes()
    total = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file())
    assert total < 2_000_000


needs_shared = pytest.mark.skipif(not (SHARED_DATA / "mnli").is_dir(),
                                  reason=f"reference data not present at {SHARED_DATA}")


@needs_shared
def test_real_mnli_jsonl_counts():
    for name, count in [("validation_matched", 9815), ("validation_mismatched", 9832)]:
        rows, summary = data.load_examples("mnli", str(SHARED_DATA / "mnli" / f"{name}.jsonl"))
        assert summary.read == count and summary.kept == count and len(rows) == count
    first = json.loads((SHARED_DATA / "mnli" / "validation_matched.jsonl").open().readline())
    assert rows and data.load_examples("mnli", str(SHARED_DATA / "mnli" / "validation_matched.jsonl"))[
        0][0]["premise"] == first["premise"]


@needs_shared
def test_real_glue_tsv_counts():
    for path in sorted((SHARED_DATA / "mnli" / "glue_tsv").glob("*.tsv")):
        rows, summary = data.load_examples("mnli", str(path), strict=True)
        assert summary.read == 48 and len(rows) == 48
        assert {r["label"] for r in rows} <= set(LABELS)


def test_a_csv_field_over_128_kib_is_read_like_a_jsonl_line(tmp_path):
    """The csv module's default field limit (128 KiB) raised _csv.Error out of the loader; the
    long row is read, and truncated or counted when tokenized, as the same row in JSONL is."""
    long_premise = "A cat sleeps on the mat. " * 6000  # 150 000 characters
    rows = [MNLI_ROWS[0], {**MNLI_ROWS[1], "premise": long_premise}, MNLI_ROWS[2]]
    with open(tmp_path / "long.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["premise", "hypothesis", "label"])
        w.writeheader()
        w.writerows(rows)
    write_jsonl(tmp_path / "long.jsonl", rows)
    from_csv, summary = data.load_examples("mnli", str(tmp_path / "long.csv"))
    assert from_csv == data.load_examples("mnli", str(tmp_path / "long.jsonl"))[0]
    assert summary.kept == 3 and from_csv[1]["premise"] == long_premise
    assert csv.field_size_limit() == 128 * 1024  # the process-wide limit is left as it was
    train = data.build_train_data("mnli", str(tmp_path / "long.csv"), "bundled:tiny", 32, use_cache=False,
                                  progress=False, verbose=False)
    assert (train.summary.kept, train.summary.truncated) == (3, 1)  # its premise cut to fit
