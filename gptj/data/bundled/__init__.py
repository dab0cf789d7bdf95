"""Files shipped with the project so that the default run needs no download.

- `bundled:mnli_sample`: a synthetic MNLI-style data set (splits train, validation_matched,
  validation_mismatched) written by make_sample.py from templated sentences.
- `bundled:tiny`: a byte-level BPE tokenizer trained on that sample, with <|endoftext|> (EOS)
  and <|pad|>.
Regenerate both with `python -m gptj.data.bundled.make_sample`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError

HERE = Path(__file__).resolve().parent
SAMPLES = {"mnli_sample": HERE / "mnli_sample"}
TOKENIZERS = {"tiny": HERE / "tokenizer"}


def sample_dir(name: str) -> Path:
    if name not in SAMPLES:
        raise DataError(f"unknown bundled source bundled:{name}; have: "
                        + ", ".join(f"bundled:{n}" for n in SAMPLES))
    return SAMPLES[name]


def tokenizer_dir(name: str) -> Path:
    if name not in TOKENIZERS:
        raise DataError(f"unknown bundled tokenizer bundled:{name}; have: "
                        + ", ".join(f"bundled:{n}" for n in TOKENIZERS))
    return TOKENIZERS[name]
