"""The public loading entry points: rows, training data and evaluation data."""

from __future__ import annotations

import sys

import numpy as np

from . import cache
from .encode import encode_prompts, encode_train
from .errors import DataError, LoadSummary, RowProblem
from .packing import LAYOUTS, LOSS_MASKS, EvalData, TrainData
from .sources import Source
from .tasks import Task, load_task
from .tokenizer import Tokenizer, load_tokenizer


def resolve_source(task: Task, source: str | None) -> str:
    """An explicit source, else the task's bundled sample (never an implicit download)."""
    if source:
        return str(source)
    if task.sample:
        return task.sample
    raise DataError(f"task {task.name!r} has no bundled sample; name a source "
                    f"(e.g. hf:{task.hf_dataset})" if task.hf_dataset else
                    f"task {task.name!r}: name a data source")


def require_rows(summary: LoadSummary, kind: str) -> None:
    """A load that kept nothing is an error naming the source and why every row was skipped."""
    if summary.kept > 0:
        return
    name = summary.source + (f"[{summary.split}]" if summary.split else "")
    if not summary.read:
        raise DataError(f"no usable {kind} rows in {name}: it holds no rows")
    reasons = ", ".join(f"{r} {n}" for r, n in summary.to_dict()["skipped"].items())
    first = next(iter(summary.first_seen.values()), "")
    raise DataError(f"no usable {kind} rows in {name}: {reasons} of {summary.read} read"
                    + (f" (first: {first})" if first else ""))


def read_rows(task: Task, source: Source, strict: bool,
              progress: bool = False) -> tuple[list[dict], list[str], LoadSummary]:
    """Normalized rows, their "file:line" locations, and the load counts."""
    summary = LoadSummary(source=source.name, split=source.split)
    rows, wheres = [], []
    records = source.records()
    if progress and sys.stderr.isatty():
        from tqdm import tqdm
        records = tqdm(records, desc="reading", unit="rows", delay=2.0, file=sys.stderr)
    for where, record, problem in records:
        summary.read += 1
        if problem is None:
            try:
                rows.append(task.extract(record))
                wheres.append(where)
                continue
            except RowProblem as p:
                problem = p
        summary.reject(where, problem, strict)
    summary.kept = len(rows)
    return rows, wheres, summary


def load_examples(task, source=None, split=None, strict=False,
                  verbose: bool = True) -> tuple[list[dict], LoadSummary]:
    """Rows of `source` mapped to the task's fields (label field = label name) + counts."""
    task = load_task(task)
    src = Source(resolve_source(task, source), split)
    rows, _, summary = read_rows(task, src, strict)
    if verbose:
        summary.report()
    return rows, summary


def _cache_parts(kind: str, task: Task, src: Source, tokenizer: Tokenizer, **options) -> dict:
    return {"kind": kind, "task": task.spec(), "source": src.identity(), "split": src.split,
            "tokenizer": tokenizer.identity, **options}


def tokenize_examples(task: Task, src: Source, tokenizer: Tokenizer, sequence_length: int,
                      strict: bool, progress: bool):
    """Rows, their training tokens (`Encoded`, with `kept` indexing the rows) and the counts."""
    rows, wheres, summary = read_rows(task, src, strict, progress)
    enc = encode_train(task, rows, wheres, tokenizer, sequence_length + 1, summary, strict, progress)
    return rows, enc, summary


def warn_if_mostly_cut(summary: LoadSummary, sequence_length: int, task: Task) -> None:
    warning = summary.cut_warning(sequence_length, task.truncate)
    if warning:
        print(warning, file=sys.stderr, flush=True)


