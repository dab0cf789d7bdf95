"""Inspect a data source the way training sees it.

    python -m gptj.data                                   # what `python run_finetuning.py` trains on
    python -m gptj.data --config gptj-6b-mnli --dataset path/to/mnli@train_sample --show 3
    python -m gptj.data --task my_task.yml --dataset rows.csv --tokenizer ../shared/data/gpt2 --json

Task, data set, tokenizer and sequence length default to the fine-tuning preset's (`--config`,
default `tiny`), so the counts shown (kept, skipped as too long, truncated) are the ones that
run reports; every option replaces the preset's value, as it does for run_finetuning.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import DataError
from .pipeline import resolve_source, tokenize_examples
from .sources import Source
from .tasks import load_task
from .tokenizer import load_tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gptj.data", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="tiny", metavar="NAME_OR_FILE",
                   help="fine-tuning preset whose data settings are the defaults: a name in "
                        "gptj/config/finetuning.yml, or a preset YAML file (FILE or FILE:NAME) (default tiny)")
    p.add_argument("--task", default=None, help="built-in task name or task YAML file (default: the preset's)")
    p.add_argument("--dataset", default=None,
                   help="bundled:NAME, a .jsonl/.csv/.tsv/.parquet file or directory (DIR@SPLIT), or a "
                        "Hugging Face dataset (hf:glue/mnli); default: the preset's")
    p.add_argument("--tokenizer", default=None,
                   help="bundled:tiny, a tokenizer directory, or a Hub id (default: the preset's)")
    p.add_argument("--split", default=None, help="split to read (default: the task's train split)")
    p.add_argument("--show", type=int, default=3, help="number of examples to print (default 3)")
    p.add_argument("--sequence-length", type=int, default=None,
                   help="training sequence length; longer examples are truncated (default: the preset's)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad row")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p.parse_args(argv)


def preset_settings(name_or_file: str) -> tuple[str, dict]:
    """(preset name, settings) of a fine-tuning preset: NAME in gptj/config/finetuning.yml, or a
    presets YAML file as run_finetuning.py's --preset-file takes it (FILE: its only preset,
    FILE:NAME: that one)."""
    from gptj.config import CONFIG_DIR, PresetError, read_presets, resolve_preset

    file, name = name_or_file, None
    if not Path(file).expanduser().is_file() and ":" in file:
        file, _, name = file.rpartition(":")
    if not Path(file).expanduser().is_file() and not file.endswith((".yml", ".yaml")):
        file, name = CONFIG_DIR / "finetuning.yml", name_or_file  # a preset name
    presets = read_presets(Path(file).expanduser())  # a missing file: PresetError naming it
    if name is None:
        if len(presets) != 1:
            raise PresetError(f"{file} holds presets {', '.join(presets)}: name one with {file}:NAME")
        name = next(iter(presets))
    return name, resolve_preset(presets, name, str(file))


def resolve_options(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every data option left out from the preset, as run_finetuning.py does."""
    args.preset, settings = preset_settings(args.config)
    values, model = settings.get("data") or {}, settings.get("model") or {}
    args.task = args.task or values.get("task", "mnli")
    args.dataset = args.dataset or values.get("dataset")
    # A preset without a tokenizer trains with its model's own.
    args.tokenizer = args.tokenizer or values.get("tokenizer") or model.get("name_or_path") or "bundled:tiny"
    args.sequence_length = args.sequence_length or values.get("sequence_length", 1024)
    args.strict = args.strict or bool(values.get("strict", False))
    return args


def inspect(args: argparse.Namespace) -> dict:
    task = load_task(args.task)
    tokenizer = load_tokenizer(args.tokenizer)
    src = Source(resolve_source(task, args.dataset), args.split or task.train_split)
    rows, enc, summary = tokenize_examples(task, src, tokenizer, args.sequence_length,
                                           args.strict, progress=not args.json)
    examples = []
    for i in range(min(args.show, len(enc.kept))):
        row = rows[enc.kept[i]]
        ids = enc.tokens[enc.offsets[i]:enc.offsets[i + 1]]
        text = task.render_train(row)
        truncated = len(tokenizer.encode([text])[0]) != len(ids)
        examples.append({
            # A truncated example is shown as the text of the tokens actually trained on.
            "text": tokenizer.decode(ids) if truncated else text,
            "prompt": task.render_prompt(row),
            "target": task.target(row),
            "num_tokens": int(len(ids)),
            "num_target_tokens": int(enc.is_target[enc.offsets[i]:enc.offsets[i + 1]].sum()),
            "truncated": truncated,
        })
    return {"preset": args.preset, "task": task.name, "source": src.name, "split": src.split,
            "tokenizer": tokenizer.name_or_path, "sequence_length": args.sequence_length,
            "examples": examples, "summary": summary.to_dict()}


def main(argv=None) -> int:
    from gptj.config import PresetError

    args = parse_args(argv)
    try:
        result = inspect(resolve_options(args))
    except (DataError, PresetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return 0
    split = f" [{result['split']}]" if result["split"] else ""
    print(f"preset {result['preset']}  task {result['task']}  source {result['source']}{split}  "
          f"tokenizer {result['tokenizer']}  sequence length {result['sequence_length']}")
    for i, ex in enumerate(result["examples"]):
        print(f"\n--- example {i}: {ex['num_tokens']} tokens ({ex['num_target_tokens']} target)"
              + (" [truncated]" if ex["truncated"] else ""))
        print(f"train:  {ex['text']!r}")
        print(f"prompt: {ex['prompt']!r}")
        print(f"target: {ex['target']!r}")
    s = result["summary"]
    skipped = ", ".join(f"{k} {v}" for k, v in s["skipped"].items()) or "none"
    print(f"\nsummary: read {s['read']}, kept {s['kept']}, skipped: {skipped}, "
          f"truncated {s['truncated']}")
    for reason, first in s["first_seen"].items():
        print(f"  first {reason}: {first}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
