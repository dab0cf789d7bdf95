"""Classify with any task that has labels: a built-in task, a user's task YAML, or the task a
fine-tuning run was trained on (read from its saved config).

    from gptj.execution.inference.classification import ClassificationPipeline
    clf = ClassificationPipeline.from_pretrained("runs/sentiment")        # the run's own task
    clf({"text": "the film was great"})
    # -> {"label": "positive", "probabilities": {...}, "log_likelihoods": {...}}
    ClassificationPipeline.from_pretrained("EleutherAI/gpt-j-6b", task="sst2")

Each label's continuation is the task's target with that label followed by EOS, exactly as
trained (and as evaluation scores it). Every label of a row is scored from one prefill of the
row's prompt (gptj.execution.inference.scoring.choose):

- `log_likelihoods`: log p(label tokens + EOS | prompt), summed;
- `probabilities`: the probability the model answers each label when it must answer with one
  of them (token by token, renormalised over the labels' next tokens); they sum to 1;
- `label`: the most probable one.

Prompts that start alike (a few-shot prompt's demonstrations) share their KV through a prefix
cache of the pipeline's own (`prefix_cache`, PREFIX_CACHE_BYTES at most; False: off): only
the part after the shared full blocks runs. The cache assumes the weights stay as they are:
after changing them, `clf.prefix_cache.clear()`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from gptj.execution.inference.prefix_cache import DEFAULT_BLOCK_SIZE, PrefixCache
from gptj.execution.inference.scoring import PrefixReuse, candidate_logprobs, choose

# A pipeline's own prefix cache: at most this many bytes of prompt KV (GPT-J 6B's KV takes
# 0.46 MB a token in bf16, 0.92 in fp32: 1 GiB holds a 5-shot MNLI prefix several times over).
PREFIX_CACHE_BYTES = 1 << 30


def run_directory(model_or_run: str) -> Path | None:
    """The fine-tuning run directory behind a model path (the run itself, or a run's hf/ or
    adapter/ export), or None when the path is not part of a run."""
    path = Path(str(model_or_run)).expanduser()
    for candidate in (path, path.parent):
        if (candidate / "config.yaml").is_file() or (candidate / "checkpoints").is_dir():
            return candidate
    return None


def trained_task_spec(run: Path) -> str | None:
    """The task (a built-in name or a task file) the run was trained on: from the config the run
    keeps (config.yaml), else from its newest checkpoint's."""
    try:
        if (run / "config.yaml").is_file():
            return yaml.safe_load((run / "config.yaml").read_text())["data"]["task"]
        metas = sorted((run / "checkpoints").glob("*/meta.json"))
        return json.loads(metas[-1].read_text())["config"]["data"]["task"] if metas else None
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return None


def load_trained_task(run: Path, spec: str):
    """The run's task: a built-in name, or its task file found as recorded, from the run's
    parent directory or next to the run."""
    import gptj.data as data

    if not str(spec).endswith((".yml", ".yaml")) and ":" not in str(spec):
        return data.load_task(spec)
    path = Path(str(spec).partition(":")[0] if ":" in str(spec) and not Path(spec).exists() else spec)
    for where in (path, run.parent / path, run / path.name):
        if where.is_file():
            return data.load_task(str(where) + str(spec)[len(str(path)):])
    raise ValueError(f"run {run} was trained on task file {spec}, which is not found; pass task=NAME_OR_YAML")


def resolve_task(model_or_run: str | None, task):
    """(task, trained task name or None): `task` when given, else the task of the run behind
    `model_or_run`. No task at all is a ValueError in one line."""
    import gptj.data as data

    run = run_directory(model_or_run) if model_or_run is not None else None
    spec = trained_task_spec(run) if run is not None else None
    trained = load_trained_task(run, spec) if spec is not None and task is None else None
    if task is not None:
        chosen = data.load_task(task)
        return chosen, _trained_name(run, spec)
    if trained is None:
        raise ValueError(f"{model_or_run} is not a fine-tuning run with a saved config: name the task "
                         "(task='sst2' or a task YAML file)")
    return trained, trained.name


def check_trained_task(model_or_run: str, wanted: str) -> None:
    """A ValueError in one line when `model_or_run` is a run fine-tuned on a task other than
    `wanted` (a pipeline that classifies with `wanted`'s labels unless told otherwise)."""
    run = run_directory(model_or_run)
    spec = trained_task_spec(run) if run is not None else None
    trained = _trained_name(run, spec)
    if trained is not None and trained != wanted:
        raise ValueError(f"{model_or_run} was fine-tuned on task {trained!r}, not {wanted!r}: classify with "
                         f"ClassificationPipeline.from_pretrained({str(model_or_run)!r}), or pass "
                         f"task={wanted!r} to use {wanted}'s labels anyway")


def _trained_name(run, spec) -> str | None:
    if spec is None:
        return None
    return Path(str(spec).partition(":")[0]).stem if str(spec).endswith((".yml", ".yaml")) else str(spec)