def build_train_data(task, source, tokenizer, sequence_length: int, layout: str = "packed",
                     loss_mask: str = "all", keep_boundaries: bool = False, split: str = "train",
                     strict: bool = False, cache_dir=None, progress: bool = True,
                     use_cache: bool = True, verbose: bool = True) -> TrainData:
    """Load, tokenize (or reuse the cache) and lay out training data.

    An example (prompt + target + EOS) may have at most sequence_length + 1 tokens, so that
    it fits in one row; longer ones have the task's truncatable field shortened.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if loss_mask not in LOSS_MASKS:
        raise ValueError(f"loss_mask must be one of {LOSS_MASKS}, got {loss_mask!r}")
    task, tokenizer = load_task(task), load_tokenizer(tokenizer)
    src = Source(resolve_source(task, source), split)
    # The layout is applied when batches are read, so it is not part of the key.
    path = None
    if use_cache:
        key = cache.cache_key(_cache_parts("train", task, src, tokenizer,
                                           max_tokens=sequence_length + 1))
        path = cache.cache_path(cache.cache_root(cache_dir), "train", key)
        arrays = cache.load(path)
        if arrays is not None:
            summary = LoadSummary.from_dict(cache.unpack_json(arrays["summary"]))
            if not (strict and summary.num_skipped):  # strict must re-read to name the bad row
                summary.cached = True
                if verbose:
                    summary.report()
                    warn_if_mostly_cut(summary, sequence_length, task)
                require_rows(summary, "training")
                return TrainData(arrays["tokens"], arrays["offsets"], arrays["is_target"],
                                 sequence_length, tokenizer.pad_id, layout, loss_mask,
                                 keep_boundaries, summary)
    rows, enc, summary = tokenize_examples(task, src, tokenizer, sequence_length, strict, progress)
    if path is not None:
        cache.save(path, {"tokens": enc.tokens, "offsets": enc.offsets, "is_target": enc.is_target,
                          "summary": cache.pack_json(summary.to_dict())})
    if verbose:
        summary.report()
        warn_if_mostly_cut(summary, sequence_length, task)
    require_rows(summary, "training")
    return TrainData(enc.tokens, enc.offsets, enc.is_target, sequence_length, tokenizer.pad_id,
                     layout, loss_mask, keep_boundaries, summary)


def label_candidates(task: Task, tokenizer: Tokenizer):
    """Token ids of each label's continuation (" entailment"), without and with EOS."""
    if not task.is_classification:
        return None, None
    texts = [task.target({task.label_field: name}) for name in task.labels]
    plain = [np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode(texts)]
    with_eos = [np.append(ids, tokenizer.eos_id).astype(np.int64) for ids in plain]
    return plain, with_eos


def build_eval_data(task, source, tokenizer, split: str | None = None,
                    max_prompt_length: int | None = None, strict: bool = False, cache_dir=None,
                    progress: bool = True, use_cache: bool = True, verbose: bool = True) -> EvalData:
    """Load and tokenize evaluation prompts (the text up to and including "target:")."""
    task, tokenizer = load_task(task), load_tokenizer(tokenizer)
    src = Source(resolve_source(task, source), split or task.eval_splits[0])
    candidates, candidates_eos = label_candidates(task, tokenizer)
    path = None
    if use_cache:
        key = cache.cache_key(_cache_parts("eval", task, src, tokenizer,
                                           max_tokens=max_prompt_length))
        path = cache.cache_path(cache.cache_root(cache_dir), "eval", key)
        arrays = cache.load(path)
        if arrays is not None:
            summary = LoadSummary.from_dict(cache.unpack_json(arrays["summary"]))
            if not (strict and summary.num_skipped):
                summary.cached = True
                if verbose:
                    summary.report()
                require_rows(summary, "evaluation")
                answers = cache.unpack_strings(arrays["answers"], arrays["answer_offsets"])
                return EvalData(arrays["tokens"], arrays["offsets"], arrays["label_ids"], answers,
                                arrays["example_index"], task.labels, candidates, candidates_eos,
                                tokenizer.pad_id, tokenizer.eos_id, summary)
    rows, wheres, summary = read_rows(task, src, strict, progress)
    enc = encode_prompts(task, rows, wheres, tokenizer, max_prompt_length, summary, strict,
                         progress)
    kept_rows = [rows[i] for i in enc.kept]
    label_ids = np.asarray([task.label_id(r) for r in kept_rows], dtype=np.int64)
    answers = [task.answer(r) for r in kept_rows]
    example_index = np.arange(len(kept_rows), dtype=np.int64)
    if path is not None:
        buffer, answer_offsets = cache.pack_strings(answers)
        cache.save(path, {"tokens": enc.tokens, "offsets": enc.offsets, "label_ids": label_ids,
                          "answers": buffer, "answer_offsets": answer_offsets,
                          "example_index": example_index,
                          "summary": cache.pack_json(summary.to_dict())})
    if verbose:
        summary.report()
    require_rows(summary, "evaluation")
    return EvalData(enc.tokens, enc.offsets, label_ids, answers, example_index, task.labels,
                    candidates, candidates_eos, tokenizer.pad_id, tokenizer.eos_id, summary)
