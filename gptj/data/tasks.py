"""Tasks: declarative text-to-text templates read from YAML (gptj/config/tasks.yml or a user file)."""

from __future__ import annotations

import dataclasses
import string
from pathlib import Path

import yaml

from .errors import DataError, RowProblem

BUILTIN_TASKS = Path(__file__).resolve().parents[1] / "config" / "tasks.yml"
EOS_TEXT = "<|endoftext|>"

# Label values meaning "this row has no gold label" (HF uses -1, the GLUE TSV uses "-").
_UNLABELED = {"-", "-1"}


@dataclasses.dataclass(frozen=True)
class Task:
    """A text-to-text task.

    Rows handed to the render methods are normalized rows as returned by `load_examples`:
    a dict from template field to string, the label field holding the label *name*.
    """

    name: str
    prompt_template: str
    target_template: str
    fields: dict  # template field -> tuple of candidate column paths
    label_field: str
    labels: tuple | None = None
    label_aliases: dict = dataclasses.field(default_factory=dict)
    truncate: str | None = None
    hf_dataset: str | None = None
    sample: str | None = None
    train_split: str = "train"
    eval_splits: tuple = ("validation",)
    description: str = ""

    # -- rendering ---------------------------------------------------------------------
    def render_prompt(self, row: dict) -> str:
        """Evaluation prompt: the text the model continues (MNLI: ends with "target:")."""
        return self.prompt_template.format_map(row)

    def target(self, row: dict) -> str:
        """The continuation after the prompt, exactly as trained (MNLI: " entailment")."""
        return self.target_template.format_map(row)

    def answer(self, row: dict) -> str:
        """The expected answer to compare a generation against (the label name, unpadded)."""
        return row[self.label_field]

    def render_train(self, row: dict) -> str:
        """Training text: prompt + target + <|endoftext|>."""
        return self.render_prompt(row) + self.target(row) + EOS_TEXT

    def prompt_with_span(self, row: dict) -> tuple[str, tuple[int, int] | None]:
        """The prompt and the character span of the truncatable field in it (None if none)."""
        if self.truncate is None:
            return self.render_prompt(row), None
        parts, span = [], None
        for literal, field, _, _ in string.Formatter().parse(self.prompt_template):
            parts.append(literal)
            if field is None:
                continue
            start = sum(map(len, parts))
            parts.append(row[field])
            if field == self.truncate:
                span = (start, start + len(row[field]))
        return "".join(parts), span

    @property
    def is_classification(self) -> bool:
        return self.labels is not None

    def label_id(self, row: dict) -> int:
        """Index of the row's label in `labels`, -1 for open-ended tasks."""
        return self.labels.index(row[self.label_field]) if self.labels else -1

    def spec(self) -> dict:
        """Everything that changes the produced tokens; part of the cache key."""
        d = dataclasses.asdict(self)
        d.pop("description")
        return d

    # -- row extraction -------------------------------------------------------------------
    def extract(self, record: dict) -> dict:
        """Map a raw source record to a normalized row, or raise RowProblem."""
        row = {}
        for field, columns in self.fields.items():
            value = _lookup(record, columns)
            if value is _MISSING:
                have = ", ".join(map(str, record)) or "none"
                raise RowProblem("missing_field", f"no column {' or '.join(columns)} for {field!r}; "
                                                  f"its columns: {have}")
            if field == self.label_field and self.labels is not None:
                row[field] = self._label_name(value)
                continue
            if isinstance(value, list):  # e.g. SQuAD answers.text: use the first answer
                value = value[0] if value else ""
            if value is None:
                raise RowProblem("empty_field", f"{field!r} is null")
            value = value if isinstance(value, str) else str(value)
            if not value.strip():
                raise RowProblem("empty_field", f"{field!r} is empty")
            row[field] = value
        return row

    def _label_name(self, value) -> str:
        if value is None:
            raise RowProblem("empty_field", f"{self.label_field!r} is null")
        if isinstance(value, bool):
            raise RowProblem("unknown_label", repr(value))
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, str):
            text = value.strip()
            if not text:
                raise RowProblem("empty_field", f"{self.label_field!r} is empty")
            if text in _UNLABELED:
                raise RowProblem("unlabeled", f"label {value!r}")
            if text in self.labels:
                return text
            if text in self.label_aliases:
                return self.label_aliases[text]
            if text.lstrip("-").isdigit():
                value = int(text)
            else:
                raise RowProblem("unknown_label", f"label {value!r} not in {list(self.labels)}")
        if isinstance(value, int):
            if value == -1:
                raise RowProblem("unlabeled", "label -1")
            if 0 <= value < len(self.labels):
                return self.labels[value]
        raise RowProblem("unknown_label", f"label {value!r} not in {list(self.labels)}")


_MISSING = object()


