"""The data of a fine-tuning run: the training rows, the evaluation splits and where they come
from, tokenized once by rank 0 (the other ranks read its cache)."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import numpy as np
import torch

import gptj.data as datalib
from gptj.execution.runtime.distributed import barrier
from gptj.execution.training.config import FinetuneConfig


def wants_eval(config: FinetuneConfig) -> bool:
    return config.eval.at_end or config.eval.every > 0


def eval_sources(config: FinetuneConfig, task) -> list[tuple[str, str, str | None]]:
    """(display name, source, split) of every evaluation split.

    Entries are "SOURCE" (a file: that file; otherwise the task's eval splits of it) or
    "SOURCE@SPLIT". Without entries: the task's eval splits of the training source. Names are
    plain split names when there is one entry, "SOURCE@SPLIT" when there are several.
    """
    from gptj.data.sources import split_at

    # The training source's own split ("DIR@train_sample") is not what evaluation reads.
    default_source = split_at(config.data.dataset)[0] if config.data.dataset else task.sample
    entries = config.data.eval_datasets or [default_source or ""]
    out = []
    for entry in entries:
        source, at, split = entry.rpartition("@")
        if not at:
            source, split = entry, ""
        source = source or default_source or ""
        if split:
            splits = [split]
        elif Path(source).expanduser().is_file():
            out.append((Path(source).stem, source, None))
            continue
        else:
            splits = list(task.eval_splits)
        for name in splits:
            out.append((name if len(entries) == 1 else f"{source}@{name}", source, name))
    return out


def check_data_sources(config: FinetuneConfig) -> None:
    """Every training and evaluation source of a fine-tuning config can be found (files are
    looked up, nothing is read or downloaded); raises data.DataError naming the missing one."""
    from gptj.data.pipeline import resolve_source
    from gptj.data.sources import Source

    task = datalib.load_task(config.data.task)
    Source(resolve_source(task, config.data.dataset), task.train_split)
    if config.eval.at_end or config.eval.every > 0:
        for _, source, split in eval_sources(config, task):
            Source(resolve_source(task, source), split or task.eval_splits[0])


def evaluated_on_training_rows(config: FinetuneConfig, task) -> list[str]:
    """Names of the evaluation splits that read the very file the model trains on."""
    if not wants_eval(config):
        return []
    from gptj.data.pipeline import resolve_source
    from gptj.data.sources import Source

    def where(source, split):
        src = Source(resolve_source(task, source), split)
        return src.path.resolve() if src.path is not None else (src.spec, src.split)

    trained = where(config.data.dataset, task.train_split)
    return [name for name, source, split in eval_sources(config, task)
            if where(source, split or task.eval_splits[0]) == trained]


def load_run_data(config: FinetuneConfig, task, tokenizer, max_positions: int, main: bool):
    """(training data, {split name: evaluation data}); collective: rank 0 tokenizes first."""

    def load(progress: bool):
        d = config.data
        train = datalib.build_train_data(
            task, d.dataset, tokenizer, d.sequence_length, layout=d.layout, loss_mask=d.loss_mask,
            keep_boundaries=d.keep_boundaries, split=task.train_split, strict=d.strict,
            cache_dir=d.cache_dir, progress=progress)
        evals = {name: datalib.build_eval_data(task, source, tokenizer, split,
                                               max_prompt_length=max_positions - 8, strict=d.strict,
                                               cache_dir=d.cache_dir, progress=progress)
                 for name, source, split in eval_sources(config, task)} if wants_eval(config) else {}
        return train, evals

    if main:
        loaded = load(True)
        for name in evaluated_on_training_rows(config, task):
            print(f"warning: evaluation split {name} is the training data itself (no held-out data "
                  "given): its accuracy shows fit, not generalisation; name held-out data with "
                  "--eval-dataset", file=sys.stderr)
    barrier("rank 0 prepares the data")
    if not main:
        with contextlib.redirect_stderr(io.StringIO()):  # the data summary: printed by rank 0
            loaded = load(False)
    return loaded


def to_device(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device, non_blocking=True)
            for k, v in batch.items()}
