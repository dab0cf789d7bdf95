"""Turning token streams into numpy batches: packed or padded training rows, eval prompts."""

from __future__ import annotations

import numpy as np

from .errors import LoadSummary

LAYOUTS = ("packed", "padded")
LOSS_MASKS = ("all", "target")


class TrainData:
    """Tokenized training examples, laid out as rows of `sequence_length + 1` tokens.

    packed: the examples (each ending with EOS) are concatenated and cut into consecutive
        rows; the last row is padded. With `keep_boundaries`, position ids restart at 0 at
        every example start and at every row start, and segment ids number the examples in a
        row from 1, so attention can be kept within an example.
    padded: row i holds example i alone, right-padded.
    The batch's inputs are row[:-1] and its labels row[1:].
    """

    def __init__(self, tokens, offsets, is_target, sequence_length: int, pad_id: int,
                 layout: str = "packed", loss_mask: str = "all", keep_boundaries: bool = False,
                 summary: LoadSummary | None = None):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if loss_mask not in LOSS_MASKS:
            raise ValueError(f"loss_mask must be one of {LOSS_MASKS}, got {loss_mask!r}")
        if sequence_length < 1:
            raise ValueError("sequence_length must be positive")
        self.tokens = np.asarray(tokens, dtype=np.int32)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.is_target = np.asarray(is_target, dtype=np.uint8)
        self.sequence_length = sequence_length
        self.pad_id = pad_id
        self.layout = layout
        self.loss_mask = loss_mask
        self.keep_boundaries = keep_boundaries
        self.summary = summary if summary is not None else LoadSummary()

    @property
    def num_examples(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_rows(self) -> int:
        if self.layout == "padded":
            return self.num_examples
        row = self.sequence_length + 1
        return -(-self.num_tokens // row)

    def __len__(self) -> int:
        return self.num_rows

    def rows(self, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Token positions of the given rows in the stream: (positions [B, S+1], valid, example)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_rows):
            raise IndexError(f"row index out of range [0, {self.num_rows})")
        span = np.arange(self.sequence_length + 1, dtype=np.int64)
        if self.layout == "padded":
            start = self.offsets[idx]
            length = self.offsets[idx + 1] - start
            pos = start[:, None] + span
            valid = span[None, :] < length[:, None]
            example = np.broadcast_to(idx[:, None], pos.shape)
        else:
            pos = idx[:, None] * (self.sequence_length + 1) + span
            valid = pos < self.num_tokens
            example = np.searchsorted(self.offsets, np.minimum(pos, self.num_tokens - 1),
                                      side="right") - 1
        return pos, valid, example

    def batch(self, indices) -> dict[str, np.ndarray]:
        """A training batch; see the package docstring for the keys and their meaning."""
        pos, valid, example = self.rows(indices)
        safe = np.where(valid, pos, 0)
        ids = np.where(valid, self.tokens[safe] if self.num_tokens else 0, self.pad_id)
        target = valid & (self.is_target[safe] > 0 if self.num_tokens else False)
        s = self.sequence_length
        if self.layout == "packed" and self.keep_boundaries:
            segment = (example - example[:, :1] + 1).astype(np.int32)
            row_start = pos[:, :1]
            position = pos - np.maximum(self.offsets[example], row_start)
        else:
            segment = np.ones(pos.shape, dtype=np.int32)
            position = np.broadcast_to(np.arange(s + 1, dtype=np.int64), pos.shape)
        segment = np.where(valid, segment, 0).astype(np.int32)
        if self.loss_mask == "target":
            mask = target[:, 1:]
        else:
            mask = valid[:, 1:]
        # A label from the next example (after an EOS) cannot be predicted within the example.
        mask = mask & (segment[:, 1:] == segment[:, :-1])
        return {
            "input_ids": ids[:, :-1].astype(np.int64),
            "labels": ids[:, 1:].astype(np.int64),
            "loss_mask": mask.astype(np.float32),
            "position_ids": np.ascontiguousarray(position[:, :-1], dtype=np.int64),
            "segment_ids": np.ascontiguousarray(segment[:, :-1]),
            "attention_mask": (segment[:, :-1] > 0).astype(np.int64),
        }


class EvalData:
    """Tokenized evaluation prompts with their expected answers.

    For classification tasks `candidates[k]` holds the token ids of the k-th label's
    continuation (e.g. " entailment") and `candidates_eos[k]` the same followed by EOS, so a
    label can be scored by its likelihood after the prompt.
    """

    def __init__(self, prompt_tokens, prompt_offsets, label_ids, answers, example_index,
                 labels, candidates, candidates_eos, pad_id: int, eos_id: int,
                 summary: LoadSummary | None = None):
        self.prompt_tokens = np.asarray(prompt_tokens, dtype=np.int32)
        self.prompt_offsets = np.asarray(prompt_offsets, dtype=np.int64)
        self.label_ids = np.asarray(label_ids, dtype=np.int64)
        self.answers = list(answers)
        self.example_index = np.asarray(example_index, dtype=np.int64)
        self.labels = list(labels) if labels is not None else None
        self.candidates = candidates
        self.candidates_eos = candidates_eos
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.summary = summary if summary is not None else LoadSummary()

    def __len__(self) -> int:
        return len(self.prompt_offsets) - 1

    def prompt(self, i: int) -> np.ndarray:
        return self.prompt_tokens[self.prompt_offsets[i]:self.prompt_offsets[i + 1]].astype(np.int64)

    @property
    def prompt_lengths(self) -> np.ndarray:
        return np.diff(self.prompt_offsets)

    def batch(self, indices) -> dict:
        """Prompts of the given examples, right-padded to the longest one in the batch."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        lengths = self.prompt_lengths[idx]
        width = int(lengths.max()) if idx.size else 0
        span = np.arange(width, dtype=np.int64)
        pos = self.prompt_offsets[idx][:, None] + span
        valid = span[None, :] < lengths[:, None]
        ids = np.where(valid, self.prompt_tokens[np.where(valid, pos, 0)] if width else 0,
                       self.pad_id)
        return {
            "prompt_ids": ids.astype(np.int64),
            "prompt_lengths": lengths.astype(np.int64),
            "label_ids": self.label_ids[idx],
            "answers": [self.answers[i] for i in idx],
            "example_index": self.example_index[idx],
            "candidate_ids": self.candidates,
            "candidate_ids_eos": self.candidates_eos,
        }

    def batches(self, batch_size: int):
        """Consecutive batches of at most `batch_size` examples, in order."""
        for start in range(0, len(self), batch_size):
            yield self.batch(np.arange(start, min(start + batch_size, len(self))))

    def shard(self, num_replicas: int, replica_index: int) -> EvalData:
        """Every `num_replicas`-th example starting at `replica_index` (a disjoint cover);
        `example_index` lets the results be put back in order."""
        if not 0 <= replica_index < num_replicas:
            raise ValueError(f"replica_index {replica_index} not in [0, {num_replicas})")
        idx = np.arange(replica_index, len(self), num_replicas)
        return self.select(idx)

    def select(self, idx) -> EvalData:
        idx = np.asarray(idx, dtype=np.int64)
        lengths = self.prompt_lengths[idx]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        pieces = [self.prompt_tokens[self.prompt_offsets[i]:self.prompt_offsets[i + 1]] for i in idx]
        tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
        return EvalData(tokens, offsets, self.label_ids[idx], [self.answers[i] for i in idx],
                        self.example_index[idx], self.labels, self.candidates,
                        self.candidates_eos, self.pad_id, self.eos_id, self.summary)
