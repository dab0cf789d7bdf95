"""A thin wrapper over a Hugging Face fast tokenizer (`tokenizers.Tokenizer`).

The `tokenizers` library is used directly, and Hub files are fetched with `huggingface_hub`,
because `transformers.AutoTokenizer` imports torch and data/ must not.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import DataError

EOS = "<|endoftext|>"
GPTJ_EXTRA_TOKENS = tuple(f"<|extratoken_{i}|>" for i in range(1, 144))  # ids 50257..50399
GPT2_VOCAB_SIZE = 50257


class Tokenizer:
    """Encodes text without adding special tokens; the data layer appends EOS itself."""

    def __init__(self, backend, eos_token: str, pad_token: str, name_or_path: str):
        self.backend = backend  # tokenizers.Tokenizer
        self.name_or_path = name_or_path
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.eos_id = _token_id(backend, eos_token, name_or_path)
        self.pad_id = _token_id(backend, pad_token, name_or_path)
        self._identity = None

    @property
    def vocab_size(self) -> int:
        """Number of token ids including added tokens (50400 for GPT-J)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Batched encoding; special tokens written in the text (e.g. <|endoftext|>) are kept."""
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)  # no offsets
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, texts: list[str]):
        """Batched encoding with character offsets, used for truncation and target masks."""
        return self.backend.encode_batch(list(texts), add_special_tokens=False)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def identity(self) -> str:
        """Hash of the full tokenizer definition and special ids; part of the cache key."""
        if self._identity is None:
            h = hashlib.sha256(self.backend.to_str().encode())
            h.update(f"{self.eos_id},{self.pad_id}".encode())
            self._identity = h.hexdigest()
        return self._identity

    def save(self, directory) -> Path:
        """Write tokenizer.json + config files that `AutoTokenizer.from_pretrained` loads."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        special = {"eos_token": self.eos_token, "bos_token": self.eos_token,
                   "unk_token": self.eos_token, "pad_token": self.pad_token}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_prefix_space": False,
                  "clean_up_tokenization_spaces": False, "model_max_length": 2048, **special}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
        return directory

    def to_transformers(self):
        """The same tokenizer as a `transformers.PreTrainedTokenizerFast` (imports transformers)."""
        from transformers import PreTrainedTokenizerFast
        return PreTrainedTokenizerFast(tokenizer_object=self.backend, eos_token=self.eos_token,
                                       bos_token=self.eos_token, unk_token=self.eos_token,
                                       pad_token=self.pad_token)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id})")


def _token_id(backend, token: str, where: str) -> int:
    tid = backend.token_to_id(token)
    if tid is None:
        raise DataError(f"tokenizer {where} has no token {token!r}")
    return tid


def load_tokenizer(spec, gptj_extra_tokens: bool | None = None) -> Tokenizer:
    """Load a tokenizer from a spec.

    - `bundled:tiny`: the small byte-level BPE shipped in data/bundled/tokenizer.
    - a directory with tokenizer.json (and optionally tokenizer_config.json naming eos/pad).
    - a directory with GPT-2 vocab.json + merges.txt; when the vocabulary is GPT-2's 50,257
      tokens the 143 GPT-J tokens <|extratoken_1..143|> are added (ids 50257-50399) unless
      `gptj_extra_tokens=False`.
    - otherwise a Hugging Face Hub id such as EleutherAI/gpt-j-6b (needs network or HF cache).
    The pad token: tokenizer_config's pad_token, else <|extratoken_1|> (GPT-J), else <|pad|>,
    else EOS.
    """
    if isinstance(spec, Tokenizer):
        return spec
    spec = str(spec)
    if spec.startswith("bundled:"):
        from . import bundled
        return _from_directory(bundled.tokenizer_dir(spec[len("bundled:"):]), spec, gptj_extra_tokens)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _from_directory(path, spec, gptj_extra_tokens)
    if path.is_file() and path.name == "tokenizer.json":
        return _from_directory(path.parent, spec, gptj_extra_tokens)
    if spec.startswith(("/", "./", "../", "~")) or path.exists():
        raise DataError(f"tokenizer not found: {spec} (expected a directory with tokenizer.json "
                        "or vocab.json + merges.txt)")
    return _from_hub(spec)


