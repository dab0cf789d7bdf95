"""Sources: where raw records come from (local files, bundled samples, Hugging Face datasets).

Every reader yields `(where, record_or_None, problem_or_None)` where `where` is "file:line"
(or "dataset[split]:row") so that a bad row can be named precisely.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path

from .errors import DataError, RowProblem

FILE_FORMATS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
_SURROGATE = re.compile("[\udc80-\udcff]")  # undecodable bytes under errors="surrogateescape"


class Source:
    """A resolved source: a local file, or a Hugging Face dataset split."""

    def __init__(self, spec: str, split: str | None):
        spec, picked = split_at(spec)
        self.spec = spec
        self.split = picked or split
        self.path: Path | None = None
        self.hf: tuple[str, str | None] | None = None
        self._hf_data = None
        self._resolve()

    @property
    def name(self) -> str:
        return self.spec

    def _resolve(self) -> None:
        spec = self.spec
        if spec.startswith("bundled:"):
            from . import bundled
            self.path = self._in_directory(bundled.sample_dir(spec[len("bundled:"):]))
        elif spec.startswith("hf:"):
            self.hf = parse_hf_name(spec[3:])
        elif Path(spec).expanduser().is_dir():
            self.path = self._in_directory(Path(spec).expanduser())
        elif Path(spec).expanduser().is_file():
            self.path = Path(spec).expanduser()
            self.split = None  # a single file is a single split
        elif looks_like_path(spec):
            raise DataError(f"data file not found: {spec}")
        else:
            self.hf = parse_hf_name(spec)
        if self.path is not None and self.path.suffix.lower() not in FILE_FORMATS:
            raise DataError(f"unsupported data file type {self.path.suffix!r} for {self.path}; "
                            f"use one of {', '.join(FILE_FORMATS)}")

    def _in_directory(self, directory: Path) -> Path:
        """A directory holds one file per split: train.jsonl, validation_matched.tsv, ..."""
        split = self.split or "train"
        self.split = split
        for ext in FILE_FORMATS:
            candidate = directory / f"{split}{ext}"
            if candidate.is_file():
                return candidate
        files = sorted(p for p in directory.iterdir() if p.suffix.lower() in FILE_FORMATS and p.is_file())
        if not files:
            raise DataError(f"no file for split {split!r} in {directory}: it holds no "
                            f"{' / '.join(FILE_FORMATS)} file")
        shown = ", ".join(p.name for p in files[:10]) + (f" and {len(files) - 10} more" if len(files) > 10 else "")
        stems = ", ".join(dict.fromkeys(p.stem for p in files))
        raise DataError(f"no file for split {split!r} in {directory}: it holds {shown} "
                        f"(splits: {stems}; pick one with {directory}@SPLIT)")

    def identity(self) -> dict:
        """What makes this source's content unique; part of the cache key."""
        if self.path is not None:
            st = self.path.stat()
            return {"path": str(self.path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        data = self._load_hf()
        return {"hf": list(self.hf), "split": self.split,
                "fingerprint": getattr(data, "_fingerprint", None), "rows": len(data)}

    def records(self) -> Iterator[tuple[str, dict | None, RowProblem | None]]:
        if self.path is None:
            yield from _hf_records(self._load_hf(), f"{self.spec}[{self.split}]")
            return
        suffix = self.path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            yield from _jsonl_records(self.path)
        elif suffix in (".csv", ".tsv"):
            yield from _delimited_records(self.path, "\t" if suffix == ".tsv" else ",")
        else:
            yield from _parquet_records(self.path)

    def _load_hf(self):
        if self._hf_data is None:
            if not self.split:
                raise DataError(f"Hugging Face source {self.spec} needs a split")
            try:
                import datasets
            except ImportError as e:
                raise DataError("loading a Hugging Face dataset needs the `datasets` package") from e
            name, config = self.hf
            try:
                self._hf_data = datasets.load_dataset(name, config, split=self.split)
            except Exception as e:  # the library raises many types; report them uniformly
                raise DataError(f"cannot load Hugging Face dataset {name!r} (config {config!r}, "
                                f"split {self.split!r}): {e}") from e
        return self._hf_data


def split_at(spec: str) -> tuple[str, str | None]:
    """"SOURCE@SPLIT" -> (SOURCE, SPLIT); anything else (an existing path with an "@" in its
    name too) -> (spec, None)."""
    source, at, split = str(spec).rpartition("@")
    if not at or not source or not split or "/" in split or Path(spec).expanduser().exists():
        return str(spec), None
    return source, split


def looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or Path(spec).suffix.lower() in FILE_FORMATS


def parse_hf_name(name: str) -> tuple[str, str | None]:
    """`name`, `name/config` (GLUE style, e.g. glue/mnli) or `org/name:config`."""
    if ":" in name:
        path, config = name.split(":", 1)
        return path, config or None
    if name.count("/") == 1:
        path, config = name.split("/")
        return path, config
    return name, None


def _jsonl_records(path: Path):
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, None, RowProblem("bad_encoding", str(e))
                continue
            try:
                record = json.loads(text)
            except ValueError as e:
                yield where, None, RowProblem("malformed", f"invalid JSON: {e}")
                continue
            if not isinstance(record, dict):
                yield where, None, RowProblem("malformed", "line is not a JSON object")
                continue
            yield where, record, None


# The csv module refuses fields over 128 KiB by default; a JSONL line has no such limit, and a
# long row is then truncated or counted as too_long when tokenized, whatever its file format.
CSV_FIELD_LIMIT = 2**31 - 1


def _delimited_records(path: Path, delimiter: str):
    limit = csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        yield from _delimited_rows(path, delimiter)
    finally:
        csv.field_size_limit(limit)


def _delimited_rows(path: Path, delimiter: str):
    # GLUE TSV files contain unbalanced quotes inside sentences: TSV is read without quoting.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{path}:1: cannot read the header: {e}") from None
        if header and header[0].startswith("\ufeff"):
            header[0] = header[0][1:]
        if any(_SURROGATE.search(h) for h in header):
            raise DataError(f"{path}:1: header is not valid UTF-8")
        failed_at = None
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as e:  # this row is unusable, the next ones may not be
                if reader.line_num == failed_at:  # nothing more was read: the file ends here
                    raise DataError(f"{path}:{reader.line_num}: {e}") from None
                failed_at = reader.line_num
                yield f"{path}:{reader.line_num}", None, RowProblem("malformed", str(e))
                continue
            where = f"{path}:{reader.line_num}"
            if not cells or cells == [""]:
                continue
            if any(_SURROGATE.search(c) for c in cells):
                yield where, None, RowProblem("bad_encoding", "not valid UTF-8")
            elif len(cells) != len(header):
                yield where, None, RowProblem(
                    "malformed", f"expected {len(header)} columns, got {len(cells)}")
            else:
                yield where, dict(zip(header, cells)), None


def _parquet_records(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError("reading .parquet files needs the `pyarrow` package") from e
    try:
        table = pq.read_table(path)
    except Exception as e:  # arrow raises several error types for broken files
        raise DataError(f"cannot read parquet file {path}: {e}") from e
    for i, record in enumerate(table.to_pylist()):
        yield f"{path}:row {i}", record, None


def _hf_records(data, name: str):
    for i, record in enumerate(data):
        yield f"{name}:row {i}", record, None
