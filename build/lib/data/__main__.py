"""Inspect a data source the way training sees it.

    python -m data --task mnli --dataset bundled:mnli_sample --tokenizer bundled:tiny --show 3
    python -m data --task my_task.yml --dataset rows.csv --tokenizer ../shared/data/gpt2 --json
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import DataError
from .pipeline import resolve_source, tokenize_examples
from .sources import Source
from .tasks import load_task
from .tokenizer import load_tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data", description=__doc__.split("\n")[0])
    p.add_argument("--task", default="mnli", help="built-in task name or task YAML file (default mnli)")
    p.add_argument("--dataset", default=None,
                   help="bundled:NAME, a .jsonl/.csv/.tsv/.parquet file or directory, or a Hugging "
                        "Face dataset (hf:glue/mnli); default: the task's bundled sample")
    p.add_argument("--tokenizer", default="bundled:tiny",
                   help="bundled:tiny, a tokenizer directory, or a Hub id (default bundled:tiny)")
    p.add_argument("--split", default=None, help="split to read (default: the task's train split)")
    p.add_argument("--show", type=int, default=3, help="number of examples to print (default 3)")
    p.add_argument("--sequence-length", type=int, default=1024,
                   help="training sequence length; longer examples are truncated (default 1024)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad row")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p.parse_args(argv)


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
    return {"task": task.name, "source": src.name, "split": src.split,
            "tokenizer": tokenizer.name_or_path, "examples": examples, "summary": summary.to_dict()}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = inspect(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return 0
    split = f" [{result['split']}]" if result["split"] else ""
    print(f"task {result['task']}  source {result['source']}{split}  tokenizer {result['tokenizer']}")
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