def _from_directory(path: Path, name: str, gptj_extra_tokens) -> Tokenizer:
    from tokenizers import Tokenizer as Backend
    config = _special_tokens_config(path)
    if (path / "tokenizer.json").is_file():
        backend = Backend.from_file(str(path / "tokenizer.json"))
    elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        backend = _gpt2_backend(path)
        added = _added_tokens(path)
        if gptj_extra_tokens is None:
            gptj_extra_tokens = not added and backend.get_vocab_size() == GPT2_VOCAB_SIZE
        if gptj_extra_tokens:
            added = list(GPTJ_EXTRA_TOKENS)
        if added:
            from tokenizers import AddedToken
            backend.add_tokens([AddedToken(t, normalized=False) for t in added])
    else:
        raise DataError(f"tokenizer directory {path} has neither tokenizer.json nor "
                        "vocab.json + merges.txt")
    return _wrap(backend, config, name)


def _gpt2_backend(path: Path):
    """GPT-2 byte-level BPE built from vocab.json + merges.txt, as GPT2TokenizerFast builds it."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend
    backend = Backend(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    if backend.token_to_id(EOS) is not None:
        backend.add_special_tokens([AddedToken(EOS, normalized=False, special=True)])
    return backend


def _added_tokens(path: Path) -> list[str]:
    """Tokens of added_tokens.json (token -> id) in id order; they must follow the vocabulary."""
    f = path / "added_tokens.json"
    if not f.is_file():
        return []
    try:
        mapping = json.loads(f.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"bad JSON in {f}: {e}") from e
    vocab_size = len(json.loads((path / "vocab.json").read_text(encoding="utf-8")))
    tokens = [t for t, _ in sorted(mapping.items(), key=lambda kv: kv[1])
              if t not in ("<|endoftext|>",)]
    ids = sorted(i for t, i in mapping.items() if t in tokens)
    if ids != list(range(vocab_size, vocab_size + len(ids))):
        raise DataError(f"{f}: added token ids must continue the vocabulary from {vocab_size}")
    return tokens


def _special_tokens_config(path: Path) -> dict:
    out = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = path / name
        if f.is_file():
            try:
                d = json.loads(f.read_text(encoding="utf-8"))
            except ValueError as e:
                raise DataError(f"bad JSON in {f}: {e}") from e
            for key in ("eos_token", "pad_token"):
                value = d.get(key)
                if isinstance(value, dict):  # serialized AddedToken
                    value = value.get("content")
                if isinstance(value, str) and value:
                    out.setdefault(key, value)
    return out


def _wrap(backend, config: dict, name: str) -> Tokenizer:
    eos = config.get("eos_token", EOS)
    pad = config.get("pad_token")
    if pad is None or backend.token_to_id(pad) is None:
        pad = next((t for t in (GPTJ_EXTRA_TOKENS[0], "<|pad|>") if backend.token_to_id(t) is not None),
                   eos)
    return Tokenizer(backend, eos, pad, name)


TOKENIZER_FILES = ["tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "special_tokens_map.json", "tokenizer_config.json"]


def _from_hub(spec: str) -> Tokenizer:
    """Fetch the tokenizer files of a Hub repo (or find them in the local HF cache).

    `huggingface_hub` is used rather than `transformers.AutoTokenizer`, which imports torch.
    """
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise DataError("loading a tokenizer from the Hugging Face Hub needs `huggingface_hub`") from e
    try:
        local = snapshot_download(spec, allow_patterns=TOKENIZER_FILES)
    except Exception as e:  # network, missing repo, ... all reported the same way
        raise DataError(f"cannot load tokenizer {spec!r} (not a local directory; tried the "
                        f"Hugging Face Hub): {e}") from e
    return _from_directory(Path(local), spec, None)
