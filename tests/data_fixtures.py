"""Shared helpers for the data tests: a tiny tokenizer trained here, small data files."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EOS = "<|endoftext|>"
PAD = "<|pad|>"

MNLI_ROWS = [
    {"premise": "The red cat sleeps in the kitchen.", "hypothesis": "A cat sleeps in the kitchen.",
     "label": 0},
    {"premise": "The old dog runs in the park.", "hypothesis": "The dog is hungry.", "label": 1},
    {"premise": "A small bird sings on the roof.", "hypothesis": "The bird is silent.", "label": 2},
    {"premise": "The young teacher reads in the office.", "hypothesis": "A teacher reads.",
     "label": 0},
    {"premise": "The tired baker waits at the station.", "hypothesis": "The baker has left.",
     "label": 2},
]


WORDS = ("the a cat dog bird teacher baker sleeps runs sings reads waits kitchen park roof "
         "office station red old small young tired hungry silent left in on at is has "
         "mnli hypothesis premise target entailment neutral contradiction question context "
         "answer sentence positive negative")


def corpus() -> list[str]:
    words = WORDS.split()
    lines = [f"mnli hypothesis: {r['hypothesis']} premise: {r['premise']} target: neutral"
             for r in MNLI_ROWS]
    lines += [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    return lines * 3


@functools.lru_cache(maxsize=1)
def tiny_tokenizer_dir() -> Path:
    """A byte-level BPE (vocab 400) trained on generated text and saved like a HF tokenizer."""
    from tokenizers import ByteLevelBPETokenizer

    from data.tokenizer import Tokenizer
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus(), vocab_size=400, min_frequency=2,
                            special_tokens=[EOS, PAD], show_progress=False)
    out = Path(tempfile.mkdtemp(prefix="tiny-tok-"))
    Tokenizer(bpe._tokenizer, EOS, PAD, "tiny").save(out)
    return out


def tiny_tokenizer():
    import data
    return data.load_tokenizer(tiny_tokenizer_dir())


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def mnli_file(tmp_path: Path, rows=MNLI_ROWS, name: str = "mnli.jsonl") -> Path:
    return write_jsonl(tmp_path / name, rows)
