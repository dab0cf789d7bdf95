"""Load errors and the per-load bookkeeping of kept and skipped rows."""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter

from gptj.errors import GPTJError


class DataError(GPTJError):
    """A data source cannot be used: missing file, bad task file, or a bad row in strict mode."""


class RowProblem(GPTJError):
    """One row cannot be used; `reason` is a short key counted in the load summary."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# Keys used in LoadSummary.skipped, in the order they are reported.
SKIP_REASONS = (
    "bad_encoding",   # line is not valid UTF-8
    "malformed",      # bad JSON, wrong column count, not an object
    "missing_field",  # a template field has no column in the row
    "empty_field",    # a template field is empty or whitespace only
    "unlabeled",      # label -1 or "-" (MNLI rows without a gold label)
    "unknown_label",  # label not among the task's label names or ids
    "too_long",       # does not fit even after truncating the truncatable field
)


@dataclasses.dataclass
class LoadSummary:
    """Counts for one load: rows read, kept, skipped by reason, truncated."""

    source: str = ""
    split: str | None = None
    read: int = 0
    kept: int = 0
    truncated: int = 0
    skipped: Counter = dataclasses.field(default_factory=Counter)
    # First occurrence of each skip reason, "file:line: detail", to help fix the data.
    first_seen: dict = dataclasses.field(default_factory=dict)
    cached: bool = False

    def reject(self, where: str, problem: RowProblem, strict: bool) -> None:
        """Count a bad row, or raise DataError in strict mode."""
        message = f"{where}: {problem.reason}" + (f" ({problem.detail})" if problem.detail else "")
        if strict:
            raise DataError(message)
        self.skipped[problem.reason] += 1
        self.first_seen.setdefault(problem.reason, message)

    def unkeep(self, where: str, problem: RowProblem, strict: bool) -> None:
        """A row kept at read time is dropped later (e.g. too long to tokenize)."""
        self.reject(where, problem, strict)
        self.kept -= 1

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def line(self) -> str:
        name = self.source + (f"[{self.split}]" if self.split else "")
        reasons = ", ".join(f"{r} {self.skipped[r]}" for r in _ordered(self.skipped))
        text = (f"data: {name}: read {self.read}, kept {self.kept}, skipped {self.num_skipped}"
                + (f" ({reasons})" if reasons else "") + f", truncated {self.truncated}")
        return text + (" [cached]" if self.cached else "")

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "split": self.split,
            "read": self.read,
            "kept": self.kept,
            "skipped": {r: self.skipped[r] for r in _ordered(self.skipped)},
            "truncated": self.truncated,
            "first_seen": dict(self.first_seen),
        }

    @classmethod
    def from_dict(cls, d: dict) -> LoadSummary:
        return cls(source=d["source"], split=d["split"], read=d["read"], kept=d["kept"],
                   truncated=d["truncated"], skipped=Counter(d["skipped"]),
                   first_seen=dict(d.get("first_seen", {})))

    def report(self) -> None:
        print(self.line(), file=sys.stderr, flush=True)

    def cut_warning(self, sequence_length: int, field: str | None) -> str | None:
        """A warning when most examples did not fit the sequence (truncated, or dropped as
        too_long): the model would train on cut text without anyone noticing."""
        cut = self.truncated + self.skipped.get("too_long", 0)
        examples = self.kept + self.skipped.get("too_long", 0)
        if not examples or cut * 2 <= examples:
            return None
        if field is None:
            what = "were dropped"
        else:
            what = f"lost the end of their {field!r} field"
            if self.skipped.get("too_long"):
                what += f" ({self.skipped['too_long']} dropped, too long even so)"
        return (f"warning: {cut} of {examples} examples are longer than the sequence length {sequence_length} "
                f"and {what}; raise --sequence-length (data.sequence_length) to train on them whole")


def _ordered(skipped: Counter) -> list[str]:
    known = [r for r in SKIP_REASONS if skipped.get(r)]
    return known + sorted(r for r in skipped if r not in SKIP_REASONS and skipped[r])
