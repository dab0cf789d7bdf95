"""Time loading + tokenizing + packing the MNLI validation set: this data layer vs `datasets`.

Both sides read the same JSONL file, render the same training text, tokenize with the same
fast tokenizer and pack into rows of sequence_length + 1 tokens; the cache is off for both.

    python benchmarks/bench_data.py [--repeats 3] [--sequence-length 1024] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gptj.data as data  # noqa: E402
from gptj.data import bundled  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
MNLI_FILE = SHARED / "mnli" / "validation_matched.jsonl"
GPT2_DIR = SHARED / "gpt2"


def pick_inputs() -> tuple[str, str, list[str]]:
    notes = []
    if MNLI_FILE.is_file():
        source = str(MNLI_FILE)
    else:
        source = str(bundled.sample_dir("mnli_sample") / "validation_matched.jsonl")
        notes.append(f"{MNLI_FILE} absent: timing the bundled sample instead (400 rows)")
    if (GPT2_DIR / "vocab.json").is_file():
        tokenizer = str(GPT2_DIR)
    else:
        tokenizer = "bundled:tiny"
        notes.append(f"{GPT2_DIR} absent: using the bundled tiny tokenizer")
    return source, tokenizer, notes


def run_ours(source: str, tok, sequence_length: int):
    train = data.build_train_data("mnli", source, tok, sequence_length, use_cache=False,
                                  progress=False)
    return train.batch(np.arange(train.num_rows))["input_ids"].shape[0], train.num_tokens


def run_datasets(source: str, tok, sequence_length: int, cache_dir: str):
    import datasets
    task = data.load_task("mnli")
    hf_tok = tok.to_transformers()
    row_len = sequence_length + 1

    def render(batch):
        texts = [task.render_train({"premise": p, "hypothesis": h, "label": task.labels[y]})
                 for p, h, y in zip(batch["premise"], batch["hypothesis"], batch["label"])]
        return {"input_ids": hf_tok(texts)["input_ids"]}

    def pack(batch):
        stream = [t for ids in batch["input_ids"] for t in ids]
        n = -(-len(stream) // row_len) * row_len
        stream += [tok.pad_id] * (n - len(stream))
        return {"row": [stream[i:i + row_len] for i in range(0, n, row_len)]}

    ds = datasets.load_dataset("json", data_files=source, split="train", cache_dir=cache_dir,
                               keep_in_memory=True)
    ds = ds.filter(lambda b: [y in (0, 1, 2) for y in b["label"]], batched=True,
                   keep_in_memory=True)
    ds = ds.map(render, batched=True, remove_columns=ds.column_names, keep_in_memory=True)
    num_tokens = sum(len(x) for x in ds["input_ids"])
    ds = ds.map(pack, batched=True, batch_size=len(ds), remove_columns=["input_ids"],
                keep_in_memory=True)
    rows = np.asarray(ds.with_format("numpy")["row"])
    return rows.shape[0], num_tokens


def run(repeats: int = 3, sequence_length: int = 1024) -> dict:
    """Best-of-`repeats` wall time of both pipelines; returns a JSON-able dict."""
    import datasets
    datasets.disable_caching()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    source, tok_spec, notes = pick_inputs()
    tok = data.load_tokenizer(tok_spec)
    ours, theirs = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        rows, tokens = run_ours(source, tok, sequence_length)
        ours.append(time.perf_counter() - t)
        with tempfile.TemporaryDirectory() as cache_dir:
            t = time.perf_counter()
            hf_rows, hf_tokens = run_datasets(source, tok, sequence_length, cache_dir)
            theirs.append(time.perf_counter() - t)
    if (rows, tokens) != (hf_rows, hf_tokens):
        notes.append(f"outputs differ: ours {rows} rows / {tokens} tokens, "
                     f"datasets {hf_rows} rows / {hf_tokens} tokens")
    return {
        "benchmark": "data_load_tokenize_pack",
        "source": source, "tokenizer": tok_spec, "sequence_length": sequence_length,
        "rows": rows, "tokens": tokens, "repeats": repeats,
        "ours_s": min(ours), "datasets_s": min(theirs),
        "speedup": min(theirs) / min(ours),
        "ours_tokens_per_s": tokens / min(ours),
        "notes": notes,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sequence-length", type=int, default=1024)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    result = run(args.repeats, args.sequence_length)
    if args.json:
        print(json.dumps(result))
        return 0
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"{result['source']} -> {result['rows']} rows x {args.sequence_length + 1} tokens "
          f"({result['tokens']} tokens, tokenizer {result['tokenizer']})")
    print(f"this data layer : {result['ours_s']:.3f} s  ({result['ours_tokens_per_s'] / 1e6:.2f} M tok/s)")
    print(f"datasets        : {result['datasets_s']:.3f} s")
    print(f"ratio datasets / ours = {result['speedup']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