def _lookup(record: dict, columns: tuple):
    for column in columns:
        value = record
        for key in column.split("."):
            if isinstance(value, dict) and key in value:
                value = value[key]
            elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
                value = value[int(key)]
            elif isinstance(value, list) and key.isdigit():
                value = ""  # present but empty list, e.g. no answers
                break
            else:
                value = _MISSING
                break
        if value is not _MISSING:
            return value
    return _MISSING


# -- loading -----------------------------------------------------------------------------
def builtin_task_names() -> list[str]:
    return sorted(_read_yaml(BUILTIN_TASKS))


def load_task(name_or_path) -> Task:
    """A built-in task by name (gptj/config/tasks.yml) or a user task from a YAML file.

    A user file holds either one task (the keys directly) or a mapping of name -> task;
    in the latter case a path like `my_tasks.yml:name` selects one.
    """
    if isinstance(name_or_path, Task):
        return name_or_path
    spec = str(name_or_path)
    path, _, wanted = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    if path.endswith((".yml", ".yaml")):
        if not Path(path).exists():
            raise DataError(f"task file not found: {path}")
        tasks = _read_yaml(Path(path))
        if "prompt" in tasks:  # a single task in the file
            return _make_task(wanted or Path(path).stem, tasks, path)
        return _pick(tasks, wanted, path)
    return _pick(_read_yaml(BUILTIN_TASKS), spec, str(BUILTIN_TASKS))


def _pick(tasks: dict, wanted: str, where: str) -> Task:
    if not wanted:
        if len(tasks) != 1:
            raise DataError(f"{where} defines several tasks ({', '.join(tasks)}); use {where}:NAME")
        wanted = next(iter(tasks))
    if wanted not in tasks:
        raise DataError(f"unknown task {wanted!r}; {where} defines: {', '.join(sorted(tasks))}")
    return _make_task(wanted, tasks[wanted], where)


def _read_yaml(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"cannot read task file {path}: {e}") from e
    if not isinstance(data, dict):
        raise DataError(f"task file {path} must hold a mapping")
    return data


_KEYS = {"description", "prompt", "target", "fields", "label_field", "labels", "label_aliases",
         "truncate", "hf_dataset", "sample", "train_split", "eval_splits"}


def _make_task(name: str, d: dict, where: str) -> Task:
    def fail(msg):
        raise DataError(f"task {name!r} in {where}: {msg}")

    if not isinstance(d, dict):
        fail("must be a mapping")
    unknown = set(d) - _KEYS
    if unknown:
        fail(f"unknown keys {sorted(unknown)}; allowed: {sorted(_KEYS)}")
    for key in ("prompt", "target", "fields"):
        if key not in d:
            fail(f"missing {key!r}")
    fields = {}
    for field, columns in dict(d["fields"]).items():
        columns = [columns] if isinstance(columns, str) else list(columns or [])
        if not columns or not all(isinstance(c, str) and c for c in columns):
            fail(f"field {field!r} needs a column name or a list of them")
        fields[str(field)] = tuple(columns)
    prompt_fields = _template_fields(d["prompt"], fail)
    target_fields = _template_fields(d["target"], fail)
    for f in prompt_fields + target_fields:
        if f not in fields:
            fail(f"template uses {{{f}}} but 'fields' does not map it")
    label_field = d.get("label_field") or (target_fields[0] if len(target_fields) == 1 else None)
    if label_field not in target_fields:
        fail("'label_field' must name the field used in the target template")
    labels = d.get("labels")
    if labels is not None:
        if not labels or not all(isinstance(x, str) and x for x in labels):
            fail("'labels' must be a non-empty list of names, or null for open-ended answers")
        labels = tuple(labels)
    aliases = {str(k): str(v) for k, v in (d.get("label_aliases") or {}).items()}
    if labels and any(v not in labels for v in aliases.values()):
        fail("'label_aliases' must map to names in 'labels'")
    truncate = d.get("truncate")
    if truncate is not None and prompt_fields.count(truncate) != 1:
        fail(f"'truncate' ({truncate!r}) must be a field used exactly once in the prompt")
    eval_splits = d.get("eval_splits") or ["validation"]
    eval_splits = [eval_splits] if isinstance(eval_splits, str) else list(eval_splits)
    return Task(name=name, prompt_template=d["prompt"], target_template=d["target"], fields=fields,
                label_field=label_field, labels=labels, label_aliases=aliases, truncate=truncate,
                hf_dataset=d.get("hf_dataset"), sample=d.get("sample"),
                train_split=d.get("train_split", "train"), eval_splits=tuple(eval_splits),
                description=d.get("description", ""))


def _template_fields(template, fail) -> list[str]:
    if not isinstance(template, str) or not template:
        fail("templates must be non-empty strings")
    out = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        fail(f"bad template {template!r}: {e}")
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if not field.isidentifier() or spec or conversion:
            fail(f"template field {{{field}}} must be a plain name (no format spec); "
                 "write {{ and }} for literal braces")
        out.append(field)
    return out
