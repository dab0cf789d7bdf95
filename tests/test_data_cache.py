"""The on-disk token cache: reuse, invalidation, atomic files, no pickle."""

from __future__ import annotations

import os

import numpy as np
import pytest

import gptj.data as data
from gptj.data import cache
from tests.fixtures.data import MNLI_ROWS, mnli_file, tiny_tokenizer


class Counting:
    """Wraps a tokenizer and counts the texts it encodes."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0
        self.orig = tok.encode

    def __enter__(self):
        def counted(texts):
            self.calls += len(texts)
            return self.orig(texts)
        self.tok.encode = counted
        return self

    def __exit__(self, *exc):
        del self.tok.encode


def build(path, tok, cache_dir, **kw):
    return data.build_train_data("mnli", str(path), tok, sequence_length=32, cache_dir=cache_dir, **kw)


def test_second_load_reuses_the_cache(tmp_path):
    tok, path, root = tiny_tokenizer(), mnli_file(tmp_path), tmp_path / "cache"
    with Counting(tok) as c:
        first = build(path, tok, root)
        assert c.calls > 0
        calls = c.calls
        files = list(root.glob("train-*.npz"))
        assert len(files) == 1 and not list(root.glob("*.tmp"))
        mtime = files[0].stat().st_mtime_ns
        second = build(path, tok, root, layout="padded")  # layout is applied on read
        assert c.calls == calls and second.summary.cached
        assert files[0].stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(first.tokens, second.tokens)
    assert second.summary.kept == first.summary.kept == 5
    with np.load(files[0], allow_pickle=False) as f:  # plain arrays only
        assert {"tokens", "offsets", "is_target", "summary"} <= set(f.files)


def test_cache_key_changes_with_inputs(tmp_path):
    tok, path, root = tiny_tokenizer(), mnli_file(tmp_path), tmp_path / "cache"
    build(path, tok, root)
    with pytest.raises(data.DataError, match="no usable training rows"):  # every row too long
        data.build_train_data("mnli", str(path), tok, sequence_length=16, cache_dir=root)
    assert len(list(root.glob("train-*.npz"))) == 2  # other length
    mnli_file(tmp_path, MNLI_ROWS[:3])
    os.utime(path, ns=(1, 1))  # same name, new content and mtime
    assert build(path, tok, root).summary.kept == 3
    assert len(list(root.glob("train-*.npz"))) == 3
    data.build_train_data("mnli", str(path), "bundled:tiny", sequence_length=32, cache_dir=root)
    assert len(list(root.glob("train-*.npz"))) == 4  # other tokenizer


def test_eval_cache_and_env_override(tmp_path, monkeypatch):
    tok, path = tiny_tokenizer(), mnli_file(tmp_path)
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "env-cache"))
    a = data.build_eval_data("mnli", str(path), tok)
    with Counting(tok) as c:
        b = data.build_eval_data("mnli", str(path), tok)
        assert c.calls == 3  # only the three label continuations, not the prompts
    assert list((tmp_path / "env-cache").glob("eval-*.npz"))
    assert a.answers == b.answers and (a.label_ids == b.label_ids).all()
    np.testing.assert_array_equal(a.prompt_tokens, b.prompt_tokens)


def test_strict_rereads_when_cached_data_had_bad_rows(tmp_path):
    tok, root = tiny_tokenizer(), tmp_path / "cache"
    path = mnli_file(tmp_path, MNLI_ROWS + ['{"broken'])
    assert build(path, tok, root).summary.skipped == {"malformed": 1}
    with pytest.raises(data.DataError, match="mnli.jsonl:6: malformed"):
        build(path, tok, root, strict=True)


def test_corrupt_cache_file_is_rebuilt(tmp_path, capsys):
    tok, path, root = tiny_tokenizer(), mnli_file(tmp_path), tmp_path / "cache"
    build(path, tok, root)
    (f,) = root.glob("train-*.npz")
    f.write_bytes(b"garbage")
    assert build(path, tok, root).summary.kept == 5
    assert "unreadable cache" in capsys.readouterr().err


def test_default_cache_root(monkeypatch, tmp_path):
    monkeypatch.delenv(cache.CACHE_ENV, raising=False)
    assert cache.cache_root() == cache.Path.home() / ".cache" / "gptj-data"
    assert cache.cache_root(tmp_path) == tmp_path
