"""Write a random GPT-J checkpoint in the Hugging Face layout, one tensor at a time.

bf16 safetensors shards of about `shard_bytes` (`model-00001-of-0000N.safetensors`), the
`model.safetensors.index.json` that maps every tensor to its shard, config.json and a
tokenizer. Every shard's header is known from the shapes alone, so each tensor is drawn and
written straight after it and freed: the writer holds one tensor, never a shard or the model.
Weights are N(0, 0.02) (the GPT-J initialisation), layer-norm weights 1 and every bias 0.

The directory is written as `DIR.partial` and renamed when complete, so a directory that
exists is a finished checkpoint and is reused.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from gptj.model import ModelConfig
from gptj.model.hf import SAFE_INDEX
from gptj.model.sharding import hf_shapes

SHARD_BYTES = 2 * 10**9  # Hugging Face's own default shard size for GPT-J 6B
GPT2_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2"
BF16_BYTES = 2


def plan_shards(config: ModelConfig, shard_bytes: int = SHARD_BYTES) -> list[list[tuple[str, tuple[int, ...]]]]:
    """The tensors of each shard, in the checkpoint's order, each shard at most `shard_bytes`
    (or one tensor)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in hf_shapes(config).items():
        nbytes = _numel(shape) * BF16_BYTES
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _header(tensors: list[tuple[str, tuple[int, ...]]]) -> bytes:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        end = offset + _numel(shape) * BF16_BYTES
        entries[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(entries, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)  # the data starts 8-byte aligned


def _draw(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    t = torch.empty(shape, dtype=torch.bfloat16)
    if name.endswith("ln_1.weight") or name.endswith("ln_f.weight"):
        return t.fill_(1.0)
    if name.endswith(".bias"):
        return t.zero_()
    return t.normal_(0.0, 0.02, generator=generator)


def write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], generator: torch.Generator) -> int:
    """Draw and write each tensor in turn; returns the data bytes written."""
    header = _header(tensors)
    written = 0
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for name, shape in tensors:
            t = _draw(name, shape, generator)
            f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
            written += t.numel() * BF16_BYTES
            del t
    return written


def add_extra_tokens(directory: Path, vocab_size: int) -> None:
    """GPT-J's tokenizer is GPT-2's (50257 tokens) with `<|extratoken_1|>` .. added up to the
    embedding's 50400 rows; tools that check the vocabulary against the model (CTranslate2's
    converter) need them. Written beside a GPT-2 vocab.json that is shorter than the model's."""
    vocab_file, added_file = directory / "vocab.json", directory / "added_tokens.json"
    if not vocab_file.is_file() or added_file.exists():
        return
    size = len(json.loads(vocab_file.read_text()))
    if size < vocab_size:
        extra = {f"<|extratoken_{i - size + 1}|>": i for i in range(size, vocab_size)}
        added_file.write_text(json.dumps(extra))


def copy_tokenizer(directory: Path, gpt2: Path | None = GPT2_TOKENIZER, vocab_size: int = 0) -> str:
    """GPT-2's vocab.json + merges.txt from `gpt2` where it has them (with GPT-J's extra tokens up
    to `vocab_size`), else the bundled tiny BPE."""
    if gpt2 is not None and (gpt2 / "vocab.json").is_file() and (gpt2 / "merges.txt").is_file():
        for name in ("vocab.json", "merges.txt"):
            shutil.copy2(gpt2 / name, directory / name)
        add_extra_tokens(directory, vocab_size)
        return "gpt2"
    from gptj.data import bundled

    source = Path(bundled.tokenizer_dir("tiny"))
    for file in source.iterdir():
        if file.is_file():
            shutil.copy2(file, directory / file.name)
    return "bundled:tiny"


def write_checkpoint(directory: Path, config: ModelConfig, seed: int = 0, shard_bytes: int = SHARD_BYTES,
                     tokenizer: Path | None = GPT2_TOKENIZER, log=print) -> Path:
    """A random checkpoint of `config` at `directory` (see the module docstring)."""
    directory = Path(directory)
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    shards = plan_shards(config, shard_bytes)
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        start = time.perf_counter()
        total += write_shard(partial / file, tensors, generator)
        weight_map.update({name: file for name, _ in tensors})
        log(f"wrote {file} ({total / 2**30:.1f} GiB so far, {time.perf_counter() - start:.1f} s)")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (partial / SAFE_INDEX).write_text(json.dumps(index, indent=2))
    values = {**config.to_hf_dict(), "torch_dtype": "bfloat16"}
    (partial / "config.json").write_text(json.dumps(values, indent=2))
    copy_tokenizer(partial, None if tokenizer is None else Path(tokenizer), config.vocab_size)
    partial.rename(directory)
    return directory


def ensure_checkpoint(directory: Path, config: ModelConfig, **kwargs) -> tuple[Path, bool]:
    """(the checkpoint, whether it was written now): an existing one is reused when its
    config.json describes `config`; one that describes another model is a ValueError."""
    directory = Path(directory)
    config_file = directory / "config.json"
    if directory.exists():
        if not config_file.is_file():
            raise ValueError(f"{directory} exists but holds no config.json: not a checkpoint to reuse")
        found = ModelConfig.from_hf(json.loads(config_file.read_text()))
        if found != config:
            raise ValueError(f"{directory} holds another model ({found}); expected {config}: "
                             "pass another --dir")
        add_extra_tokens(directory, config.vocab_size)  # checkpoints written before they were
        return directory, False
    return write_checkpoint(directory, config, **kwargs), True
