"""Rendering + batched tokenization of normalized rows into flat token streams.

Each example is tokenized as one text (prompt + target, so token boundaries are those the
tokenizer gives the whole string) and EOS is appended by id. When an example is too long,
the task's truncatable field loses tokens from its end; the target is never cut.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np

from .errors import LoadSummary, RowProblem
from .tasks import Task
from .tokenizer import Tokenizer

CHUNK = 1024  # rows per encode_batch call: large enough for the Rust thread pool


@dataclasses.dataclass
class Encoded:
    """Concatenated token ids of the kept examples; example i is tokens[offsets[i]:offsets[i+1]]."""

    tokens: np.ndarray     # int32 [N]
    offsets: np.ndarray    # int64 [num_examples + 1]
    is_target: np.ndarray  # uint8 [N]: 1 for target tokens and the final EOS (train only)
    kept: np.ndarray       # int64: index of each kept example in the input rows


def encode_train(task: Task, rows: list[dict], wheres: list[str], tokenizer: Tokenizer,
                 max_tokens: int, summary: LoadSummary, strict: bool, progress: bool) -> Encoded:
    """Tokenize prompt + target + EOS per row, each example at most `max_tokens` tokens."""
    return _encode(task, rows, wheres, tokenizer, max_tokens, summary, strict, progress,
                   with_target=True)


def encode_prompts(task: Task, rows: list[dict], wheres: list[str], tokenizer: Tokenizer,
                   max_tokens: int | None, summary: LoadSummary, strict: bool,
                   progress: bool) -> Encoded:
    """Tokenize evaluation prompts (no target, no EOS), each at most `max_tokens` tokens."""
    return _encode(task, rows, wheres, tokenizer, max_tokens, summary, strict, progress,
                   with_target=False)


def _encode(task, rows, wheres, tokenizer, max_tokens, summary, strict, progress, with_target):
    pieces, flags, kept = [], [], []
    target_ids: dict[str, list[int]] = {}  # few distinct targets for classification tasks
    bar = _progress(len(rows), progress, "tokenizing")
    for start in range(0, len(rows), CHUNK):
        chunk = rows[start:start + CHUNK]
        prompts, spans = zip(*(task.prompt_with_span(r) for r in chunk))
        targets = [task.target(r) for r in chunk] if with_target else [""] * len(chunk)
        texts = [p + t for p, t in zip(prompts, targets)]
        new = sorted({t for t in targets if t not in target_ids})
        target_ids.update(zip(new, tokenizer.encode(new)))
        for j, ids in enumerate(tokenizer.encode(texts)):
            extra = 1 if with_target else 0  # the EOS appended below
            too_long = max_tokens is not None and len(ids) + extra > max_tokens
            n_target = len(target_ids[targets[j]])
            # The target's own tokens ending the example mean a clean prompt/target boundary;
            # otherwise (or to truncate) character offsets tell which tokens are which.
            offsets = None
            if too_long or (with_target and ids[len(ids) - n_target:] != target_ids[targets[j]]):
                offsets = tokenizer.encode_with_offsets([texts[j]])[0].offsets
                n_target = _count_target_tokens(offsets, len(prompts[j])) if with_target else 0
            if too_long:
                try:
                    ids = _truncate(ids, offsets, spans[j], len(ids) + extra - max_tokens,
                                    task.truncate, max_tokens)
                except RowProblem as problem:
                    summary.unkeep(wheres[start + j], problem, strict)
                    continue
                summary.truncated += 1
            if with_target:
                ids = ids + [tokenizer.eos_id]
                flags.append(n_target + 1)
            pieces.append(ids)
            kept.append(start + j)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.fromiter((t for p in pieces for t in p), dtype=np.int32, count=int(offsets[-1]))
    is_target = np.zeros(len(tokens), dtype=np.uint8)
    if with_target and flags:
        # Mark the last n_target tokens of each example: the target and its EOS.
        n_target = np.asarray(flags, dtype=np.int64)
        marks = np.zeros(len(tokens) + 1, dtype=np.int64)
        np.add.at(marks, offsets[1:] - n_target, 1)
        np.add.at(marks, offsets[1:], -1)
        is_target[:] = np.cumsum(marks[:-1]) > 0
    return Encoded(tokens, offsets, is_target, np.asarray(kept, dtype=np.int64))


def _count_target_tokens(offsets, prompt_chars: int) -> int:
    """Tokens reaching past the prompt's end belong to the target (a token that straddles
    the boundary carries target characters, so it must be predicted too)."""
    n = 0
    for _, end in reversed(offsets):
        if end <= prompt_chars:
            break
        n += 1
    return n


def _truncate(ids, offsets, span, excess, field, max_tokens):
    """Drop `excess` tokens from the end of the truncatable field's tokens."""
    if span is None:
        raise RowProblem("too_long", f"{len(ids)} tokens > limit {max_tokens} and the task "
                                     "has no truncatable field")
    lo, hi = span
    inside = [i for i, (s, e) in enumerate(offsets) if s < hi and e > lo]
    if len(inside) <= excess:  # even an empty field would not fit: do not keep a husk
        raise RowProblem("too_long", f"needs {len(ids) - len(inside)} tokens without "
                                     f"{field!r}; limit {max_tokens}")
    first, last = inside[0], inside[-1] + 1
    keep = last - first - excess
    return ids[:first + keep] + ids[last:]


def _progress(total: int, enabled: bool, desc: str):
    if not enabled or not total or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="rows", delay=2.0, file=sys.stderr)