class ClassificationPipeline:
    """Label rows of a task by likelihood, every label from one prefill of the row's prompt."""

    def __init__(self, model, tokenizer, task="mnli", batch_size: int = 8, adapters=None,
                 prefix_cache: PrefixCache | bool = True):
        import gptj.data as data

        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        if prefix_cache is True:
            prefix_cache = PrefixCache(DEFAULT_BLOCK_SIZE, max_bytes=PREFIX_CACHE_BYTES)
        self.prefix_cache: PrefixCache | None = prefix_cache if isinstance(prefix_cache, PrefixCache) else None
        self.adapters = adapters  # gptj.model.multi_lora.MultiLoRA: `adapter=` of a call chooses one
        self.task = data.load_task(task)
        if not self.task.labels:
            raise ValueError(f"task {self.task.name} has no labels to classify with (labels: null)")
        self.labels = list(self.task.labels)
        self.label_ids = self.encode_labels(self.labels)
        self.prompt_fields = [f for f in self.task.fields if f != self.task.label_field
                              and "{" + f + "}" in self.task.prompt_template]

    @classmethod
    def from_pretrained(cls, model_or_run: str, task=None, tokenizer: str | None = None, precision: str = "auto",
                        device: str | None = None, ctx=None, init_seed: int = 0, quantize: str | None = None,
                        group_size: int = 128, adapter: str | None = None, adapters: dict[str, str] | None = None,
                        batch_size: int = 8, prefix_cache: bool = True):
        """`model_or_run`: a fine-tuning run directory (its task is read from its saved config
        when `task` is None), a Hugging Face directory or Hub id, or `random:PRESET`."""
        from gptj.execution.inference.pipelines import attach_named_adapters, load_model_and_tokenizer

        chosen, _ = resolve_task(model_or_run, task)
        model, tok = load_model_and_tokenizer(model_or_run, tokenizer, precision, device, ctx, False, init_seed,
                                              quantize=quantize, group_size=group_size, adapter=adapter)
        return cls(model, tok, task=chosen, batch_size=batch_size, adapters=attach_named_adapters(model, adapters, ctx),
                   prefix_cache=prefix_cache)

    def encode_labels(self, labels: list[str]) -> list[list[int]]:
        """Each label's continuation as trained: the target template, then EOS."""
        texts = [self.task.target({self.task.label_field: label}) for label in labels]
        return [ids + [self.tokenizer.eos_id] for ids in self.tokenizer.encode(texts)]

    def prompt(self, row: dict, index: int = 0) -> str:
        """The task's prompt for one row of its fields; a missing or empty field is a ValueError
        naming it."""
        if not isinstance(row, dict):
            raise TypeError(f"row {index} must be a dict of the task's fields {self.prompt_fields}, "
                            f"got {type(row).__name__}")
        for field in self.prompt_fields:
            value = row.get(field)
            if value is None:
                raise ValueError(f"row {index}: missing field {field!r} (task {self.task.name} needs "
                                 f"{', '.join(self.prompt_fields)})")
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"row {index}: field {field!r} must be a non-empty string")
        return self.task.render_prompt({**row, self.task.label_field: ""})

    def classify(self, rows: list[dict], choices: list[str] | None = None,
                 adapter: str | None = None) -> list[dict]:
        """{"label", "probabilities", "log_likelihoods"} for every row; `choices` replaces the
        task's labels (names put into its target template)."""
        from gptj.execution.inference.pipelines import using_adapter

        labels, label_ids = self.labels, self.label_ids
        if choices is not None:
            labels = list(choices)
            if not labels or not all(isinstance(c, str) and c.strip() for c in labels):
                raise ValueError("choices must be a non-empty list of non-empty strings")
            if len(set(labels)) != len(labels):
                raise ValueError("choices holds the same label twice")
            label_ids = self.encode_labels(labels)
        prompts = self.tokenizer.encode([self.prompt(row, i) for i, row in enumerate(rows)])
        with using_adapter(self.adapters, adapter):
            picked = choose(self.model, prompts, [label_ids] * len(prompts), max_rows=self.batch_size,
                            prefix=self.prefix_reuse(adapter))
        return [{"label": labels[c.best],
                 "probabilities": dict(zip(labels, c.logprobs.exp().tolist())),
                 "log_likelihoods": dict(zip(labels, c.log_likelihoods.tolist()))} for c in picked]

    def label_log_likelihoods(self, prompts: list[list[int]]) -> torch.Tensor:
        """[N, labels] summed log p(label + EOS | prompt) for tokenized prompts (fp32, CPU)."""
        return candidate_logprobs(self.model, prompts, self.label_ids, max_rows=self.batch_size,
                                  prefix=self.prefix_reuse(None))

    def prefix_reuse(self, adapter: str | None) -> PrefixReuse | None:
        """The prefix cache scoring under `adapter` takes blocks from and stores them in (None: off)."""
        return None if self.prefix_cache is None else PrefixReuse(self.prefix_cache, adapter)

    def __call__(self, rows, choices: list[str] | None = None, adapter: str | None = None):
        """One row (a dict of the task's fields) -> one result; a list of rows -> a list."""
        single = isinstance(rows, dict)
        if not single and not isinstance(rows, (list, tuple)):
            raise TypeError(f"ClassificationPipeline takes a dict of the task's fields {self.prompt_fields} "
                            f"or a list of them, got {type(rows).__name__}")
        if not single and not rows:
            raise ValueError("no rows given")
        out = self.classify([rows] if single else list(rows), choices, adapter)
        return out[0] if single else out
